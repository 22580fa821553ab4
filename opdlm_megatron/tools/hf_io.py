"""Reading and writing HF checkpoint directories: lazy safetensors slices, sharded safetensors
output, config/tokenizer files.

The reader opens a ``*.safetensors`` file with ``safe_open`` per read and copies out only the slice
a rank asks for (``get_slice``), so a tensor-parallel rank never materialises a full weight matrix it
only holds a part of, and no more than one tensor's pages are mapped at a time. The writer flushes a shard as soon as it reaches ``max_shard_bytes``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .hf_mapping import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Files that make up a HF tokenizer (+ generation defaults), copied verbatim in both directions.


def read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, data: Dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json_object(path: str) -> Dict:
    """A JSON file that must hold an object (ValueError naming the file otherwise)."""
    try:
        data = read_json(path)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def read_hf_config(hf_dir: str) -> Tuple[Dict, Optional[Dict]]:
    """(``config.json``, ``generation_config.json`` or None) of a HF model directory."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF model directory not found: {hf_dir}")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HF model directory {hf_dir} has no config.json")
    gen_path = os.path.join(hf_dir, "generation_config.json")
    return read_json_object(path), read_json_object(gen_path) if os.path.isfile(gen_path) else None


class SafetensorsReader:
    """Lazy, slice-wise access to the tensors of a HF safetensors checkpoint (single or sharded).

    Each read opens the file, copies out the requested slice and closes it, so at most one
    tensor's pages are mapped at a time."""

    def __init__(self, hf_dir: str) -> None:
        index = os.path.join(hf_dir, SAFETENSORS_INDEX)
        single = os.path.join(hf_dir, SAFETENSORS_SINGLE)
        if os.path.isfile(index):
            weight_map = read_json(index)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files, weight_map = [SAFETENSORS_SINGLE], None
        else:
            found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
            raise FileNotFoundError(
                f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {hf_dir} (found {found[:10]}); "
                "only safetensors checkpoints are supported"
            )
        for name in files:
            if not os.path.isfile(os.path.join(hf_dir, name)):
                raise FileNotFoundError(f"safetensors shard {name} listed by {hf_dir} is missing")
        self._dir = hf_dir
        self._where: Dict[str, str] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        for file in files:
            with self._open(file) as handle:
                for key in handle.keys():
                    if weight_map is None or weight_map.get(key) == file:
                        self._where[key] = file
                        self._shapes[key] = tuple(handle.get_slice(key).get_shape())

    def _open(self, file: str):
        from safetensors import safe_open

        # opened per read: the memory-mapped pages of a file stay resident while a handle is open
        return safe_open(os.path.join(self._dir, file), framework="pt")

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, end: Optional[int] = None) -> Tensor:
        """Tensor ``name`` restricted to ``[start, end)`` along ``dim`` (dim 0 or 1), read lazily."""
        if name not in self._where:
            raise ConversionError(f"HF checkpoint is missing tensor {name!r}")
        with self._open(self._where[name]) as handle:
            piece = handle.get_slice(name)
            if start is None and end is None:
                return piece[:]
            index = slice(start, end)
            return piece[index] if dim == 0 else piece[:, index]

    def mean_row(self, name: str, chunk_rows: int = 8192, rows: Optional[int] = None) -> Tensor:
        """Mean of a matrix's first ``rows`` rows (default: all) in float64, accumulated chunk by chunk."""
        rows = self._shapes[name][0] if rows is None else min(rows, self._shapes[name][0])
        total = torch.zeros(self._shapes[name][1], dtype=torch.float64)
        for start in range(0, rows, chunk_rows):
            total += self.read(name, 0, start, min(rows, start + chunk_rows)).double().sum(0)
        return total / rows


class ShardedSafetensorsWriter:
    """Writes tensors into ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index,
    holding at most one shard in memory."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 1024**3) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._written: List[Tuple[str, List[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # own, contiguous storage: safetensors refuses views sharing memory
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self._written):05d}.tmp"
        save_file(self._pending, os.path.join(self.out_dir, name), metadata={"format": "pt"})
        self._written.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> List[str]:
        """Flushes and names the shards; returns the file names written."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            os.replace(os.path.join(self.out_dir, self._written[0][0]), os.path.join(self.out_dir, SAFETENSORS_SINGLE))
            return [SAFETENSORS_SINGLE]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            files.append(final)
            weight_map.update({n: final for n in names})
        write_json(
            os.path.join(self.out_dir, SAFETENSORS_INDEX),
            {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map},
        )
        return files + [SAFETENSORS_INDEX]


def read_tokenizer_info(hf_dir: str) -> Tuple[Optional[int], Optional[int]]:
    """``(len(tokenizer), its mask token id)`` of the tokenizer files in ``hf_dir`` (local only), or
    ``(None, None)`` when there are none or they cannot be read (then all embedding rows count as
    tokens and [MASK] is appended)."""
    import logging

    if not any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None, None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    except Exception as error:  # transformers raises many kinds for unreadable tokenizer files
        logging.getLogger(__name__).warning("could not read the tokenizer in %s (%s); all embedding rows are taken "
                                            "as tokens", hf_dir, str(error).splitlines()[0] if str(error) else error)
        return None, None
    return len(tokenizer), getattr(tokenizer, "mask_token_id", None)
