"""The HF <-> Megatron correspondence at the tensor and config level (no model, no files):
QKV per-group interleave and fc1 [gate; up] per TP rank against naive loops, Transformer Engine
parameter names, config translation and its errors."""

import pytest
import torch

from opdlm_megatron.config.model import ModelConfig
from opdlm_megatron.tools.hf_mapping import (
    ConversionError,
    check_hf_tensors,
    expected_hf_shapes,
    hf_config_from_model_config,
    hf_tensors,
    mapping_for,
    megatron_shard,
    model_config_from_hf,
    model_mappings,
)

HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, VOCAB = 16, 6, 2, 4, 12, 10


def config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                num_query_groups=GROUPS, kv_channels=HEAD_DIM, vocab_size=VOCAB, make_vocab_size_divisible_by=4)
    base.update(overrides)
    return ModelConfig(**base)


def random_hf_state(cfg: ModelConfig) -> dict:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in expected_hf_shapes(cfg, VOCAB).items()}


def reader(state: dict):
    def read(name, dim, start, end):
        return state[name] if start is None and end is None else state[name].narrow(dim, start, end - start)

    return read


def naive_qkv_rows(q, k, v, groups, tp, rank):
    """Megatron's fused layout of one TP rank written out head by head."""
    per_group = q.shape[0] // HEAD_DIM // groups
    rows = []
    for g in range(rank * groups // tp, (rank + 1) * groups // tp):
        for head in range(g * per_group, (g + 1) * per_group):
            rows += [q[head * HEAD_DIM + i] for i in range(HEAD_DIM)]
        rows += [k[g * HEAD_DIM + i] for i in range(HEAD_DIM)]
        rows += [v[g * HEAD_DIM + i] for i in range(HEAD_DIM)]
    return torch.stack(rows)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_interleave_per_query_group(tp, bias):
    cfg = config(add_qkv_bias=True)
    state = random_hf_state(cfg)
    suffix = "bias" if bias else "weight"
    mapping = mapping_for(cfg, f"decoder.layers.1.self_attention.linear_qkv.{suffix}")
    q, k, v = (state[f"model.layers.1.self_attn.{p}_proj.{suffix}"] for p in "qkv")
    shards = [megatron_shard(cfg, mapping, reader(state), r, tp, 12, VOCAB) for r in range(tp)]
    for rank, shard in enumerate(shards):
        assert torch.equal(shard, naive_qkv_rows(q, k, v, GROUPS, tp, rank))
    back = hf_tensors(cfg, mapping, torch.cat(shards), VOCAB)
    assert all(torch.equal(back[name], state[name]) for name in mapping.hf)


def test_fc1_gate_up_and_row_parallel_shards_per_rank():
    cfg = config()
    state = random_hf_state(cfg)
    gate, up = state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    fc1 = mapping_for(cfg, "decoder.layers.0.mlp.linear_fc1.weight")
    for rank in range(2):
        shard = megatron_shard(cfg, fc1, reader(state), rank, 2, 12, VOCAB)
        half = FFN // 2
        assert torch.equal(shard[:half], gate[rank * half:(rank + 1) * half])
        assert torch.equal(shard[half:], up[rank * half:(rank + 1) * half])
    full = megatron_shard(cfg, fc1, reader(state), 0, 1, 12, VOCAB)
    assert torch.equal(full, torch.cat([gate, up]))
    proj = mapping_for(cfg, "decoder.layers.0.self_attention.linear_proj.weight")
    o = state["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(megatron_shard(cfg, proj, reader(state), 1, 2, 12, VOCAB), o[:, 12:])


def test_vocab_rows_padding_and_mask_row():
    cfg = config(tie_word_embeddings=False)
    state = random_hf_state(cfg)
    emb = mapping_for(cfg, "embedding.word_embeddings.weight")
    mean = torch.full((HIDDEN,), 7.0)
    shards = [megatron_shard(cfg, emb, reader(state), r, 2, 16, VOCAB, lambda name: mean) for r in range(2)]
    full = torch.cat(shards)
    assert full.shape == (16, HIDDEN)
    assert torch.equal(full[:VOCAB], state["model.embed_tokens.weight"])
    assert torch.equal(full[VOCAB], mean)  # mask_token_id defaults to VOCAB
    assert not full[VOCAB + 1:].any()  # padding rows are zero
    no_mask = torch.cat([megatron_shard(cfg, emb, reader(state), r, 2, 16, VOCAB) for r in range(2)])
    assert not no_mask[VOCAB:].any()
    assert torch.equal(hf_tensors(cfg, emb, full, VOCAB)["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    # a tied model's last pipeline stage holds its own copy of the output layer: it reads the embedding
    tied = config(tie_word_embeddings=True)
    assert mapping_for(tied, "output_layer.weight").hf == ("model.embed_tokens.weight",)
    assert "lm_head.weight" not in expected_hf_shapes(tied, VOCAB)


def test_transformer_engine_names():
    """TE fuses the pre-attention / pre-MLP RMSNorms into linear_qkv / linear_fc1."""
    local, te = config(qk_layernorm=True), config(qk_layernorm=True, transformer_impl="transformer_engine")
    te_names = {m.megatron for m in model_mappings(te)}
    for layer in range(2):
        p = f"decoder.layers.{layer}."
        assert p + "self_attention.linear_qkv.layer_norm_weight" in te_names
        assert p + "mlp.linear_fc1.layer_norm_weight" in te_names
        assert p + "input_layernorm.weight" not in te_names and p + "pre_mlp_layernorm.weight" not in te_names
        assert {p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"} <= te_names
    assert mapping_for(te, "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight").hf == (
        "model.layers.1.input_layernorm.weight",)
    assert mapping_for(te, "decoder.layers.0.mlp.linear_fc1.layer_norm_weight").hf == (
        "model.layers.0.post_attention_layernorm.weight",)
    assert len(te_names) == len(model_mappings(local))
    # full round trip through the TE names
    state = random_hf_state(te)
    back = {}
    for mapping in model_mappings(te):
        shard = megatron_shard(te, mapping, reader(state), 0, 1, 12, VOCAB)
        back.update(hf_tensors(te, mapping, shard, VOCAB))
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConversionError, match="decoder.layers.0.input_layernorm.weight"):
        mapping_for(te, "decoder.layers.0.input_layernorm.weight")


def llama_hf(**overrides) -> dict:
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=250,
              max_position_embeddings=128, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False)
    hf.update(overrides)
    return hf


def test_config_translation():
    legacy = model_config_from_hf(llama_hf(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    assert legacy.rotary_base == 5e5 and legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    modern = model_config_from_hf(llama_hf(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert modern.rotary_base == 1e6 and modern.rope_scaling is None
    eos = model_config_from_hf(llama_hf(eos_token_id=2, pad_token_id=5), {"eos_token_id": [7, 2]})
    assert eos.eos_token_ids == [7, 2] and eos.pad_token_id == 5
    qwen2 = model_config_from_hf(llama_hf(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                          sliding_window=32, use_sliding_window=False))
    assert qwen2.add_qkv_bias and qwen2.max_sequence_length == 128  # window not in use
    exported = hf_config_from_model_config(model_config_from_hf(llama_hf()), "bf16")
    # every conversion appends an initialised [MASK] (no tokenizer here), exported with the student
    assert exported["dtype"] == "bfloat16" and exported["vocab_size"] == 251 and exported["opdlm_mask_token_id"] == 250
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["opdlm_block_size"] == 4
    synthesized = hf_config_from_model_config(config(qk_layernorm=True))
    assert synthesized["architectures"] == ["Qwen3ForCausalLM"] and synthesized["head_dim"] == HEAD_DIM


@pytest.mark.parametrize("change,message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "unsupported rope scaling type 'yarn'"),
    (dict(attention_bias=True), "attention_bias=True is not supported for LlamaForCausalLM"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
])
def test_config_errors(change, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        model_config_from_hf(llama_hf(**change))


def test_tensor_checks_name_the_bad_tensor():
    cfg = config()
    shapes = expected_hf_shapes(cfg, VOCAB)
    check_hf_tensors(cfg, shapes, [VOCAB])
    with pytest.raises(ConversionError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \[11, 16\].*\[12, 16\]"):
        check_hf_tensors(cfg, {**shapes, "model.layers.1.mlp.up_proj.weight": (11, 16)}, [VOCAB])
    with pytest.raises(ConversionError, match="missing tensor 'model.norm.weight'"):
        check_hf_tensors(cfg, {k: v for k, v in shapes.items() if k != "model.norm.weight"}, [VOCAB])
    with pytest.raises(ConversionError, match="does not use.*model.layers.2.mlp.up_proj.weight"):
        check_hf_tensors(cfg, {**shapes, "model.layers.2.mlp.up_proj.weight": (12, 16)}, [VOCAB])
    with pytest.raises(ConversionError, match="'model.embed_tokens.weight' has 10 rows but the config implies 11"):
        check_hf_tensors(cfg, shapes, [VOCAB + 1])
    check_hf_tensors(cfg, {**shapes, "model.layers.0.self_attn.rotary_emb.inv_freq": (2,)}, [VOCAB])


def test_mask_token_placement():
    """place_mask_token: explicit id, a recorded (trained) id, the tokenizer's own mask token, the
    first unused row (Qwen3-style layouts), else appended; whether the row must be initialised."""
    from opdlm_megatron.tools.hf_mapping import place_mask_token

    assert place_mask_token(151936, 151669, None, None, None) == (151669, True)  # Qwen3: first unused row
    assert place_mask_token(49152, None, None, None, None) == (49152, True)  # appended
    assert place_mask_token(300, None, 7, None, None) == (7, False)  # the tokenizer's own [MASK] is kept
    assert place_mask_token(320, 300, None, 310, None) == (310, False)  # recorded by an OPDLM export: trained
    assert place_mask_token(320, 300, None, None, 315) == (315, True)  # --mask-token-id: an unused row
    assert place_mask_token(320, 300, None, None, 320) == (320, True)  # or appended
    with pytest.raises(ConversionError, match="--mask-token-id 12 is a real token of the tokenizer"):
        place_mask_token(320, 300, None, None, 12)
    with pytest.raises(ConversionError, match="--mask-token-id 400 is outside the vocabulary"):
        place_mask_token(320, 300, None, None, 400)
    qwen3 = model_config_from_hf(llama_hf(vocab_size=320), tokenizer_size=300)
    assert (qwen3.vocab_size, qwen3.tokenizer_size, qwen3.mask_token_id, qwen3.model_vocab_size) == (320, 300, 300, 320)
    assert qwen3.source["mask_token_initialised"] and not qwen3.source["mask_token_added"]
    # ids >= 300 (unused rows) and [MASK] are never sampled or supervised; a real token is
    unused = qwen3.unused_token_mask(0, 384)
    assert not unused[:300].any() and unused[300:].all()
