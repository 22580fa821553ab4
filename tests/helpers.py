"""Test helpers shared by in-process tests and the torchrun scripts in tests/distributed/."""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from opdlm_megatron.model import masks
from opdlm_megatron.config.model import ModelConfig
from opdlm_megatron.distill.teacher import TeacherTargets
from opdlm_megatron.model.build import attention_mask
from opdlm_megatron.model.losses import DivergenceConfig, answer_loss_mask
from opdlm_megatron.objectives.base import SupervisedBatch
from opdlm_megatron.rollout.types import RolloutResult
from opdlm_megatron.training.student import student_step

OBJECTIVES = ("distill", "ce")
TOKEN_NORMALIZERS = ("supervised", "answer")


def tiny_config(**overrides) -> ModelConfig:
    """A 4-layer GQA Llama-like model small enough for 2 CPU cores, splittable by TP=2 and PP=2."""
    base = dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
        vocab_size=250, max_sequence_length=128, eos_token_ids=[2], block_size=4,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_batch(config: ModelConfig, batch_size: int = 3, seq_len: int = 24, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Left-padded token batch with per-row prompt lengths (rows have different lengths)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
    lengths[0] = seq_len
    valid = torch.arange(seq_len)[None] >= (seq_len - lengths)[:, None]
    prompt_lengths = torch.clamp(lengths - 9, min=1)
    targets = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g)
    return dict(input_ids=ids, valid=valid, prompt_lengths=prompt_lengths, targets=targets)


def layout_for(kind: str, batch: Dict[str, torch.Tensor], block_size: int) -> masks.AttentionLayout:
    if kind == "causal":
        return masks.causal_layout(batch["valid"])
    if kind == "bidirectional":
        return masks.bidirectional_layout(batch["valid"])
    if kind == "block":
        return masks.block_causal_layout(batch["valid"], block_size, batch["prompt_lengths"])
    raise ValueError(kind)


def forward_backward(model, config: ModelConfig, batch, kind: str = "block", num_microbatches: int = 1,
                     forward_only: bool = False) -> Optional[Dict[str, torch.Tensor]]:
    """Runs megatron's forward/backward schedule; returns loss, full-vocab logits and a grad norm.

    The loss is token-mean cross entropy to ``batch['targets']`` over valid tokens, computed from
    vocab-parallel logits with megatron's ``vocab_parallel_cross_entropy``. Results come back on
    the last pipeline stage (None elsewhere); the grad norm is over the transformer layers'
    parameters, all-reduced over the model-parallel group.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    layout = layout_for(kind, batch, config.block_size)
    bsz, seq = batch["input_ids"].shape
    if bsz % num_microbatches:
        raise ValueError("batch size must divide into microbatches")
    mbs = bsz // num_microbatches
    microbatches = []
    for i in range(num_microbatches):
        rows = slice(i * mbs, (i + 1) * mbs)
        sub = layout.rows(torch.arange(bsz)[rows])
        microbatches.append(dict(ids=batch["input_ids"][rows], layout=sub, targets=batch["targets"][rows]))
    total_tokens = float(layout.valid.sum())

    def loss_func(mb, output):
        # vocab_parallel_cross_entropy shifts its input in place: gather the logits first
        logits = output.float()
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits).detach().clone()
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits, mb["targets"])
        loss = (ce * mb["layout"].valid).sum() / total_tokens
        return loss * num_microbatches, {"loss": loss.detach(), "logits": full}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        lay = mb["layout"]
        output = model(mb["ids"], lay.position_ids, attention_mask(config, lay))
        return output, partial(loss_func, mb)

    model.zero_grad(set_to_none=True)
    fb = get_forward_backward_func()
    results = fb(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=num_microbatches, seq_length=seq, micro_batch_size=mbs, forward_only=forward_only,
    )
    grad_norm = None
    if not forward_only:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        sq = torch.zeros((), dtype=torch.float64)
        for name, p in model.named_parameters():
            if ".layers." in name and p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
                sq += p.grad.double().pow(2).sum()
        torch.distributed.all_reduce(sq, group=parallel_state.get_model_parallel_group())
        grad_norm = sq.sqrt()
    if not parallel_state.is_pipeline_last_stage():
        return None
    loss = sum(r["loss"] for r in results)
    logits = torch.cat([r["logits"] for r in results], 0)[..., : config.model_vocab_size]
    return {"loss": loss, "logits": logits, "grad_norm": grad_norm}


def reference_forward(state, config, input_ids, allowed, position_ids):
    """Plain-torch Llama forward from megatron's (local-spec, TP=1) state dict.

    ``allowed`` [B, S, S] (True = may attend), ``position_ids`` [B, S]. Written independently of
    megatron: RMSNorm, interleaved-per-group QKV, rotate-half RoPE, GQA, SwiGLU, tied output.
    """
    h, nh, ng, hd = config.hidden_size, config.num_attention_heads, config.query_groups, config.head_dim
    eps = config.norm_epsilon

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = position_ids[..., None].float() * inv_freq  # [B, S, hd/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # [B, heads, S, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    x = state["embedding.word_embeddings.weight"][input_ids]
    bsz, seq = input_ids.shape
    for layer in range(config.num_layers):
        p = f"decoder.layers.{layer}."
        y = rms(x, state[p + "input_layernorm.weight"])
        qkv = y @ state[p + "self_attention.linear_qkv.weight"].t()
        qkv = qkv.view(bsz, seq, ng, nh // ng + 2, hd)
        q = qkv[:, :, :, : nh // ng].reshape(bsz, seq, nh, hd).transpose(1, 2)
        k = qkv[:, :, :, nh // ng].transpose(1, 2)
        v = qkv[:, :, :, nh // ng + 1].transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(nh // ng, 1)
        v = v.repeat_interleave(nh // ng, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = scores.softmax(-1) @ v
        x = x + attn.transpose(1, 2).reshape(bsz, seq, nh * hd) @ state[p + "self_attention.linear_proj.weight"].t()
        y = rms(x, state[p + "pre_mlp_layernorm.weight"])
        gate, up = (y @ state[p + "mlp.linear_fc1.weight"].t()).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ state[p + "mlp.linear_fc2.weight"].t()
    x = rms(x, state["decoder.final_layernorm.weight"])
    return x @ state["embedding.word_embeddings.weight"].t()


def save_word_tokenizer(directory, size: int = 250, chat_template: bool = True):
    """A local word-level HF tokenizer with ``size`` tokens ("w3" ... plus digits), EOS id 2 and a
    chat template, saved to ``directory``; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "[UNK]", "<|user|>", "<|assistant|>", "<|system|>"]
    words += [str(i) for i in range(100)] + ["+", "-", "*", "=", "?", "what", "is", "Question:", "Answer:"]
    words += [f"w{i}" for i in range(size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                 unk_token="[UNK]")
    if chat_template:
        hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    hf.save_pretrained(str(directory))
    return hf


def load_script(path, name: str):
    """A script that is not part of the package (a benchmark, the demo) as a module, to call its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_student(ckpt, seed: int, max_sequence_length: int = 128, **overrides) -> str:
    """A tiny random student checkpoint (250-token vocabulary, EOS 2; ``overrides``: other ModelConfig
    fields) with ``save_word_tokenizer``'s chat tokenizer in ``<ckpt>/tokenizer``, as the CLI tests'
    fixtures use it; returns the path."""
    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime

    config = tiny_config(vocab_size=250, eos_token_ids=[2], max_sequence_length=max_sequence_length, **overrides)
    with initialize_runtime(device="cpu", seed=seed):
        save_model_checkpoint(build_model(config, "student"), str(ckpt), config)
    save_word_tokenizer(os.path.join(str(ckpt), "tokenizer"))
    return str(ckpt)


def save_trainer_student(ckpt, seed: int = 7) -> str:
    """The training tests' tiny student (``train_common.TINY_MODEL``) saved at ``ckpt``; returns the path."""
    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime
    from tests.distributed.train_common import TINY_MODEL

    with initialize_runtime(device="cpu", seed=seed):
        config = ModelConfig(**TINY_MODEL)
        save_model_checkpoint(build_model(config, "student"), str(ckpt), config)
    return str(ckpt)


def student_forward_backward(
    model,
    config: ModelConfig,
    result: RolloutResult,
    xt: Tensor,
    targets,
    objective: str,
    divergence_cfg: Optional[DivergenceConfig],
    micro_batch_size: int,
    forward_only: bool = False,
    loss_weights: Optional[Tensor] = None,
    *,
    end_of_turn_ids: Optional[Sequence[int]] = None,
    include_end_of_turn: bool = True,
    token_normalizer: Optional[str] = None,
    num_rows: Optional[float] = None,
    normalization: str = "row",
) -> Dict[str, float]:
    """The trainer's first interface (tests hold a rollout, an ``xt`` and dense targets):
    ``objective`` "distill" (``targets``: teacher logits ``[B, A, V/TP]`` or a ``TeacherTopK`` over
    ``[B, A]``) or "ce" (``targets``: token ids ``[B, A]``, the answers). Builds the
    ``SupervisedBatch`` on the ``[prompt | x0 | xt]`` layout and runs ``student_step`` with the
    per-row normalisation it always had (``token_normalizer`` "answer" when ``loss_weights``)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    if token_normalizer is None:
        token_normalizer = "answer" if loss_weights is not None else "supervised"
    if token_normalizer not in TOKEN_NORMALIZERS:
        raise ValueError(f"unknown token_normalizer {token_normalizer!r}; expected one of {TOKEN_NORMALIZERS}")
    shape = tuple(result.answer_ids.shape)
    if tuple(xt.shape) != shape:
        raise ValueError(f"xt {tuple(xt.shape)} must have the answers' shape {shape}")
    if objective == "ce" and (targets is None or tuple(targets.shape) != shape):
        raise ValueError(f"objective 'ce' needs token-id targets of shape {shape}, got "
                         f"{None if targets is None else tuple(targets.shape)}")
    eot = config.eos_token_ids if end_of_turn_ids is None else end_of_turn_ids
    kept = answer_loss_mask(result.answer_ids, result.answer_valid, eot, include_end_of_turn)
    supervised = kept & (xt == config.mask_token_id)
    if objective == "ce":
        result = RolloutResult(result.prompt_ids, result.prompt_valid, targets, result.answer_valid,
                               result.commit_step, result.num_rounds, result.finished, result.num_forward_passes)
    batch = SupervisedBatch(result, supervised, supervised if token_normalizer == "supervised" else kept,
                            distill=objective == "distill", layout="opd", xt=xt, weights=loss_weights)
    teacher_targets = None
    if objective == "distill" and targets is not None:
        teacher_targets = TeacherTargets.dense(targets, shape)
    return student_step(model, config, batch, teacher_targets, divergence_cfg, micro_batch_size,
                        normalization, forward_only, num_rows)
