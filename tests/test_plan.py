"""opdlm-plan: layout checks with one-line errors, and its static memory parts against the tensors a
built trainer really holds (student weights, fp32 main gradients, Adam state, teacher weights)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from opdlm_megatron.config.model import ModelConfig
from opdlm_megatron.planning.plan import plan, stage_parameters
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.config_files import train_config_from_dict
from tests.conftest import REPO_ROOT, run_torchrun
from tests.helpers import save_trainer_student
from tests.distributed.train_common import TINY_MODEL, naive_rollout, tiny_train_dict, write_token_prompts

SMOLLM2 = dict(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
               vocab_size=49152, max_sequence_length=2048, block_size=4)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    ckpt = save_trainer_student(root / "ckpt")
    data = write_token_prompts(str(root / "prompts.jsonl"), num=4)
    return dict(root=root, ckpt=str(ckpt), data=data)


def test_static_parts_equal_the_trainers_tensors(assets, tmp_path):
    from opdlm_megatron.training.trainer import Trainer

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path), assets["data"], assets["ckpt"], train=dict(steps=1),
                                                 checkpoint=dict(resume=False)))
    config = ModelConfig(**TINY_MODEL)
    estimate = plan(cfg, config, world_size=1).parts
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        trainer.fit()
        weights = sum(p.numel() * p.element_size() for p in trainer.student.parameters())
        grads = sum(p.main_grad.numel() * p.main_grad.element_size() for p in trainer.student.parameters())
        adam = sum(t.numel() * t.element_size() for state in trainer.optimizer.optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
        teacher = sum(p.numel() * p.element_size() for p in trainer.teacher.model.parameters())
        trainer.close()
    assert estimate["student weights"] == weights
    assert estimate["student gradients (fp32)"] == grads
    assert estimate["optimizer (Adam)"] == adam
    assert estimate["teacher weights"] == teacher


def test_stage_parameters_split_over_tp_and_pp():
    config = ModelConfig(**SMOLLM2)
    whole = stage_parameters(config, 1, 1)
    assert whole == config.num_parameters()
    assert stage_parameters(config, 3, 1) == pytest.approx(whole / 3, rel=1e-3)
    first = stage_parameters(config, 1, 2)
    vocab = config.padded_vocab_size(1) * config.hidden_size
    assert first == vocab + (whole - vocab - config.hidden_size) // 2


@pytest.mark.parametrize("world,overrides,message", [
    (3, ["parallel.tensor_model_parallel_size=2"], "world size 3 is not a multiple of TP 2 x PP 1"),
    (2, ["parallel.tensor_model_parallel_size=2"], "num_attention_heads 9 is not divisible by tensor parallel size 2"),
    (4, ["parallel.pipeline_model_parallel_size=4"], "num_layers 30 is not divisible by pipeline parallel size 4"),
    (3, ["train.global_batch_size=8", "rollout.tasks_per_rollout=8"], "train.global_batch_size 8 is not a multiple of data-parallel size 3"),
    (1, ["model.student_precision.fp8=hybrid"], "model.student_precision asks for FP8, which needs the Transformer "
                                                "Engine layer spec; the checkpoint has transformer_impl 'local'"),
    (1, ["model.attention_backend=sparse"], "model.attention_backend must be one of"),
])
def test_layout_errors(tmp_path, world, overrides, message):
    model_config = tmp_path / "model"
    ModelConfig(**SMOLLM2).save(str(model_config))
    proc = subprocess.run([sys.executable, "-m", "opdlm_megatron.commands.plan", "--config", str(REPO_ROOT / "configs" / "smollm2_opd.yaml"),
                           "--world-size", str(world), "--model-config", str(model_config), *overrides],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2 and f"opdlm-plan: error: {message}" in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


QWEN3_8B = dict(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32, num_query_groups=8,
                kv_channels=128, vocab_size=151936, tokenizer_size=151669, max_sequence_length=40960,
                qk_layernorm=True, tie_word_embeddings=False, rotary_base=1000000.0, norm_epsilon=1e-6, block_size=4,
                transformer_impl="transformer_engine")  # as converted for FP8 (the config's header)
QWEN3_30B_A3B_HF = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_hidden_layers=48,
    vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, hidden_act="silu", attention_bias=False, torch_dtype="bfloat16", bos_token_id=151643,
    eos_token_id=151645, router_aux_loss_coef=0.001)
QWEN3_30B_A3B = dict(num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4,
                     kv_channels=128, vocab_size=151936, tokenizer_size=151669, max_sequence_length=40960,
                     qk_layernorm=True, tie_word_embeddings=False, rotary_base=1000000.0, norm_epsilon=1e-6,
                     block_size=4, num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768)
SHIPPED = {"smollm2_opd.yaml": (SMOLLM2, 1), "smollm2_opd_long.yaml": (SMOLLM2, 1), "smollm2_opd_families.yaml": (SMOLLM2, 1), "tiny_cpu.yaml": (TINY_MODEL, 1),
           "qwen3_8b_opd_fp8.yaml": (QWEN3_8B, 16), "qwen3_8b_opd_32k.yaml": (QWEN3_8B, 16),
           "qwen3_30b_a3b_opd.yaml": (QWEN3_30B_A3B, 16)}


def test_every_shipped_config_is_checked():
    assert sorted(SHIPPED) == sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config_name", sorted(SHIPPED))
def test_shipped_configs_plan(tmp_path, config_name, capsys):
    """Every shipped config passes the planner on its intended world size (architecture from a config
    file: the checkpoints they name are not on a CI machine; the Qwen3-8B example on 2 nodes x 8 80 GB
    GPUs); a too-small GPU is reported with suggestions (exit 1). In-process (``opdlm-plan``'s main);
    test_layout_errors runs it as a process."""
    from opdlm_megatron.commands import plan

    architecture, world_size = SHIPPED[config_name]
    model_config = tmp_path / "model"
    ModelConfig(**architecture).save(str(model_config))
    base = ["--config", str(REPO_ROOT / "configs" / config_name), "--world-size", str(world_size),
            "--model-config", str(model_config)]
    capsys.readouterr()
    assert plan.main(base + ["--json"]) == 0, capsys.readouterr().err[-1500:]
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["total_bytes"] == pytest.approx(sum(report["parts_bytes"].values()))
    if config_name == "qwen3_8b_opd_fp8.yaml":  # model.student_dtype bfloat16: 2 bytes a weight, fp32 gradients
        parts = report["parts_bytes"]
        assert parts["student weights"] * 2 == parts["student gradients (fp32)"]
    assert plan.main(base + ["--gpu-memory-gb", "0.0001"]) == 1
    tight = capsys.readouterr().out
    assert "does NOT fit" in tight and "try:" in tight


def test_32k_config_plans_from_the_hf_config_json(tmp_path, capsys):
    """configs/qwen3_8b_opd_32k.yaml (32k-token rollouts, ~65k-column OPD rows) on 2 x 8 80 GB GPUs with
    TP 4 + SP x CP 4, planned from Qwen3-8B's HF config.json as the converter maps it: it fits, with
    the activations of a quarter of each row per rank."""
    from opdlm_megatron.commands import plan

    hf = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, intermediate_size=12288,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_hidden_layers=36, vocab_size=151936,
              max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
              hidden_act="silu", attention_bias=False, torch_dtype="bfloat16", bos_token_id=151643,
              eos_token_id=151645)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    base = ["--config", str(REPO_ROOT / "configs" / "qwen3_8b_opd_32k.yaml"), "--world-size", "16",
            "--model-config", str(tmp_path / "config.json"), "--gpu-memory-gb", "80"]
    capsys.readouterr()
    assert plan.main(base) == 0, capsys.readouterr().err[-1500:]
    out = capsys.readouterr().out
    assert "world 16 = TP 4 x PP 1 x CP 4 x DP 1" in out and "sequence parallel, CP 4" in out and "fits" in out
    assert plan.main(base[:-2] + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["total_bytes"] < 80 * 1024 ** 3


def test_moe_config_plans_from_the_hf_config_json(tmp_path, capsys):
    """configs/qwen3_30b_a3b_opd.yaml on 2 x 8 80 GB GPUs, planned from Qwen3-30B-A3B's HF config.json: EP 16 x
    CP 4 fits; each rank holds 8 of every layer's 128 experts (weights counted here from the HF numbers), the
    experts' Adam state unsharded (expert data parallel 1), the dense weights' over the 16 data x context ranks."""
    from opdlm_megatron.commands import plan

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B_HF))
    base = ["--config", str(REPO_ROOT / "configs" / "qwen3_30b_a3b_opd.yaml"), "--world-size", "16",
            "--model-config", str(tmp_path / "config.json")]
    capsys.readouterr()
    assert plan.main(base + ["--gpu-memory-gb", "80"]) == 0, capsys.readouterr().err[-1500:]
    out = capsys.readouterr().out
    assert "world 16 = TP 1 x PP 1 x CP 4 x DP 4 (experts: EP 16 x expert DP 1)" in out and "fits" in out
    assert plan.main(base + ["--json"]) == 0
    parts = json.loads(capsys.readouterr().out)["parts_bytes"]
    hf = QWEN3_30B_A3B_HF
    h, layers, heads, groups, d = (hf[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "head_dim"))
    experts = hf["num_experts"] * 3 * h * hf["moe_intermediate_size"]  # gate, up, down of every expert
    attention = h * (heads + 2 * groups) * d + heads * d * h + 2 * d  # QKV, output projection, QK norms
    per_layer = attention + 2 * h + hf["num_experts"] * h + experts // 16  # two norms, the router, 8 experts
    vocab = (151936 + 128) * h  # [MASK] is id 151936 (the HF vocabulary is full): padded to the next 128
    held = layers * per_layer + 2 * vocab + h  # untied embedding and output layer, final norm
    assert parts["student weights"] == held * 2  # bfloat16
    dense = held - layers * experts // 16
    assert parts["optimizer (Adam, distributed)"] == pytest.approx(12 * (dense / 16 + layers * experts // 16))


# ----------------------------------------------------------------- activations against a real student
ACTIVATION_MODELS = {
    # SmolLM2's layer shape (GQA 9/3, SwiGLU, RMSNorm) in fp32 and bf16; a Qwen3-like layer (QK-norm,
    # head_dim != hidden / heads); a GPT-2-like one (multi-head, GeLU, LayerNorm)
    "smollm2_fp32": dict(hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3),
    "smollm2_bf16": dict(hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                         params_dtype="bfloat16"),
    "qwen3_like": dict(hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2, kv_channels=64,
                       qk_layernorm=True),
    "gpt2_like": dict(hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4, activation="gelu",
                      normalization="LayerNorm"),
}

# mixtures of experts (dropless top-2, megatron's SequentialMLP): fp32 and bf16, experts narrower and wider
# than the dense FFN would be
MOE_ACTIVATION_MODELS = {
    "moe_fp32": dict(hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2, num_experts=4,
                     moe_router_topk=2, moe_ffn_hidden_size=96),
    "moe_bf16": dict(hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2, num_experts=8,
                     moe_router_topk=2, moe_ffn_hidden_size=256, params_dtype="bfloat16"),
}
ACTIVATION_MODELS_ALL = {**ACTIVATION_MODELS, **MOE_ACTIVATION_MODELS}


def _saved_for_backward(plan, model):
    """Bytes autograd keeps for backward over one micro-batch's forward and loss
    (``saved_activation_bytes``); and the micro-batch's supervised tokens. On a pipeline stage
    without the loss, the stage's output tensor stands in."""
    from megatron.core import parallel_state

    from opdlm_megatron.planning.activations import saved_activation_bytes

    mb = plan.microbatches[0]

    def forward_and_loss():
        output, loss_func = plan.forward_microbatch(mb, model)
        return loss_func(output)[0] if parallel_state.is_pipeline_last_stage() else output.float().sum()

    return saved_activation_bytes(model, forward_and_loss), int(mb["slot_valid"].sum())


def measure_activations(name: str, top_k, prompt: int, answer: int, rows: int, sequence_parallel: bool = False,
                        **overrides):
    """(measured, estimated) activation bytes of this rank for one micro-batch of ``rows`` OPD rows of
    the ``ACTIVATION_MODELS[name]`` student (two layers per stage; ``overrides``: other ModelConfig
    fields, e.g. the GPU's transformer_impl / attention_backend), in the current parallel layout.
    ``top_k``: None (full-vocabulary teacher targets), k, or "ids" (cross entropy on the answer)."""
    from megatron.core import parallel_state

    from opdlm_megatron.planning.activations import ActivationShape, activation_bytes
    from opdlm_megatron.model.losses import DivergenceConfig, TeacherTopK
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.objectives.base import SupervisedBatch
    from opdlm_megatron.distill.states import select_states
    from opdlm_megatron.training.student import StudentStepPlan
    from opdlm_megatron.distill.teacher import TeacherTargets
    from tests.distributed.student_data import synthetic_rollout

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = ModelConfig(num_layers=2 * pp, vocab_size=2000, max_sequence_length=1024, block_size=4,
                         **{**ACTIVATION_MODELS_ALL[name], **overrides})
    model = build_model(config, "student", sequence_parallel=sequence_parallel)
    rollout = synthetic_rollout(config.vocab_size, 4, batch_size=rows, prompt_len=prompt, answer_len=answer, seed=3)
    xt = select_states(rollout, "block", torch.Generator().manual_seed(0), config.mask_token_id, block_size=4)
    supervised = (xt == config.mask_token_id) & rollout.answer_valid
    batch = SupervisedBatch(rollout, supervised, supervised, distill=True, layout="opd", xt=xt)
    distill = top_k != "ids"  # "ids": a cross-entropy batch (the answer tokens are the targets)
    top_k = top_k if distill else None
    batch = dataclasses.replace(batch, distill=distill)
    targets = None
    if parallel_state.is_pipeline_last_stage() and distill:
        logits = torch.randn(rows, answer, config.padded_vocab_size(tp) // tp)
        if top_k:
            logits = TeacherTopK.from_logits(logits, top_k)
        targets = TeacherTargets.dense(logits, (rows, answer))
    plan = StudentStepPlan(model, config, batch, targets, DivergenceConfig(top_k=top_k) if distill else None, rows)
    assert plan.seq_length == prompt + 2 * answer
    if not parallel_state.is_pipeline_first_stage():  # what the schedule hands a later stage
        model.set_input_tensor(torch.randn(plan.seq_length, rows, config.hidden_size, dtype=config.torch_dtype,
                                           device=plan.device, requires_grad=True))
    measured, supervised_tokens = _saved_for_backward(plan, model)
    shape = ActivationShape(plan.seq_length, rows, supervised_tokens, tp, top_k, distill, sequence_parallel,
                            parallel_state.get_context_parallel_world_size())
    # stage 0 of a pipeline holds no loss; the last stage's share is measured with one micro-batch in flight
    if parallel_state.is_pipeline_first_stage():
        estimate = activation_bytes(config, shape, pp, num_microbatches=1)
    else:  # the last stage: its layers, the final norm and the loss (as if PP were 1 over its layers)
        estimate = activation_bytes(config.replace(num_layers=config.num_layers // pp), shape, 1)
    return measured, estimate


@pytest.mark.parametrize("name", sorted(ACTIVATION_MODELS_ALL))
@pytest.mark.parametrize("top_k", [None, 16, "ids"])
def test_activation_estimate_within_15_percent_of_what_the_student_keeps(name, top_k):
    """The planner's activation count against the bytes the real megatron-core student (local spec,
    dense attention, CPU) keeps for backward on the OPD layout, two layers, two shapes (measured:
    0.98-0.99 of the kept bytes; mixtures of experts 0.97-1.03)."""
    with initialize_runtime(device="cpu", seed=1):
        for prompt, answer, rows in [(64, 128, 2), (24, 64, 3)]:
            measured, estimate = measure_activations(name, top_k, prompt, answer, rows)
            assert estimate == pytest.approx(measured, rel=0.15), (name, prompt, answer, estimate, measured)


@pytest.mark.distributed
def test_activation_estimate_per_rank_at_tp2_and_pp2(tmp_path):
    """The same at TP=2 (each rank's heads, FFN and vocabulary shard), TP=2 with sequence parallelism
    (norms and linear inputs: the rank's sequence share), PP=2 (stage 0: its layers and the
    embedding; stage 1: its layers, the final norm and the loss) and CP=2 (the rank's columns, keys
    and values of all), every rank within 15% (one torchrun launch for the four layouts)."""
    out = tmp_path / "ratios.json"
    run_torchrun("activation_memory.py", "--out", str(out), "--layouts=tp2,tp2sp,pp2,cp2")
    by_layout = json.loads(out.read_text())
    assert sorted(by_layout) == ["cp2", "pp2", "tp2", "tp2sp"]
    for layout, ratios in by_layout.items():
        models = {key.split()[2] for key in ratios}
        assert models == (set(ACTIVATION_MODELS) if layout in ("pp2", "cp2") else {"gpt2_like", "qwen3_like"}), layout
        assert len(ratios) == 2 * len(models) * 2  # ranks x models x top-k variants
        for key, ratio in ratios.items():
            assert ratio == pytest.approx(1.0, abs=0.15), (layout, key)


def test_activation_estimate_of_packed_states_and_the_plans_row_shape(tmp_path):
    """loss.pack_states: a micro-batch of ``m`` answers with every round of every block is ``m`` rows of
    ``prompt + (1 + block_size) x answer`` columns; the planner's count for that shape is within 15% of
    what the real student keeps for backward, and the plan names that shape (one row per state without it)."""
    from opdlm_megatron.distill.states import all_round_states
    from opdlm_megatron.distill.teacher import TeacherTargets
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.model.losses import DivergenceConfig
    from opdlm_megatron.objectives.base import StateContext, masked_state_batch
    from opdlm_megatron.planning.activations import ActivationShape, activation_bytes
    from opdlm_megatron.rollout.types import RolloutResult
    from opdlm_megatron.training.student import StudentStepPlan

    prompt, answer, answers = 24, 32, 2
    with initialize_runtime(device="cpu", seed=1):
        config = ModelConfig(num_layers=2, vocab_size=2000, max_sequence_length=1024, block_size=4,
                             **ACTIVATION_MODELS["smollm2_fp32"])
        model = build_model(config, "student")
        g = torch.Generator().manual_seed(0)
        rollout = RolloutResult(torch.randint(3, 2000, (answers, prompt), generator=g),
                                torch.ones(answers, prompt, dtype=torch.bool),
                                torch.randint(3, 2000, (answers, answer), generator=g),
                                torch.ones(answers, answer, dtype=torch.bool),
                                torch.arange(answer)[None].repeat(answers, 1),  # one token per round
                                torch.full((answers,), answer), torch.ones(answers, dtype=torch.bool), answer)
        source, xt = all_round_states(rollout, 4, config.mask_token_id)
        ctx = StateContext(mask_token_id=config.mask_token_id, block_size=4, end_of_turn_ids=())
        batch = masked_state_batch(rollout.rows(source, trim=False), xt, ctx, distill=True, groups=source)
        targets = TeacherTargets.dense(torch.randn(batch.batch_size, answer, config.padded_vocab_size(1)),
                                       (batch.batch_size, answer))
        plan_ = StudentStepPlan(model, config, batch, targets, DivergenceConfig(), answers, pack_states=True)
        assert len(plan_.microbatches) == 1 and plan_.seq_length == prompt + 5 * answer
        measured, supervised_tokens = _saved_for_backward(plan_, model)
        assert supervised_tokens == answers * answer * (4 + 3 + 2 + 1) // 4  # round r of a block masks 4 - r slots
        estimate = activation_bytes(config, ActivationShape(plan_.seq_length, answers, supervised_tokens, 1,
                                                            None, True, False, 1), 1, num_microbatches=1)
        assert estimate == pytest.approx(measured, rel=0.15)

    def activation_part(pack_states):
        cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), "unused.jsonl", "unused",
                                                     loss=dict(state_selection="all_rounds", pack_states=pack_states),
                                                     train=dict(micro_batch_size=2, global_batch_size=2),
                                                     curriculum=dict(min_length=32, max_length=32)))
        out = plan(cfg, config, world_size=1, prompt_tokens=24)
        return next(name for name in out.parts if name.startswith("activations"))

    assert activation_part(True).startswith(f"activations ({prompt + 5 * 32} columns x 2 rows")
    assert activation_part(False).startswith(f"activations ({prompt + 2 * 32} columns x 8 rows")
