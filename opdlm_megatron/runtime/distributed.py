"""The collective helpers every stage uses, in one place: ranks, barriers, broadcasts, data-parallel
shares and sums, and the copy of a last-pipeline-stage tensor to every stage.

Each works without torch.distributed (one process) and with any TP/PP/DP layout megatron's
``parallel_state`` holds. torch loads on first use, so command lines can import the module cheaply.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Tuple


def global_rank() -> int:
    """The process's global rank: torch.distributed's once it is initialised, else torchrun's ``RANK``."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel_share(total: int) -> Tuple[int, int]:
    """``[start, end)`` of the ``total`` rows this data-parallel rank works on."""
    from megatron.core import parallel_state

    size = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    per = -(-total // size)
    return min(total, rank * per), min(total, (rank + 1) * per)


def data_parallel_sum(values):
    """``values`` (a tensor) summed over the data-parallel group, in place."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return values


def data_parallel_mean(values: Dict[str, float]) -> Dict[str, float]:
    """Per-replica numbers averaged over the data-parallel ranks."""
    import torch
    from megatron.core import parallel_state

    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return values
    keys = sorted(values)
    box = data_parallel_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / size for k, v in zip(keys, box.tolist())}


def broadcast_from_last_stage(tensor):
    """Copies the last pipeline stage's ``tensor`` into the same-shaped ``tensor`` of every stage
    (in place; a no-op without pipeline parallelism). Logits and losses live on the last stage."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        import torch.distributed as dist

        dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return tensor
