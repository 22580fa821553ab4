"""Student/teacher GPTModels: logits against an independent plain-torch Llama forward, and the mask
identities of the foundation issue (b=1 == causal, x0 stream == block-causal x0 alone, flex == dense)."""

import pytest
import torch

from opdlm_megatron.model import masks
from opdlm_megatron.model.build import attention_mask, build_model, mask_unused_vocab
from tests.helpers import random_batch, reference_forward, tiny_config


def run(model, config, ids, layout):
    with torch.no_grad():
        return model(ids, layout.position_ids, attention_mask(config, layout))


@pytest.mark.parametrize("kind", ["causal", "block", "bidirectional"])
def test_logits_match_plain_torch_reference(runtime, kind):
    config = tiny_config()
    model = build_model(config, "student").eval()
    batch = random_batch(config, seq_len=18)
    layout = {"causal": masks.causal_layout, "bidirectional": masks.bidirectional_layout}.get(kind)
    layout = layout(batch["valid"]) if layout else masks.block_causal_layout(batch["valid"], 4, batch["prompt_lengths"])
    logits = run(model, config, batch["input_ids"], layout)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    expected = reference_forward(state, config, batch["input_ids"], layout.allowed(), layout.position_ids)
    valid = batch["valid"]
    assert (logits - expected)[valid].abs().max() < 1e-4


def test_block_size_one_is_exactly_causal(runtime):
    config = tiny_config()
    model = build_model(config, "student").eval()
    batch = random_batch(config)
    causal = run(model, config, batch["input_ids"], masks.causal_layout(batch["valid"]))
    block1 = run(model, config, batch["input_ids"], masks.block_causal_layout(batch["valid"], 1))
    assert torch.equal(causal[batch["valid"]], block1[batch["valid"]])


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_x0_stream_of_opd_layout_is_block_causal_x0_alone(runtime, backend):
    config = tiny_config(attention_backend=backend)
    model = build_model(config, "student").eval()
    g = torch.Generator().manual_seed(3)
    prompt_valid = torch.tensor([[True] * 7, [False, False, True, True, True, True, True]])
    answer_valid = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    prompt = torch.randint(0, config.vocab_size, (2, 7), generator=g)
    x0 = torch.randint(0, config.vocab_size, (2, 9), generator=g)
    xt = torch.where(torch.rand(2, 9, generator=g) < 0.5, torch.full_like(x0, config.mask_token_id), x0)
    opd = masks.opd_training_batch(prompt, prompt_valid, x0, xt, answer_valid, config.block_size)
    opd_logits = run(model, config, opd.input_ids, opd.layout)

    # the clean [prompt | x0] sequence alone, block-causal with the answer starting a fresh block
    plain_ids = torch.cat([prompt, x0], 1)
    plain_valid = torch.cat([prompt_valid, answer_valid], 1)
    plain = masks.block_causal_layout(plain_valid, config.block_size, prompt_valid.sum(-1))
    plain_logits = run(model, config, plain_ids, plain)
    clean_cols = slice(0, 16)
    tol = 0 if backend == "dense" else 1e-5
    assert (opd_logits[:, clean_cols] - plain_logits)[plain_valid].abs().max() <= tol

    # each xt block equals a run of [prompt | x0 of earlier blocks | xt of this block]
    for row in range(2):
        for block_start in range(0, int(answer_valid[row].sum()), config.block_size):
            end = min(block_start + config.block_size, int(answer_valid[row].sum()))
            p = int(prompt_valid[row].sum())
            ids = torch.cat([prompt[row, -p:], x0[row, :block_start], xt[row, block_start:end]])[None]
            lay = masks.block_causal_layout(torch.ones_like(ids, dtype=torch.bool), config.block_size, torch.tensor([p]))
            alone = run(model, config, ids, lay)[0, -(end - block_start):]
            cols = opd.xt_columns[row, block_start:end]
            assert (opd_logits[row, cols] - alone).abs().max() < 1e-4


def test_flex_backend_equals_dense_backend(runtime):
    dense_config = tiny_config()
    dense = build_model(dense_config, "student").eval()
    flex_config = dense_config.replace(attention_backend="flex")
    flex = build_model(flex_config, "student").eval()
    flex.load_state_dict(dense.state_dict())
    batch = random_batch(dense_config, seq_len=20)
    layout = masks.block_causal_layout(batch["valid"], 4, batch["prompt_lengths"])
    a = run(dense, dense_config, batch["input_ids"], layout)
    b = run(flex, flex_config, batch["input_ids"], layout)
    assert (a - b)[batch["valid"]].abs().max() < 1e-5


def test_row_alone_equals_row_in_padded_batch(runtime):
    config = tiny_config()
    model = build_model(config, "student").eval()
    batch = random_batch(config)
    layout = masks.block_causal_layout(batch["valid"], 4, batch["prompt_lengths"])
    together = run(model, config, batch["input_ids"], layout)
    for row in range(batch["input_ids"].shape[0]):
        valid = batch["valid"][row]
        ids = batch["input_ids"][row, valid][None]
        alone_layout = masks.block_causal_layout(torch.ones_like(ids, dtype=torch.bool), 4, batch["prompt_lengths"][row:row + 1])
        alone = run(model, config, ids, alone_layout)[0]
        assert (alone - together[row, valid]).abs().max() < 1e-5


def test_vocab_padding_and_mask_token(runtime):
    config = tiny_config(vocab_size=250)
    assert config.mask_token_id == 250 and config.model_vocab_size == 251
    assert config.padded_vocab_size(1) == 256 and config.padded_vocab_size(2) == 256 and config.padded_vocab_size(3) == 384
    model = build_model(config, "student")
    assert model.embedding.word_embeddings.weight.shape[0] == 256
    logits = torch.zeros(2, 256)
    masked = mask_unused_vocab(logits, config)
    assert torch.isinf(masked[:, 250:]).all() and torch.isfinite(masked[:, :250]).all()
    assert torch.isfinite(mask_unused_vocab(logits, config, exclude_mask_token=False)[:, 250]).all()


def test_teacher_is_frozen(runtime):
    teacher = build_model(tiny_config(), "teacher")
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_position_beyond_max_length_raises(runtime):
    config = tiny_config(max_sequence_length=16)
    model = build_model(config, "student")
    ids = torch.zeros(1, 4, dtype=torch.long)
    layout = masks.causal_layout(torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_sequence_length"):
        model(ids, layout.position_ids + 14, attention_mask(config, layout))


def test_no_mask_spec_equals_bidirectional_mask(runtime):
    """AttnMaskType.no_mask (full bidirectional, no padding, no mask tensor) == the dense bidirectional mask."""
    from megatron.core.transformer.enums import AttnMaskType

    config = tiny_config()
    dense = build_model(config, "student").eval()
    unmasked = build_model(config, "student", attn_mask_type=AttnMaskType.no_mask).eval()
    unmasked.load_state_dict(dense.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    layout = masks.bidirectional_layout(torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        expected = dense(ids, layout.position_ids, attention_mask(config, layout))
        got = unmasked(ids, layout.position_ids, None)
    assert (got - expected).abs().max() < 1e-5


def test_transformer_engine_spec_without_te_is_a_clear_error(runtime):
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if HAVE_TE:
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(ImportError, match="needs Transformer Engine"):
        build_model(tiny_config(transformer_impl="transformer_engine"))


def test_building_does_not_print_megatrons_gptmodel_notice(runtime, caplog):
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED" on every build; ours stay quiet (README:
    why the project stays on GPTModel), and the filter is gone afterwards."""
    import logging

    from opdlm_megatron.model.build import build_model
    from tests.helpers import tiny_config

    with caplog.at_level(logging.WARNING):
        build_model(tiny_config(), "student")
    assert not [r for r in caplog.records if "GPTModel IS DEPRECATED" in r.getMessage()]
    assert not logging.getLogger("megatron.core.models.gpt.gpt_model").filters
