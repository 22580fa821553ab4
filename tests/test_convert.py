"""HF <-> Megatron conversion of tiny random Llama / Mistral / Qwen2 / Qwen3 models, in process.

References are independent of the converter: HF transformers logits of the original model, and
the original safetensors files themselves (round trips must be bit-exact in fp32).
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.config.model import ModelConfig
from opdlm_megatron.tools.convert_hf_to_megatron import TOKENIZER_SUBDIR, convert
from opdlm_megatron.tools.convert_megatron_to_hf import export
from tests.distributed.convert_common import (
    TINY_MODELS,
    VOCAB,
    hf_logits,
    make_tiny_hf,
    max_valid_diff,
    megatron_logits,
    sample_batch,
)


COMMON_QWEN3 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
                    rms_norm_eps=1e-5, eos_token_id=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    tie_word_embeddings=False)


def read_safetensors(directory: str) -> dict:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(directory, name)))
    return tensors


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """name -> (HF dir, HF model, HF logits on the shared batch)."""
    root = tmp_path_factory.mktemp("hf")
    batch = sample_batch()
    out = {}
    for name in TINY_MODELS:
        directory = str(root / name)
        model = make_tiny_hf(name, directory)
        out[name] = (directory, model, hf_logits(model, batch))
    return out


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tp1_logits_match_hf(tiny_models, tmp_path, runtime, name):
    hf_dir, _, expected = tiny_models[name]
    convert(hf_dir, str(tmp_path / "ckpt"))
    model, config = build_from_checkpoint(str(tmp_path / "ckpt"), "teacher")
    batch = sample_batch()
    got = megatron_logits(model, config, batch)
    assert got.shape == expected.shape
    assert max_valid_diff(got, expected, batch["valid"]) <= 1e-4


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_round_trip_is_bitwise(tiny_models, tmp_path, name):
    """Every conversion appends an initialised [MASK] row; exported without it (--mask-token drop)
    the checkpoint is the original, bit for bit."""
    hf_dir = tiny_models[name][0]
    convert(hf_dir, str(tmp_path / "ckpt"))
    export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), max_shard_size=20_000,  # several shards + index
           include_mask_token=False)
    original, exported = read_safetensors(hf_dir), read_safetensors(str(tmp_path / "hf"))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    with open(os.path.join(hf_dir, "config.json")) as f:
        before = json.load(f)
    with open(tmp_path / "hf" / "config.json") as f:
        after = json.load(f)
    for key, value in before.items():
        assert after[key] == value, key
    assert after["opdlm_block_size"] == 4 and "opdlm_mask_token_id" not in after


def test_config_records_hf_settings(tiny_models, tmp_path):
    config = convert(tiny_models["qwen3_qknorm_tied"][0], str(tmp_path / "q3"))
    assert (config.qk_layernorm, config.add_qkv_bias, config.tie_word_embeddings) == (True, False, True)
    assert config.head_dim == 32 and config.query_groups == 2 and config.norm_epsilon == 1e-5
    assert config.mask_token_id == VOCAB and config.eos_token_ids == [2]
    assert ModelConfig.load(str(tmp_path / "q3")) == config
    config = convert(tiny_models["llama_gqa_untied_llama3rope"][0], str(tmp_path / "l3"))
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_scaling["factor"] == 8.0
    assert config.rotary_base == 10000.0 and not config.tie_word_embeddings
    # Mistral's sliding window (64 < 128 positions) caps the sequence length instead of being ignored
    assert convert(tiny_models["mistral_gqa_window"][0], str(tmp_path / "m")).max_sequence_length == 64


def test_mask_token_student_round_trip(tiny_models, tmp_path):
    """--add-mask-token: [MASK] rows are the mean rows; the export keeps them and records the student
    settings; HF loads it; converting it back and exporting again reproduces it bit for bit."""
    from transformers import AutoModelForCausalLM

    hf_dir, _, expected = tiny_models["llama_gqa_untied_llama3rope"]
    original = read_safetensors(hf_dir)
    config = convert(hf_dir, str(tmp_path / "ckpt"), add_mask_token=True, block_size=8, logit_shift=True)
    assert config.mask_token_id == VOCAB and config.model_vocab_size == VOCAB + 1
    export(str(tmp_path / "ckpt"), str(tmp_path / "hf1"))
    first = read_safetensors(str(tmp_path / "hf1"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert first[key].shape == (VOCAB + 1, 64)
        assert torch.equal(first[key][:VOCAB], original[key])
        mean = original[key].double().mean(0).float()
        assert torch.allclose(first[key][VOCAB], mean, atol=1e-7), key

    with open(tmp_path / "hf1" / "config.json") as f:
        hf_config = json.load(f)
    assert hf_config["vocab_size"] == VOCAB + 1
    assert hf_config["opdlm_mask_token_id"] == VOCAB and hf_config["opdlm_tokenizer_vocab_size"] == VOCAB
    assert hf_config["opdlm_block_size"] == 8 and hf_config["opdlm_logit_shift"] is True

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf1")).eval()
    batch = sample_batch()
    logits = hf_logits(reloaded, batch)
    assert logits.shape[-1] == VOCAB + 1
    assert max_valid_diff(logits[..., :VOCAB], expected, batch["valid"]) <= 1e-5

    back = convert(str(tmp_path / "hf1"), str(tmp_path / "ckpt2"))
    assert (back.vocab_size, back.mask_token_id, back.block_size, back.logit_shift) == (VOCAB, VOCAB, 8, True)
    export(str(tmp_path / "ckpt2"), str(tmp_path / "hf2"))
    second = read_safetensors(str(tmp_path / "hf2"))
    assert sorted(second) == sorted(first) and all(torch.equal(second[k], first[k]) for k in first)
    with open(tmp_path / "hf2" / "config.json") as f:
        assert json.load(f) == hf_config
    # without the row: the plain export drops [MASK] again
    export(str(tmp_path / "ckpt2"), str(tmp_path / "hf3"), include_mask_token=False)
    assert torch.equal(read_safetensors(str(tmp_path / "hf3"))["lm_head.weight"], original["lm_head.weight"])


def test_dtype_and_tokenizer_files(tiny_models, tmp_path):
    hf_dir = tiny_models["qwen2_gqa_bias"][0]
    tokenizer = {"tokenizer.json": "{}", "tokenizer_config.json": '{"chat_template": "x"}',
                 "special_tokens_map.json": "{}", "chat_template.jinja": "{{ messages }}"}
    copy = tmp_path / "with_tok"
    copy.mkdir()
    for name in os.listdir(hf_dir):
        (copy / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
    for name, text in tokenizer.items():
        (copy / name).write_text(text)
    config = convert(str(copy), str(tmp_path / "ckpt"), dtype="bf16")
    assert config.params_dtype == "bfloat16"
    for name, text in tokenizer.items():
        assert (tmp_path / "ckpt" / TOKENIZER_SUBDIR / name).read_text() == text
    assert (tmp_path / "ckpt" / TOKENIZER_SUBDIR / "generation_config.json").exists()
    export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), include_mask_token=False)
    exported = read_safetensors(str(tmp_path / "hf"))
    for key, tensor in read_safetensors(hf_dir).items():
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], tensor.to(torch.bfloat16)), key
    for name, text in tokenizer.items():
        assert (tmp_path / "hf" / name).read_text() == text
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


def _word_tokenizer(directory, size: int, mask_token=None):
    """A local word-level HF tokenizer with ``size`` tokens (optionally one of them a mask token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "[UNK]"] + ([mask_token] if mask_token else [])
    words += [f"w{i}" for i in range(size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"mask_token": mask_token} if mask_token else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                 unk_token="[UNK]", **extra)
    hf.save_pretrained(directory)
    assert len(hf) == size


def test_qwen3_layout_reuses_an_unused_row_for_mask(tmp_path, runtime):
    """A Qwen3-shaped checkpoint whose embedding has more rows (320) than its tokenizer has tokens
    (300), like Qwen3's 151,936 rows for 151,669 tokens: [MASK] takes the first unused row (300), is
    initialised to the mean of the 300 token rows, rows 300..319 are never sampled, and the export
    round-trips unchanged (everything but the [MASK] row is the original)."""
    import transformers

    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine

    hf_dir = tmp_path / "qwen3"
    config = transformers.Qwen3Config(**{**COMMON_QWEN3, "vocab_size": 320})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.15 * torch.randn_like(param))
        model.lm_head.weight[301:] = 5.0 * model.lm_head.weight[301:].sign()  # unused rows that would win greedily
    model.save_pretrained(hf_dir)
    _word_tokenizer(hf_dir, 300)
    original = read_safetensors(str(hf_dir))

    cfg = convert(str(hf_dir), str(tmp_path / "ckpt"))
    assert (cfg.vocab_size, cfg.tokenizer_size, cfg.mask_token_id, cfg.padded_vocab) == (320, 300, 300, 384)
    student, cfg = build_from_checkpoint(str(tmp_path / "ckpt"), "student")
    emb = student.embedding.word_embeddings.weight.detach()
    assert torch.allclose(emb[300], original["model.embed_tokens.weight"][:300].double().mean(0).float(), atol=1e-7)
    assert torch.equal(emb[301:320], original["model.embed_tokens.weight"][301:])
    result = DiffusionRolloutEngine(student, cfg).generate([[5, 6, 7], [8]], DecodeConfig(max_new_tokens=8,
                                                                                       eos_token_ids=[]))
    assert int(result.answer_ids[result.answer_valid].max()) < 300

    export(str(tmp_path / "ckpt"), str(tmp_path / "hf1"))
    first = read_safetensors(str(tmp_path / "hf1"))
    for key, tensor in original.items():
        keep = torch.ones(tensor.shape[0], dtype=torch.bool) if tensor.shape[0] != 320 else torch.arange(320) != 300
        assert torch.equal(first[key][keep], tensor[keep]), key
    with open(tmp_path / "hf1" / "config.json") as f:
        exported = json.load(f)
    assert exported["vocab_size"] == 320 and exported["opdlm_mask_token_id"] == 300
    assert exported["opdlm_tokenizer_size"] == 300
    back = convert(str(tmp_path / "hf1"), str(tmp_path / "ckpt2"))
    assert (back.mask_token_id, back.tokenizer_size, back.source["mask_token_initialised"]) == (300, 300, False)
    export(str(tmp_path / "ckpt2"), str(tmp_path / "hf2"))
    second = read_safetensors(str(tmp_path / "hf2"))
    assert all(torch.equal(second[k], first[k]) for k in first)


def test_tokenizer_mask_token_is_kept_and_id_can_be_chosen(tiny_models, tmp_path):
    hf_dir = tmp_path / "with_mask"
    copy = tiny_models["llama_mha_tied"][0]
    hf_dir.mkdir()
    for name in os.listdir(copy):
        (hf_dir / name).write_bytes(open(os.path.join(copy, name), "rb").read())
    _word_tokenizer(hf_dir, VOCAB, mask_token="<mask>")  # id 4
    cfg = convert(str(hf_dir), str(tmp_path / "a"))
    assert cfg.mask_token_id == 4 and not cfg.source["mask_token_initialised"] and cfg.model_vocab_size == VOCAB
    explicit = convert(str(hf_dir), str(tmp_path / "b"), mask_token_id=VOCAB)
    assert explicit.mask_token_id == VOCAB and explicit.source["mask_token_initialised"]
