"""The fused decoding forward (``rollout/fused_forward.py``) against megatron-core's own forward.

The reference is the megatron GPTModel forward on the same parameters (its linears, core attention,
RoPE and bias-dropout-add), on left-padded rows under a block-causal mask, for several
architectures; the engine then decodes the same tokens through either forward. TP=2 / PP=2 are in
``test_rollout_parallel.py`` (the fused forward at TP=2 / PP=2 against megatron's at TP=1).
"""

from __future__ import annotations

import pytest
import torch

from opdlm_megatron.model import masks
from opdlm_megatron.model.build import build_model
from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
from opdlm_megatron.rollout.fused_forward import SMALL_CPU_ROWS, FusedDecodeForward, project, unsupported_reason
from tests.helpers import tiny_config

ARCHITECTURES = {
    "llama_gqa": dict(),
    "qk_norm_qkv_bias_untied": dict(qk_layernorm=True, add_qkv_bias=True, tie_word_embeddings=False),
    "layernorm_gelu_bias_partial_rope": dict(normalization="LayerNorm", activation="gelu", add_bias_linear=True,
                                              rotary_percent=0.5, num_query_groups=4),
}


def _model(overrides, seed=3):
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    model = build_model(config, "student", init_method_std=0.3)
    if config.add_bias_linear or config.add_qkv_bias:  # megatron zero-initialises biases: make them matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.2)
    model.eval()
    return model, config


def _batch(config, rows=3, length=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (rows, length), generator=g)
    lengths = torch.tensor([length, length - 5, length - 9])[:rows]
    valid = torch.arange(length)[None] >= (length - lengths)[:, None]
    layout = masks.block_causal_layout(valid, config.block_size, torch.clamp(lengths - 6, min=1))
    return ids, layout


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fused_logits_match_megatron_forward(runtime, arch):
    model, config = _model(ARCHITECTURES[arch])
    ids, layout = _batch(config)
    mask = layout.dense_mask()
    with torch.no_grad():
        expected = model(ids, layout.position_ids, mask)  # [B, S, V]
    got = FusedDecodeForward(model)(ids, layout.position_ids, mask)
    valid = layout.valid
    assert torch.isfinite(got).all(), "padding queries (fully masked rows) must stay finite"
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)  # fp32 rounding
    # the output layer on chosen columns only equals the same columns of the full output
    columns = torch.tensor([[13, 2, 7], [13, 12, 11], [5, 13, 9]])
    picked = FusedDecodeForward(model)(ids, layout.position_ids, mask, columns)
    torch.testing.assert_close(picked, got.gather(1, columns[..., None].expand(-1, -1, got.shape[-1])))


@pytest.mark.parametrize("rows", [1, 5, SMALL_CPU_ROWS, SMALL_CPU_ROWS + 1, 300])
def test_project_equals_a_float64_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 2, 48, generator=g), torch.randn(70, 48, generator=g)
    expected = (x.double() @ weight.double().t()).float()
    torch.testing.assert_close(project(x, weight), expected, rtol=1e-5, atol=1e-4)
    assert project(x, weight).shape == (rows, 2, 70)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_engine_decodes_the_same_through_either_forward(runtime, arch):
    model, config = _model(ARCHITECTURES[arch])
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 30, 40, 50, 60, 70, 80, 90, 100, 110]]
    for decode in (DecodeConfig(max_new_tokens=12, threshold=0.5),
                   DecodeConfig(max_new_tokens=12, temperature=1.0, seed=2, threshold=0.3)):
        fused = DiffusionRolloutEngine(model, config, forward_impl="fused")
        reference = DiffusionRolloutEngine(model, config, forward_impl="megatron")
        assert fused.forward_impl == "fused" and reference.forward_impl == "megatron"
        a, b = fused.generate(prompts, decode), reference.generate(prompts, decode)
        assert torch.equal(a.answer_ids, b.answer_ids) and torch.equal(a.commit_step, b.commit_step)
        assert a.num_forward_passes == b.num_forward_passes


def test_unsupported_models_fall_back_or_fail_clearly(runtime):
    config = tiny_config()
    model = build_model(config, "student", fp32_residual_connection=True)
    assert unsupported_reason(model) == "fp32 residual connection"
    assert DiffusionRolloutEngine(model, config).forward_impl == "megatron"  # auto falls back
    with pytest.raises(ValueError, match="forward_impl='fused' cannot run this model: fp32 residual connection"):
        DiffusionRolloutEngine(model, config, forward_impl="fused")
    with pytest.raises(ValueError, match="forward_impl must be one of"):
        DiffusionRolloutEngine(model, config, forward_impl="compiled")
    # and the fallback still decodes
    result = DiffusionRolloutEngine(model, config).generate([[5, 6, 7]], DecodeConfig(max_new_tokens=4))
    assert result.answer_ids.shape[0] == 1


def test_fused_forward_sees_weight_updates(runtime):
    """It reads the live parameters (no copy): after an in-place update its logits follow."""
    model, config = _model({})
    ids, layout = _batch(config, rows=1)
    fused = FusedDecodeForward(model)
    before = fused(ids, layout.position_ids, layout.dense_mask())
    with torch.no_grad():
        model.decoder.layers[0].mlp.linear_fc2.weight.mul_(1.5)
    after = fused(ids, layout.position_ids, layout.dense_mask())
    with torch.no_grad():
        expected = model(ids, layout.position_ids, layout.dense_mask())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
