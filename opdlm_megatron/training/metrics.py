"""Per-phase timers and the metrics sink of a training run (JSONL always; TensorBoard and wandb when asked).

Only the writer rank writes; every rank may call ``log`` (others return at once). TensorBoard and
wandb are optional: when ``LoggingConfig.tensorboard`` / ``wandb`` is set but the package is missing,
the run logs a warning and keeps the JSONL file, which holds the same numbers.

TensorBoard gets every numeric metric as a scalar with the optimizer step as its x-axis, under the
JSONL's names (``loss``, ``kl``, ``grad_norm``, ``time/rollout`` ...), from
``torch.utils.tensorboard.SummaryWriter`` as Megatron-LM uses it. A resumed run opens its writer with
``purge_step`` = the resumed step, so TensorBoard drops what a killed run logged after its last
checkpoint, as ``drop_from`` does for the JSONL file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import defaultdict
from typing import Dict, Iterator, Optional

import torch

from .config import LoggingConfig

logger = logging.getLogger(__name__)


class LossSpikeDetector:
    """Flags a loss above ``factor`` x the median of the last ``window`` finite losses (once at least
    ``min_history`` of them are known): the early sign of a diverging run, logged as a warning and
    the ``loss_spike`` metric. ``factor`` 0 turns it off. Its history is part of the trainer state,
    so a resumed run flags the same steps."""

    def __init__(self, factor: float = 5.0, window: int = 50, min_history: int = 10) -> None:
        self.factor, self.window, self.min_history = factor, window, min_history
        self.history: list = []

    def update(self, loss: float) -> bool:
        """Whether ``loss`` is a spike; finite losses join the history (spikes included)."""
        import math
        import statistics

        if not math.isfinite(loss):
            return False
        spike = (self.factor > 0 and len(self.history) >= self.min_history
                 and loss > self.factor * statistics.median(self.history))
        self.history = (self.history + [loss])[-self.window:]
        return spike

    def state_dict(self) -> Dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Dict) -> None:
        self.history = [float(x) for x in state.get("history", [])][-self.window:]


class PhaseTimers:
    """Wall-clock seconds per named phase of one step (synchronising CUDA so GPU work is counted)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> Dict[str, float]:
        """Returns this step's times (``time/<phase>``) and clears them."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds = defaultdict(float)
        return out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class MetricsLogger:
    """Writes one JSON object per step to ``<run_dir>/metrics.jsonl`` and mirrors it to wandb."""

    def __init__(self, run_dir: str, cfg: LoggingConfig, run_config: dict, is_writer: bool) -> None:
        self.is_writer = is_writer
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._wandb = None
        self._tensorboard = None
        self._tensorboard_dir = (cfg.tensorboard_dir or os.path.join(run_dir, "tensorboard")) if cfg.tensorboard else None
        self._purge_step: Optional[int] = None
        self._run_config = run_config
        if not is_writer:
            return
        os.makedirs(run_dir, exist_ok=True)
        if cfg.wandb and cfg.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                logger.warning("logging.wandb is set but wandb is not installed; metrics go to %s only", self.path)
            else:
                self._wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=run_dir,
                                         config=run_config, resume="allow")

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if not self.is_writer:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        writer = self._tensorboard_writer()
        if writer is not None:
            for key, value in metrics.items():
                value = value.item() if isinstance(value, torch.Tensor) else value
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, step)
            writer.flush()

    def _tensorboard_writer(self):
        """The SummaryWriter, opened at the first record (after a resume has set the purge step)."""
        if self._tensorboard is None and self._tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("logging.tensorboard is set but tensorboard is not installed (pip install "
                               "'opdlm-megatron[tensorboard]'); metrics go to %s only", self.path)
                self._tensorboard_dir = None
                return None
            self._tensorboard = SummaryWriter(log_dir=self._tensorboard_dir, purge_step=self._purge_step)
            if not self._purge_step:  # the config once per run, as Megatron-LM writes its arguments
                self._tensorboard.add_text("config", "```\n" + json.dumps(self._run_config, indent=1, default=str)
                                           + "\n```", 0)
        return self._tensorboard

    def drop_from(self, step: int) -> None:
        """Drops the records of steps ``>= step``: a run resumed from a checkpoint taken after ``step``
        steps redoes the steps a killed run logged after it, and the file must hold each step once. Written to a
        temporary file and renamed, so a kill during the rewrite leaves the old file."""
        if not self.is_writer:
            return
        if self._tensorboard_dir is not None and os.path.isdir(self._tensorboard_dir):
            self._purge_step = step  # TensorBoard's own rule: events at steps >= purge_step are dropped
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) < step]
        if len(kept) == len(lines):
            return
        temporary = self.path + ".tmp"
        with open(temporary, "w") as f:
            f.writelines(kept)
        os.replace(temporary, self.path)
        logger.info("metrics: dropped %d records from step %d on (logged after the last checkpoint)",
                    len(lines) - len(kept), step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN is not valid JSON
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return str(value)
    return value


def read_metrics(path: str) -> list:
    """The records of a ``metrics.jsonl`` file (for tests and analysis)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar on the writer rank, or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="opd", dynamic_ncols=True)


def compact(metrics: Dict[str, float], keys=("loss", "kl", "grad_norm", "lr", "rollout_len",
                                             "committed_per_forward", "teacher_nll")) -> Dict[str, str]:
    """The few numbers shown on the progress bar."""
    out: Dict[str, str] = {}
    for key in keys:
        if key in metrics and isinstance(metrics[key], (int, float)):
            out[key] = f"{metrics[key]:.4g}"
    times = {k[5:]: v for k, v in metrics.items() if k.startswith("time/")}
    if times:
        out["t"] = "/".join(f"{k[:4]}{v:.1f}" for k, v in times.items())
    return out


def optional_float(x: Optional[float]) -> float:
    return float("nan") if x is None else float(x)
