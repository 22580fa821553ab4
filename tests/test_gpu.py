"""GPU checks (marker ``gpu``): they skip without CUDA (and, for FP8, without Transformer Engine and an
FP8-capable GPU), so CI on CPU reports them as skipped. On a GPU machine, with the throughput
benchmark, in one command:

    bash scripts/gpu_checks.sh            # = pytest -m gpu tests/test_gpu.py + benchmarks/gpu_student_step.py

None of this project's CPU tests depend on them. No GPU has been lent to this project so far, so they
have not been run yet (BENCHMARKS.md records GPU numbers when one is).
"""

from __future__ import annotations

import pytest
import torch

from opdlm_megatron.model.masks import opd_training_batch
from opdlm_megatron.model.build import attention_mask, build_model
from tests.distributed.student_data import synthetic_rollout
from tests.helpers import tiny_config

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fp8_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE) and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(not _fp8_ready(), reason="needs Transformer Engine and a GPU with FP8 (sm_89+)")


@pytest.fixture
def cuda_runtime():
    from opdlm_megatron.runtime.platform import initialize_runtime

    with initialize_runtime(device="cuda", seed=3) as rt:
        yield rt


def _opd_inputs(config, device):
    r = synthetic_rollout(config.vocab_size, config.block_size, batch_size=2, seed=4)
    xt = torch.where(torch.rand(r.answer_ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5,
                     torch.full_like(r.answer_ids, config.mask_token_id), r.answer_ids)
    opd = opd_training_batch(r.prompt_ids, r.prompt_valid, r.answer_ids, xt, r.answer_valid, config.block_size)
    return opd.input_ids.to(device), opd.layout.to(device)


@needs_cuda
def test_flex_attention_equals_dense_on_the_opd_layout(cuda_runtime):
    dense_cfg = tiny_config(params_dtype="bfloat16")
    flex_cfg = dense_cfg.replace(attention_backend="flex")
    torch.manual_seed(0)
    dense = build_model(dense_cfg, "student").eval()
    flex = build_model(flex_cfg, "student").eval()
    flex.load_state_dict(dense.state_dict(), strict=False)
    ids, layout = _opd_inputs(dense_cfg, cuda_runtime.device)
    with torch.no_grad():
        a = dense(ids, layout.position_ids, attention_mask(dense_cfg, layout))
        b = flex(ids, layout.position_ids, attention_mask(flex_cfg, layout))
    valid = layout.valid
    torch.testing.assert_close(b[valid].float(), a[valid].float(), rtol=2e-2, atol=2e-2)


@needs_fp8
def test_fp8_teacher_stays_close_to_bf16(cuda_runtime):
    """The same TE teacher with FP8 GEMMs (first/last layer BF16) against BF16: mean KL per token."""
    from opdlm_megatron.config.precision import PrecisionConfig

    cfg = tiny_config(params_dtype="bfloat16", transformer_impl="transformer_engine", hidden_size=128,
                      ffn_hidden_size=256, num_layers=4)
    torch.manual_seed(0)
    bf16 = build_model(cfg, "teacher")
    fp8 = build_model(cfg, "teacher", **PrecisionConfig(fp8="e4m3").transformer_overrides(cfg.num_layers))
    fp8.load_state_dict(bf16.state_dict(), strict=False)
    ids = torch.randint(3, cfg.vocab_size, (16, 64), device=cuda_runtime.device)
    pos = torch.arange(64, device=ids.device)[None].expand(16, -1)
    mask = ~torch.ones(64, 64, dtype=torch.bool, device=ids.device).tril()[None, None]
    with torch.no_grad():
        p = torch.log_softmax(bf16(ids, pos, mask).float(), -1)
        q = torch.log_softmax(fp8(ids, pos, mask).float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert float(kl) < 0.05, f"FP8 teacher KL to BF16: {float(kl):.4f} nats/token"


def _twenty_steps(tmp_path, name: str, precision: dict, transformer_impl: str = "transformer_engine",
                  device: str = "cuda"):
    """Losses of 20 masked-diffusion steps of a random TE student on fixed data (no rollouts: the two
    runs see identical batches, so only the arithmetic differs)."""
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.training.config_files import train_config_from_dict
    from opdlm_megatron.training.trainer import Trainer
    from tests.distributed.train_common import tiny_train_dict, write_token_prompts

    data = write_token_prompts(str(tmp_path / "data.jsonl"), num=16)
    model_config = dict(num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                        vocab_size=250, max_sequence_length=128, eos_token_ids=[2], block_size=4,
                        transformer_impl=transformer_impl, params_dtype="bfloat16" if device == "cuda" else "float32")
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / name), data, "", objective="mdlm", train=dict(steps=20, global_batch_size=4, micro_batch_size=2),
        model=dict(random_init=True, model_config=model_config, student_precision=precision),
        parallel=dict(device=device), rollout=dict(tasks_per_rollout=4), optim=dict(lr=1e-3, min_lr=1e-4, warmup_steps=2),
        checkpoint=dict(resume=False, save_every=0)))
    with initialize_runtime(device=device, seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt)
        history = trainer.fit()
        trainer.close()
    return [h["loss"] for h in history]


@needs_fp8
def test_fp8_student_loss_tracks_bf16_over_20_steps(tmp_path):
    bf16 = _twenty_steps(tmp_path, "bf16", {})
    fp8 = _twenty_steps(tmp_path, "fp8", {"fp8": "hybrid", "fp8_recipe": "tensorwise"})
    relative = [abs(a - b) / abs(a) for a, b in zip(bf16, fp8)]
    print("bf16", [round(x, 4) for x in bf16], "\nfp8 ", [round(x, 4) for x in fp8])
    assert len(bf16) == len(fp8) == 20
    assert bf16[-1] < bf16[0] and fp8[-1] < fp8[0], "neither run learned"
    assert sum(relative) / len(relative) < 0.02 and max(relative) < 0.05, relative


@needs_cuda
@pytest.mark.parametrize("impl,backend", [("local", "dense"), ("local", "flex"), ("transformer_engine", "dense"),
                                          ("transformer_engine", "flex")])
def test_activation_count_on_gpu(cuda_runtime, impl, backend):
    """The planner's activation count against the bytes the student keeps for backward on the GPU (the
    CPU test covers the local spec; TE's fused norm + linear and FlexAttention are checked here)."""
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine")
    from tests.test_plan import measure_activations

    for name in ("smollm2_bf16", "qwen3_like"):
        measured, estimate = measure_activations(name, None, 64, 128, 2, transformer_impl=impl,
                                                 attention_backend=backend, params_dtype="bfloat16")
        print(f"{name} {impl} {backend}: estimate / measured = {estimate / measured:.3f}")
        assert estimate == pytest.approx(measured, rel=0.15), (name, estimate, measured)


@needs_cuda
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_causal_kernel_teacher_equals_the_arbitrary_mask(cuda_runtime, impl):
    """The scoring teacher on megatron's causal mask type (TE: fused causal attention) gives the logits of
    the arbitrary-mask teacher on left-padded prompts and right-padded answers."""
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine")
    from megatron.core.transformer.enums import AttnMaskType

    from opdlm_megatron.distill.teacher import FrozenTeacher

    cfg = tiny_config(params_dtype="bfloat16", transformer_impl=impl, hidden_size=128, ffn_hidden_size=256)
    torch.manual_seed(0)
    arbitrary = build_model(cfg, "teacher")
    causal = build_model(cfg, "teacher", attn_mask_type=AttnMaskType.causal)
    causal.load_state_dict(arbitrary.state_dict(), strict=False)
    r = synthetic_rollout(cfg.vocab_size, cfg.block_size, batch_size=4, prompt_len=24, answer_len=40, seed=2)
    args = (r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid, 2)
    a = FrozenTeacher(arbitrary, cfg, cfg).answer_logits(*args)
    b = FrozenTeacher(causal, cfg, cfg).answer_logits(*args)
    torch.testing.assert_close(b[r.answer_valid].float(), a[r.answer_valid].float(), rtol=2e-2, atol=2e-2)
