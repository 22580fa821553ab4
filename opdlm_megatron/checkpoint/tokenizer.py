"""The tokenizer files that travel with a checkpoint (``<checkpoint>/tokenizer/``): the converters, the
trainer's checkpoints and the HF export copy the same set."""

from __future__ import annotations

import os
import shutil
from typing import Iterable, List

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def copy_tokenizer_files(src_dir: str, dst_dir: str, names: Iterable[str] = TOKENIZER_FILES) -> List[str]:
    """Copies the tokenizer files present in ``src_dir`` into ``dst_dir``; returns their names."""
    copied = []
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
