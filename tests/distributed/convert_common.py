"""Tiny random HF models (Llama, Mistral, Qwen2, Qwen3) and the HF/Megatron logits the conversion
tests compare; shared by tests/test_convert*.py and the torchrun script convert_parallel.py."""

from __future__ import annotations

import os
from typing import Dict

import torch

from opdlm_megatron.model.masks import positions_from_valid

VOCAB = 250
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=VOCAB,
              max_position_embeddings=128, rms_norm_eps=1e-5, eos_token_id=2)

# name -> (config class name, extra config fields). Together: GQA and MHA, tied and untied, qkv bias
# (Qwen2), QK-norm with head_dim != hidden/heads (Qwen3), llama3 rope scaling, a sliding window.
TINY_MODELS: Dict[str, tuple] = {
    "llama_gqa_untied_llama3rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_mha_tied": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "mistral_gqa_window": ("MistralConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=64)),
    "qwen2_gqa_bias": ("Qwen2Config", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3_qknorm_tied": ("Qwen3Config", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
}


def make_tiny_hf(name: str, directory: str, seed: int = 0, models: Dict[str, tuple] = TINY_MODELS,
                 common: Dict = COMMON):
    """Creates, randomises (biases and norms too, so a mis-mapped one shows) and saves a tiny HF model:
    ``models[name]`` is (config class name, extra config fields) on top of ``common``."""
    import transformers

    class_name, extra = models[name]
    config = getattr(transformers, class_name)(**common, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model


def hf_logits(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """HF transformers logits of a left-padded batch (positions count valid tokens only)."""
    valid = batch["valid"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=valid.long(), position_ids=positions_from_valid(valid))
    return out.logits.float()


def sample_batch(seed: int = 0) -> Dict[str, torch.Tensor]:
    """3 left-padded rows of up to 24 tokens of the tiny vocabulary."""
    from tests.helpers import random_batch, tiny_config

    return random_batch(tiny_config(vocab_size=VOCAB), batch_size=3, seq_len=24, seed=seed)


def megatron_logits(model, config, batch) -> torch.Tensor:
    """Full-vocabulary logits through megatron's schedule (None off the last pipeline stage)."""
    from tests.helpers import forward_backward

    result = forward_backward(model, config, batch, "causal", forward_only=True)
    return None if result is None else result["logits"][..., : config.vocab_size].float()


def max_valid_diff(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    return float((a - b)[valid].abs().max())


def model_dirs(root: str) -> Dict[str, str]:
    return {name: os.path.join(root, name) for name in TINY_MODELS}
