"""The lm-evaluation-harness model ``opdlm``: standard lm-eval tasks on converted diffusion LMs.

    opdlm-lm-eval --checkpoint CKPT --kind student --tasks gsm8k --output results.json
    torchrun --nproc-per-node 2 -m opdlm_megatron.commands.lm_eval --checkpoint CKPT --pp 2 --tasks ...
    # or from Python: lm_eval.simple_evaluate(model="opdlm", model_args="pretrained=CKPT,kind=ar", ...)

* ``generate_until`` decodes with the rollout engine: a student with its block size and commit rule
  (``threshold`` or ``tokens_per_step``), an AR checkpoint (``kind=ar``) causally; the answer is cut
  at the first stop sequence.
* ``loglikelihood``: exact for ``kind=ar``; for a student the block-diffusion lower bound estimated
  with ``mc_num`` Monte-Carlo samples (``likelihood.py``), so multiple-choice tasks (MMLU, ...) run too.
* Under torchrun (TP/PP) rank 0 talks to lm-eval and sends every request batch to the other ranks,
  which follow (``serve``) until rank 0 is done.

Nothing is read from a hub: tasks over local files use ``dataset_path: json`` with ``data_files``
(see tests/test_lm_eval_model.py and the README).
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

import torch.distributed as dist

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - the eval extra is not installed
    raise ImportError("the lm-eval model needs lm-evaluation-harness: pip install 'opdlm-megatron[eval]'") from error

from . import KINDS  # noqa: E402


@register_model("opdlm")
class OPDLMEvalModel(LM):
    """An opdlm-megatron checkpoint as an lm-eval model (see the module docstring).

    Needs an initialised runtime (``platform.initialize_runtime``) with the TP/PP the caller wants;
    ``from_checkpoint`` / the CLI start one.
    """

    def __init__(self, pretrained: str, kind: str = "student", tokenizer: Optional[str] = None,
                 threshold: float = 0.9, tokens_per_step: Optional[int] = None, block_size: Optional[int] = None,
                 max_gen_toks: int = 256, mc_num: int = 8, batch_size: int = 8, seed: int = 0,
                 add_bos: bool = False, **_unused) -> None:
        super().__init__()
        from ..checkpoint.model import build_from_checkpoint
        from ..data.samples import load_tokenizer

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.model, self.config = build_from_checkpoint(pretrained, "teacher")
        self.tokenizer = load_tokenizer(tokenizer or os.path.join(pretrained, "tokenizer"))
        self.threshold, self.tokens_per_step = float(threshold), tokens_per_step
        self.block_size = int(block_size or self.config.block_size)
        self.max_gen_toks, self.mc_num, self.batch_size = int(max_gen_toks), int(mc_num), int(batch_size)
        self.seed, self.add_bos = int(seed), bool(add_bos)
        self.forwards = 0  # model forwards spent on generation (NFE)
        self.generated_tokens = 0

    # ------------------------------------------------------------------------- the lm-eval API
    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self._run("loglikelihood", pairs)

    def loglikelihood_rolling(self, requests) -> List[float]:
        raise NotImplementedError("opdlm does not score whole documents (perplexity tasks); use loglikelihood or "
                                  "generate_until tasks")

    def generate_until(self, requests) -> List[str]:
        work = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            work.append((self._encode(context), until, int(kwargs.get("max_gen_toks", self.max_gen_toks))))
        return self._run("generate", work)

    # ------------------------------------------------------------------------------ encoding
    def _encode(self, text: str) -> List[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if (self.add_bos or not ids) and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        # as HF models in lm-eval: trailing spaces of the context belong to the continuation, and
        # the pair is encoded together so the continuation's tokens are those of the joint text
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return whole[:len(ctx)], whole[len(ctx):]

    # ------------------------------------------------------------------------ the collectives
    def _run(self, op: str, payload):
        """Rank 0: sends ``(op, payload)`` to the other ranks, then every rank executes it."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [op, payload]
            dist.broadcast_object_list(box, src=0)
        return self._execute(op, payload)

    def serve(self) -> None:
        """Ranks other than 0: execute what rank 0 sends until it says ``stop``."""
        while True:
            box = [None, None]
            dist.broadcast_object_list(box, src=0)
            if box[0] == "stop":
                return
            self._execute(*box)

    def stop_followers(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(["stop", None], src=0)

    def _execute(self, op: str, payload):
        from .likelihood import ar_loglikelihood, block_diffusion_loglikelihood

        out = []
        for start in range(0, len(payload), self.batch_size):
            part = payload[start:start + self.batch_size]
            if op == "loglikelihood":
                contexts, continuations = [p[0] for p in part], [p[1] for p in part]
                if self.kind == "ar":
                    out += ar_loglikelihood(self.model, self.config, contexts, continuations)
                else:
                    config = self.config.replace(block_size=self.block_size)
                    values = block_diffusion_loglikelihood(self.model, config, contexts, continuations,
                                                           self.mc_num, self.seed + start)
                    out += [(v, False) for v in values]
            elif op == "generate":
                out += self._generate(part)
            else:
                raise ValueError(f"unknown operation {op!r}")
        return out

    def _generate(self, part) -> List[str]:
        from ..rollout.config import DecodeConfig
        from .runner import ar_config, generate, student_decode, teacher_decode

        out = []
        eos = self.config.eos_token_ids or ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None
                                            else [])
        # one engine call per distinct length limit
        for limit in sorted({p[2] for p in part}):
            rows = [i for i, p in enumerate(part) if p[2] == limit]
            base = DecodeConfig(max_new_tokens=limit, eos_token_ids=eos, threshold=self.threshold,
                                tokens_per_step=self.tokens_per_step)
            if self.kind == "ar":
                gens = generate(self.model, ar_config(self.config), [part[i][0] for i in rows], teacher_decode(base),
                                len(rows))
            else:
                config = self.config.replace(block_size=self.block_size)
                gens = generate(self.model, config, [part[i][0] for i in rows],
                                student_decode(base, None, self.block_size), len(rows))
            for i, gen in zip(rows, gens):
                self.forwards += gen.forwards
                self.generated_tokens += len(gen.ids)
                text = self.tokenizer.decode(gen.ids, skip_special_tokens=True)
                cut = min([text.find(s) for s in part[i][1] if s and s in text] + [len(text)])
                out.append((i, text[:cut]))
        return [text for _, text in sorted(out)]


def run(args) -> int:
    """Evaluates ``args`` (parsed by ``commands/lm_eval.py``, already checked) with lm-eval; under
    torchrun rank 0 talks to lm-eval and the other ranks follow."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ..runtime.platform import initialize_runtime

    extra = dict(kv.split("=", 1) for kv in args.model_args.split(",") if kv)
    with initialize_runtime(args.tp, args.pp, device=args.device, seed=0) as runtime:
        model = OPDLMEvalModel.create_from_arg_string(
            ",".join([f"pretrained={args.checkpoint}", f"kind={args.kind}"] + [f"{k}={v}" for k, v in extra.items()]))
        if runtime.rank != 0:
            model.serve()
            return 0
        try:
            results = lm_eval.simple_evaluate(
                model=model, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot, limit=args.limit,
                task_manager=TaskManager(include_path=args.include_path) if args.include_path else None)
        finally:
            model.stop_followers()
        report = {"results": results["results"], "nfe": model.forwards, "generated_tokens": model.generated_tokens}
        text = json.dumps(report, indent=2, default=str)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        print(text)
    return 0
