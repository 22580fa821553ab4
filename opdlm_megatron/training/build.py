"""The one build path: what both training loops - the project's ``Trainer`` and the Megatron-LM plugin
(``integrations/megatron_lm/``) - make from a run config, so a fix here is a fix in both.

* ``student_architecture``: the student checkpoint's ``ModelConfig`` with the run's block size, dtype and
  attention backend, refused where it cannot train (FlexAttention has no backward on CPU).
* ``build_student_model``: this rank's part of the student (precision, sequence parallelism, the MoE
  router's training terms).
* ``build_teacher``: the frozen teacher in the student's process groups - from its own checkpoint, or
  (self-distillation) the student's starting weights, read again from their checkpoint or copied from
  the freshly built student.
* ``load_run_samples``: the prompts (or texts) of ``data``, tokenised and checked against the
  vocabulary, with the prompts skipped for length said once.
* ``step_record``: the numbers every step logs (``metrics.jsonl``, TensorBoard, Megatron-LM's loss dict).

What stays apart is what Megatron-LM owns: its flags (dtype, the optimizer and its schedule), its loop
and its checkpoint layout (``integrations/megatron_lm/``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from ..checkpoint.model import load_model_checkpoint, load_model_config
from ..checkpoint.training import check_teacher_checkpoint
from ..config.model import ModelConfig, canonical_dtype
from ..data.samples import Sample, SampleList, check_token_ids, load_samples, load_tokenizer
from ..distill.teacher import FrozenTeacher
from ..model.build import build_model
from ..model.quantization import insert_quantizers, quantization_recipe
from ..rollout.calibration import quantize_on_rollouts
from .config import ModelPaths, TrainConfig
from .schedules import rollout_decode_config, rollout_length


def student_architecture(cfg: TrainConfig, config: ModelConfig, device_type: str) -> ModelConfig:
    """``config`` (the student checkpoint's) with the run's ``block_size``, ``model.student_dtype`` and
    ``model.attention_backend``; a ValueError where it cannot train on ``device_type``."""
    config = cfg.student_architecture(config)
    if config.attention_backend == "flex" and device_type != "cuda":
        raise ValueError(f"attention_backend 'flex' trains only on CUDA GPUs (FlexAttention has no backward on "
                         f"{device_type}); set model.attention_backend=dense")
    tp = cfg.parallel.tensor_model_parallel_size
    if config.num_experts is not None and tp > 1 and not cfg.parallel.sequence_parallel:
        # megatron's MoE layer refuses to train at TP > 1 without it (each TP rank would route the whole
        # sequence); rollouts and the teacher run outside it, in eval mode, where the dispatcher's gather
        # over the TP ranks is still correct
        raise ValueError(f"a mixture-of-experts student trains at tensor parallel size {tp} only with "
                         f"parallel.sequence_parallel=true (megatron's MoE layer); set it, or split the experts "
                         f"with parallel.expert_model_parallel_size instead")
    q = cfg.quantization
    if q.format is not None:  # a format this machine cannot run, or ModelOpt missing: before anything is built
        quantization_recipe(q.format, device_type)
    if config.quantization is not None and (q.format, list(q.exclude)) != (config.quantization,
                                                                          list(config.quantization_exclude)):
        raise ValueError(f"the student checkpoint is quantized ({config.quantization}, exclude "
                         f"{config.quantization_exclude}); quantization.format {q.format!r} and quantization.exclude "
                         f"{q.exclude} must say the same (quantization-aware training goes on from its ranges), or "
                         f"start from the unquantized student")
    if config.num_experts is None and cfg.moe.router_losses_on:
        raise ValueError(f"moe.load_balancing {cfg.moe.load_balancing!r} and moe.z_loss_coeff {cfg.moe.z_loss_coeff!r} "
                         f"train a mixture-of-experts router; this student is dense (leave them at none / 0)")
    return config


def build_student_model(cfg: TrainConfig, config: ModelConfig, **build_kwargs):
    """This rank's part of the student for the run: its FP8 settings, sequence parallelism and (MoE) the
    router's training terms (``moe``); ``build_kwargs`` add what one loop needs (pipeline stage flags)."""
    overrides = cfg.moe.transformer_overrides() if config.num_experts is not None else {}
    return build_model(config, "student", precision=cfg.model.student_precision,
                       sequence_parallel=cfg.parallel.sequence_parallel, **overrides, **build_kwargs)


def quantize_student(cfg: TrainConfig, student, config: ModelConfig, samples: Sequence[Sample],
                     calibrate: bool = True) -> None:
    """Quantization-aware training (``quantization``): fake-quantizes ``student`` in place to the run's
    format, its ranges calibrated on the student decoding the first ``quantization.calibration_prompts``
    prompts of ``samples`` as the first rollout decodes (every rank decodes the same prompts, so any layout
    calibrates alike); with ``calibrate`` False (a resumed run) the ranges are left for the checkpoint. A
    student checkpoint that is already quantized (``opdlm-quantize``) was built with its quantizers and
    ranges (``student_architecture`` checked that the formats agree). Before the optimizer is built: SmoothQuant
    rescales the weights."""
    q = cfg.quantization
    if q.format is None or config.quantization is not None:
        return
    if not calibrate:
        insert_quantizers(student, q.format, exclude=q.exclude)
        return
    prompts = [list(sample.prompt_ids) for sample in samples[:q.calibration_prompts]]
    decode = rollout_decode_config(cfg, 0, rollout_length(0, cfg.curriculum), cfg.end_of_turn_ids(config))
    quantize_on_rollouts(student, config, q.format, prompts, decode, cfg.rollout.tasks_per_rollout, q.exclude)


def build_teacher_model(config: ModelConfig, objective, paths: ModelPaths, sequence_parallel: bool = False):
    """``(model, config)``: the frozen teacher for the architecture ``config`` (its checkpoint's, or the
    student's for self-distillation) with the run's ``model.teacher_dtype``, ``model.attention_backend``
    and ``model.teacher_precision``, unloaded. Its mask type: megatron's causal type (Transformer Engine's
    fused causal attention on GPUs; no mask tensor) when the objective only scores answers with it (one
    causal forward over ``[prompt; x0]``) and ``model.teacher_causal_kernel`` allows it, else the
    arbitrary type, which decoding cached answers and TCS's branches need. ``sequence_parallel``: the
    run's (``parallel.sequence_parallel``), as for the student."""
    from megatron.core.transformer.enums import AttnMaskType

    config = config.replace(
        params_dtype=canonical_dtype(paths.teacher_dtype) if paths.teacher_dtype else config.params_dtype,
        attention_backend=paths.attention_backend or config.attention_backend,
        quantization=None, quantization_exclude=[])  # the teacher stays in its own precision
    causal = paths.teacher_causal_kernel and objective.teacher_scores_only and config.attention_backend == "dense"
    model = build_model(config, "teacher", precision=paths.teacher_precision, sequence_parallel=sequence_parallel,
                        attn_mask_type=AttnMaskType.causal if causal else AttnMaskType.arbitrary)
    return model, config


def build_teacher(cfg: TrainConfig, objective, student_config: ModelConfig, source: Optional[str] = None,
                  student=None, load=load_model_checkpoint, config_of=load_model_config,
                  names: Tuple[str, str, str] = ("model.teacher_checkpoint", "model.student_checkpoint",
                                                 "set model.teacher_checkpoint to the AR model")) -> FrozenTeacher:
    """The frozen teacher of the run: ``model.teacher_checkpoint`` when set; else (self-distillation) the
    student's starting weights, those of checkpoint ``source``, copied from ``student`` as it was just
    built when given, else read again from ``source``. ``load(model, path)`` reads a checkpoint's
    weights and ``config_of(path)`` its architecture (the Megatron-LM plugin also reads Megatron-LM's own
    layout). A teacher checkpoint that is a trained block-diffusion student is refused, naming the
    setting it came from (``names``: the teacher's, the starting weights', and what to do instead)."""
    paths = cfg.model
    teacher_setting, source_setting, hint = names
    if paths.teacher_checkpoint:
        check_teacher_checkpoint(paths.teacher_checkpoint, teacher_setting)
        model, config = build_teacher_model(config_of(paths.teacher_checkpoint), objective, paths,
                                            cfg.parallel.sequence_parallel)
        load(model, paths.teacher_checkpoint)
        return FrozenTeacher(model, config, student_config)
    if source is not None:
        check_teacher_checkpoint(source, f"{source_setting} (the self-distillation teacher)", hint)
    model, config = build_teacher_model(student_config, objective, paths, cfg.parallel.sequence_parallel)
    if student is None:
        load(model, source)
    else:
        weights = student.state_dict()
        missing = sorted(set(model.state_dict()) - set(weights))
        unexpected = sorted(set(weights) - set(model.state_dict()))
        if missing or unexpected:
            raise ValueError(f"the self-distillation teacher could not take the student's weights: missing "
                             f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}")
        model.load_state_dict(weights, strict=True)
        model.to(dtype=config.torch_dtype)
    return FrozenTeacher(model, config, student_config)


def load_run_samples(cfg: TrainConfig, config: ModelConfig) -> SampleList:
    """The run's samples (``data``), tokenised with the run's tokenizer and checked against the
    student's vocabulary (a bad token id is named by its file line)."""
    tokenizer = None if cfg.data.source == "token_ids" else load_tokenizer(cfg.model.tokenizer_dir)
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    samples = load_samples(cfg.data, tokenizer, eos)
    check_token_ids(samples, config.vocab_size, config.mask_token_id)
    return samples


def step_record(inputs_metrics: Dict[str, float], loss: float, token_mean: float, skipped: bool,
                grad_norm: Optional[float], lr: float, paper_tokens: float,
                skipped_long_prompts: int = 0) -> Dict[str, float]:
    """The numbers of one optimizer step both loops log, beside their own extras: the step's inputs
    (rollout, states, teacher), the loss, whether the update was skipped, the gradient norm, the
    learning rate and the paper's training tokens of the step."""
    return {**inputs_metrics, "loss": float(loss), "token_mean": float(token_mean), "skipped": float(skipped),
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm), "lr": float(lr),
            "paper_tokens": 0.0 if skipped else float(paper_tokens),
            "data/skipped_long_prompts": float(skipped_long_prompts)}
