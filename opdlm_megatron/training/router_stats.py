"""Per-step statistics of a mixture-of-experts student's routers, for the step's metrics.

Forward hooks on megatron's routers (``TopKRouter``) of the student count, in its training forwards only
(rollouts decode in eval mode, the frozen teacher is never hooked), how many tokens each expert of each
layer received and how many of the ``tokens x top-k`` assignments survived routing (megatron drops
assignments only with a capacity factor; the project routes dropless, so the dropped share is a check
that reads 0). At the end of a step the counts are summed over all ranks - every rank routes its own
tokens: data-parallel rows, a context-parallel rank's columns, a sequence-parallel TP rank's share, a
pipeline stage's layers - and become shares:

* ``moe/expert_share_max`` / ``moe/expert_share_min``: the busiest and the idlest expert's share of its
  layer's assignments, over all MoE layers (uniform routing: 1 / num_experts both);
* ``moe/dropped_share``: assignments dropped by routing;
* ``moe/load_balancing_loss``, ``moe/z_loss`` etc.: the router losses megatron's router computed
  (``moe`` section), without their coefficients, averaged over micro-batches and MoE layers
  (``read_router_losses``; under Megatron-LM its own ``training_log`` reports them).

The full table (tokens per expert and layer) of the step is kept in ``last_tokens_per_expert``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ..runtime.platform import compute_device

# the name megatron's router records each balancing loss under (moe.load_balancing -> tracker name)
BALANCING_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                        "global_aux_loss": "global_load_balancing_loss"}


class RouterStatistics:
    """Counts the routing of ``model``'s MoE layers (this rank's pipeline stage); ``collect()`` once per
    step, on every rank."""

    def __init__(self, model, num_layers: int, num_experts: int, topk: int, losses: Sequence[str] = ()) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_layers, self.num_experts, self.topk = num_layers, num_experts, topk
        self.losses = tuple(losses)  # megatron's tracker names of the router losses the run computes
        self.tokens_per_expert = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(num_layers, dtype=torch.float64)
        self.calls = torch.zeros(num_layers, dtype=torch.float64)  # training forwards of each layer's router
        self.last_tokens_per_expert: Optional[torch.Tensor] = None
        self._hooks = [module.register_forward_hook(self._count) for module in model.modules()
                       if isinstance(module, TopKRouter)]

    @classmethod
    def for_student(cls, model, config, moe) -> Optional["RouterStatistics"]:
        """Statistics for a mixture-of-experts student's ``config`` with the run's router terms ``moe``
        (``MoEConfig``); None for a dense student."""
        if config.num_experts is None:
            return None
        losses = [BALANCING_LOSS_NAMES[moe.load_balancing]] if moe.load_balancing != "none" else []
        losses += ["z_loss"] if moe.z_loss_coeff > 0 else []
        return cls(model, config.num_layers, config.num_experts, config.moe_router_topk, losses)

    def _count(self, module, inputs, outputs) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        _, routing_map = outputs  # [tokens, num_experts] booleans
        layer = module.layer_number - 1  # megatron's global 1-based layer number
        self.tokens_per_expert[layer] += routing_map.detach().sum(dim=0).to(device="cpu", dtype=torch.float64)
        self.tokens[layer] += routing_map.shape[0]
        self.calls[layer] += 1

    def collect(self, read_router_losses: bool = True) -> Dict[str, float]:
        """The step's metrics (identical on every rank); resets the counts and megatron's loss tracker."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        tracker = get_moe_metrics_tracker()
        names = self.losses if read_router_losses else ()
        # one all-reduce: the counts, the layers' router calls, and per loss its per-layer sums over calls
        parts = [self.tokens_per_expert.flatten(), self.tokens, self.calls]
        for name in names:
            entry = tracker.metrics.get(name)
            parts.append(torch.zeros(self.num_layers, dtype=torch.float64) if entry is None
                         else entry.values[:self.num_layers].detach().to(device="cpu", dtype=torch.float64))
        packed = torch.cat(parts)
        if dist.is_available() and dist.is_initialized():
            packed = packed.to(compute_device())  # NCCL reduces device tensors
            dist.all_reduce(packed)
            packed = packed.cpu()
        n, layers = self.num_layers * self.num_experts, self.num_layers
        table = packed[:n].view(layers, self.num_experts)
        tokens, calls = packed[n:n + layers], packed[n + layers:n + 2 * layers]
        ran = calls > 0
        out: Dict[str, float] = {}
        if bool(ran.any()):
            assigned = table[ran].sum(dim=1, keepdim=True)
            shares = table[ran] / assigned.clamp(min=1)
            out["moe/expert_share_max"] = float(shares.max())
            out["moe/expert_share_min"] = float(shares.min())
            out["moe/dropped_share"] = float(1 - assigned.sum() / (tokens[ran].sum() * self.topk))
        for i, name in enumerate(names):
            values = packed[n + (2 + i) * layers:n + (3 + i) * layers]
            # the mean over every router call (micro-batches of every rank), then over the MoE layers; ranks
            # that hold the same tokens (TP without sequence parallelism) count twice in both sums alike
            out[f"moe/{name}"] = float((values[ran] / calls[ran]).mean()) if bool(ran.any()) else float("nan")
        if read_router_losses:
            tracker.clear()
        self.last_tokens_per_expert = table.clone()
        for counts in (self.tokens_per_expert, self.tokens, self.calls):
            counts.zero_()
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
