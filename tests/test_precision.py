"""FP8 configuration (precision.py) on CPU: the mapping onto megatron's TransformerConfig, the clear
errors, rollouts outside FP8, and the pad-to-16 of training batches (same loss and gradients as
unpadded). The FP8 numerics themselves need a GPU with Transformer Engine (tests/test_gpu.py, skipped here)."""

from __future__ import annotations

import math

import pytest
import torch

from opdlm_megatron.model.losses import DivergenceConfig
from opdlm_megatron.model.masks import block_causal_layout
from opdlm_megatron.model.build import build_model
from opdlm_megatron.objectives.base import SupervisedBatch
from opdlm_megatron.config.precision import PrecisionConfig, check_fp8_runtime, fp8_disabled
from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
from opdlm_megatron.distill.states import select_states
from opdlm_megatron.training.student import StudentStepPlan, forward_step, student_step
from opdlm_megatron.distill.teacher import TeacherTargets
from opdlm_megatron.training.config_files import train_config_from_dict
from tests.distributed.student_data import student_config, synthetic_rollout
from tests.helpers import tiny_config

CUDA = torch.device("cuda", 0)


def test_mapping_onto_transformer_config():
    precision = PrecisionConfig(fp8="hybrid", fp8_recipe="blockwise", fp8_param=True, num_layers_at_end_in_bf16=2)
    precision.validate()
    assert precision.transformer_overrides(num_layers=30) == dict(
        fp8="hybrid", fp8_recipe="blockwise", fp8_param=True, first_last_layers_bf16=True,
        num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=2)
    assert PrecisionConfig().transformer_overrides(30) == {}
    # megatron accepts the fields (the TransformerConfig is built, not run, on CPU)
    fields = tiny_config().transformer_config().__dataclass_fields__
    assert set(precision.transformer_overrides(30)) <= set(fields)
    with pytest.raises(ValueError, match="leave none of the model's 3 layers in FP8"):
        PrecisionConfig(fp8="e4m3", num_layers_at_start_in_bf16=2).transformer_overrides(3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(fp8="e5m2"), "precision.fp8 must be one of ['e4m3', 'hybrid'] or null"),
    (dict(fp8="e4m3", fp8_recipe="fast"), "fp8_recipe must be one of"),
    (dict(fp8_param=True), "fp8_param needs"),
    (dict(fp8="e4m3", num_layers_at_end_in_bf16=-1), "num_layers_at_end_in_bf16 must be an integer >= 0"),
])
def test_bad_precision_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PrecisionConfig(**kwargs).validate()


def test_training_config_carries_precision_per_model(tmp_path):
    from tests.distributed.train_common import tiny_train_dict

    data = tiny_train_dict(str(tmp_path), "p.jsonl", "ckpt")
    data["model"]["teacher_precision"] = {"fp8": "e4m3", "fp8_param": True}
    cfg = train_config_from_dict(data)
    assert cfg.model.teacher_precision.fp8_param and not cfg.model.student_precision.enabled
    data["model"]["student_precision"] = {"fp8": "fp4"}
    with pytest.raises(ValueError, match="model.student_precision.fp8 must be one of"):
        train_config_from_dict(data)


@pytest.mark.parametrize("args,message", [
    (dict(transformer_impl="local"), "needs the Transformer Engine layer spec"),
    (dict(device=torch.device("cpu")), "needs a CUDA GPU; this run is on cpu"),
    (dict(te_available=False), "needs Transformer Engine"),
    (dict(capability=(8, 0)), "needs compute capability >= 8.9, this GPU has 8.0"),
    (dict(capability=(9, 0), recipe="mxfp8"), "'mxfp8' needs compute capability >= 10.0"),
    (dict(params_dtype="float32"), "FP8 runs with bfloat16 parameters"),
])
def test_fp8_runtime_refusals(args, message):
    recipe = args.pop("recipe", "tensorwise")
    call = dict(transformer_impl="transformer_engine", params_dtype="bfloat16", device=CUDA, capability=(9, 0),
                te_available=True)
    call.update(args)
    with pytest.raises(ValueError, match=message):
        check_fp8_runtime(PrecisionConfig(fp8="e4m3", fp8_recipe=recipe), who="student", **call)
    check_fp8_runtime(PrecisionConfig(), "local", "float32", torch.device("cpu"))  # no FP8: nothing to check


def test_rollouts_run_outside_fp8(runtime):
    config = tiny_config()
    model = build_model(config, "student").eval()
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, args: seen.append(module.config.fp8))
    model.config.fp8 = "hybrid"  # as a TE model would carry it (never run on CPU)
    DiffusionRolloutEngine(model, config, forward_impl="megatron").generate([[5, 6, 7]], DecodeConfig(max_new_tokens=4))
    assert seen and set(seen) == {None}
    assert model.config.fp8 == "hybrid"
    with fp8_disabled(model):
        assert model.config.fp8 is None
    assert model.config.fp8 == "hybrid"


def test_padding_to_16_columns_changes_nothing(runtime):
    config = student_config()
    model = build_model(config, "student")
    result = synthetic_rollout(config.vocab_size, config.block_size, batch_size=3, seed=7)
    xt = select_states(result, "block", torch.Generator().manual_seed(0), config.mask_token_id,
                       block_size=config.block_size)
    supervised = (xt == config.mask_token_id) & result.answer_valid
    batch = SupervisedBatch(result, supervised, supervised, distill=True, layout="opd", xt=xt)
    logits = torch.randn(3, result.answer_ids.shape[1], config.padded_vocab_size(1),
                         generator=torch.Generator().manual_seed(1))
    targets = TeacherTargets.dense(logits, tuple(result.answer_ids.shape))
    div = DivergenceConfig()

    def run(multiple):
        model.zero_grad(set_to_none=True)
        plan = StudentStepPlan(model, config, batch, targets, div, 2, pad_multiple=multiple)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(plan.microbatches), model=[model], num_microbatches=plan.num_microbatches,
            seq_length=plan.seq_length, micro_batch_size=2, forward_only=False)
        return plan, plan.summarize(out), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_out, plain_grads = run(1)
    padded, padded_out, padded_grads = run(16)
    assert plain.seq_length % 16 != 0 and padded.seq_length % 16 == 0
    assert math.isclose(plain_out["loss"], padded_out["loss"], rel_tol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(padded_grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert student_step(model, config, batch, targets, div, 2)["loss"] == pytest.approx(plain_out["loss"], rel=1e-6)


def test_pad_columns_layout():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    layout = block_causal_layout(valid, 2, torch.tensor([1, 2]))
    padded = layout.pad_columns(8)
    assert padded.seq_len == 8 and not padded.valid[:, 3:].any()
    assert torch.equal(padded.dense_mask()[:, :, :3, :3], layout.dense_mask())
    assert padded.dense_mask()[:, 0, :3, 3:][valid].all(), "no real column attends to padding"
    assert layout.pad_columns(3) is layout
