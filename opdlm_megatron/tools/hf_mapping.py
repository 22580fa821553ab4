"""The correspondence between HF decoder checkpoints (Llama, Mistral, Qwen2, Qwen3; the mixtures of
experts Qwen3-MoE and Mixtral) and our megatron-core GPTModel: configs, parameter names and tensor layouts.

Everything here is pure tensor and dict manipulation (no I/O, no torch.distributed), so it can be
tested without a model and reused by both conversion directions.

Layouts (``TensorMapping.layout``) and how a tensor-parallel rank's shard is made:

* ``replicated`` - norms (incl. Qwen3's per-head ``q_norm``/``k_norm``): the whole tensor.
* ``vocab`` - word embedding / output layer: rows ``[r*V/tp, (r+1)*V/tp)`` of the padded
  vocabulary. Rows past the HF vocabulary are zero, except an appended ``[MASK]`` row.
* ``qkv`` - Megatron fuses q, k, v into one column-parallel ``linear_qkv`` whose output is laid out
  per query group: ``[q heads of group 0 | k_0 | v_0 | q heads of group 1 | k_1 | v_1 | ...]``, so
  rank r's shard is the contiguous run of its groups. Weights and (Qwen2) biases alike.
* ``fc1`` - the gated MLP's column-parallel ``linear_fc1`` is ``[gate_r; up_r]`` on every rank:
  each rank stacks *its slice* of gate over *its slice* of up (megatron splits the local output
  in two halves), so the TP=1 tensor is ``[gate; up]`` but a TP=2 shard is not a row range of it.
* ``row`` - row-parallel ``linear_proj`` / ``linear_fc2``: a column range of the HF input dim.

Names: the local layer spec has ``decoder.layers.N.input_layernorm.weight`` and
``...pre_mlp_layernorm.weight``; the Transformer Engine spec fuses those norms into the following
linear layer as ``self_attention.linear_qkv.layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight``.
Megatron names carry the *global* layer number here; pipeline stages translate their local ones.

Mixtures of experts (local spec, ``SequentialMLP``): the router ``mlp.router.weight`` [E, hidden] is HF's
``mlp.gate`` (Qwen3-MoE) / ``block_sparse_moe.gate`` (Mixtral), replicated; expert e is
``mlp.experts.local_experts.{e}.linear_fc1`` ([gate; up], layout ``fc1`` at the expert width) and
``linear_fc2`` (``row``) from HF's per-expert ``gate_proj/up_proj/down_proj`` (Mixtral: ``w1/w3/w2``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..config.model import ModelConfig, canonical_dtype

# HF architecture -> model_type. All share the Llama attention and norm names.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Non-parameter entries some HF checkpoints carry; they are recomputed, never converted.
IGNORED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")
# Extra config.json fields with which an exported OPDLM student comes back losslessly.
OPDLM_HF_FIELDS = ("opdlm_mask_token_id", "opdlm_tokenizer_vocab_size", "opdlm_tokenizer_size", "opdlm_block_size",
                   "opdlm_logit_shift")

LAYOUTS = ("replicated", "vocab", "qkv", "fc1", "row")


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the offending value."""


# ========================================================================================= configs
def _get(hf: Dict, key: str, default=None):
    value = hf.get(key, default)
    return default if value is None else value


def hf_architecture(hf: Dict) -> str:
    """The supported HF architecture named by a ``config.json`` dict, or a ConversionError."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    if not archs:
        for arch, mtype in SUPPORTED_ARCHITECTURES.items():
            if mtype == model_type:
                return arch
    named = archs[0] if archs else model_type
    raise ConversionError(
        f"unsupported architecture {named!r} (model_type={model_type!r}); "
        f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_settings(hf: Dict) -> Tuple[float, Optional[dict]]:
    """(rope theta, rope_scaling dict or None) from transformers>=5 ``rope_parameters`` or the
    older ``rope_theta`` + ``rope_scaling`` fields."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = _get(hf, "rope_theta", 10000.0)
    scaling = {k: v for k, v in {**legacy, **params}.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(f"unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    return float(theta), scaling


def _sliding_window(hf: Dict, model_type: str) -> Optional[int]:
    window = hf.get("sliding_window")
    if window is None:
        return None
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        layer_types = hf.get("layer_types") or []
        if not hf.get("use_sliding_window", False) and "sliding_attention" not in layer_types:
            return None
    return int(window)


def eos_token_ids_from_hf(hf: Dict, generation_config: Optional[Dict] = None) -> List[int]:
    """EOS ids, generation config first (it lists all stop tokens of chat models), deduplicated."""
    ids: List[int] = []
    for source in (generation_config or {}, hf):
        value = source.get("eos_token_id")
        for token in (value if isinstance(value, list) else [value]):
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def place_mask_token(vocab_size: int, tokenizer_size: Optional[int], tokenizer_mask_id: Optional[int],
                     recorded: Optional[int], requested: Optional[int]) -> Tuple[int, bool]:
    """Where ``[MASK]`` goes: ``(mask_token_id, initialise)`` (initialise: the converter writes the
    mean row into it, because it holds no trained [MASK] embedding).

    In order: ``requested`` (``--mask-token-id``: an unused row, the tokenizer's own mask token, or
    ``vocab_size`` to append); the id an exported OPDLM student recorded (trained, kept); the
    tokenizer's own mask token (kept); the first unused row when the checkpoint has more rows than
    the tokenizer has tokens (Qwen3: 151,669 tokens in 151,936 rows; the released OPDLM/SDAR
    checkpoints use 151669); otherwise a row appended at ``vocab_size``.
    """
    tokens = tokenizer_size or vocab_size
    if requested is not None:
        requested = int(requested)
        if requested == tokenizer_mask_id or requested == recorded:
            return requested, False
        if not 0 <= requested <= vocab_size:
            raise ConversionError(f"--mask-token-id {requested} is outside the vocabulary: use an unused row "
                                  f"[{tokens}, {vocab_size}) or {vocab_size} (appended)")
        if requested < tokens:
            raise ConversionError(f"--mask-token-id {requested} is a real token of the tokenizer (ids < {tokens}); "
                                  f"use an unused row [{tokens}, {vocab_size}) or {vocab_size} (appended)")
        return requested, True
    if recorded is not None:
        return int(recorded), False
    if tokenizer_mask_id is not None:
        return int(tokenizer_mask_id), False
    if tokens < vocab_size:
        return tokens, True
    return vocab_size, True


def _moe_fields(hf: Dict, model_type: str) -> Dict:
    """ModelConfig's expert fields of an MoE config.json (empty for dense models); refuses layouts the
    project does not map (dense layers between MoE ones, shared experts)."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    if model_type == "qwen3_moe":
        step, dense_layers = int(_get(hf, "decoder_sparse_step", 1)), list(hf.get("mlp_only_layers") or [])
        if step != 1 or dense_layers:
            raise ConversionError(f"Qwen3-MoE with dense layers (decoder_sparse_step={step}, mlp_only_layers="
                                  f"{dense_layers}) is not supported: every layer must be an MoE layer")
        # the hub's configs say num_experts; transformers >= 5 writes num_local_experts
        experts, topk = int(_get(hf, "num_experts", hf.get("num_local_experts"))), int(hf["num_experts_per_tok"])
        width = int(hf["moe_intermediate_size"])
        normalised = bool(_get(hf, "norm_topk_prob", False))
    else:  # Mixtral: softmax over the experts, top-k, renormalised
        experts, topk = int(hf["num_local_experts"]), int(hf["num_experts_per_tok"])
        width = int(hf["intermediate_size"])
        normalised = True
    if hf.get("shared_expert_intermediate_size"):
        raise ConversionError("shared experts are not supported")
    return dict(num_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=width,
                moe_router_pre_softmax=not normalised)


def model_config_from_hf(
    hf: Dict,
    generation_config: Optional[Dict] = None,
    params_dtype: str = "float32",
    add_mask_token: bool = False,
    tokenizer_size: Optional[int] = None,
    tokenizer_mask_token_id: Optional[int] = None,
    mask_token_id: Optional[int] = None,
    **overrides,
) -> ModelConfig:
    """``ModelConfig`` for a HF ``config.json`` dict (and optional ``generation_config.json`` dict).

    The HF config itself is recorded in ``source["hf_config"]`` so the export writes it back.
    An exported OPDLM student (``opdlm_*`` fields) comes back with its mask token, tokenizer
    size, block size and logit shift. ``tokenizer_size`` / ``tokenizer_mask_token_id`` describe the
    checkpoint's tokenizer (``len(tokenizer)``, its mask token); ``mask_token_id`` asks for a row
    (``place_mask_token``). ``source["mask_token_initialised"]`` says whether the converter must
    write the mean row into [MASK]; an appended row is exported again (``mask_token_added``).
    ``add_mask_token`` is accepted for compatibility: [MASK] is always initialised.
    """
    arch = hf_architecture(hf)
    model_type = SUPPORTED_ARCHITECTURES[arch]
    hidden_act = _get(hf, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ConversionError(f"unsupported hidden_act {hidden_act!r} for {arch}; only 'silu' (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        raise ConversionError(f"mlp_bias=True is not supported ({arch}); megatron's add_bias_linear would add more biases")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise ConversionError(
            f"attention_bias=True is not supported for {arch} (it biases o_proj too); "
            "only Qwen2-style q/k/v biases map onto megatron's add_qkv_bias"
        )
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    groups = int(_get(hf, "num_key_value_heads", heads))
    head_dim = int(_get(hf, "head_dim", hidden // heads))
    if heads % groups != 0:
        raise ConversionError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {groups}")
    theta, scaling = _rope_settings(hf)
    max_positions = int(_get(hf, "max_position_embeddings", 4096))
    window = _sliding_window(hf, model_type)
    if window is not None and window < max_positions:
        # Full causal attention equals sliding-window attention while every key is within the
        # window, i.e. for positions < window; the model refuses longer positions instead of
        # silently attending further than the HF model would.
        max_positions = window

    moe = _moe_fields(hf, model_type)
    hf_vocab = int(hf["vocab_size"])
    recorded_mask = hf.get("opdlm_mask_token_id")
    vocab_size = int(_get(hf, "opdlm_tokenizer_vocab_size", hf_vocab))
    if recorded_mask is not None and int(recorded_mask) >= vocab_size and hf_vocab != int(recorded_mask) + 1:
        raise ConversionError(
            f"opdlm_mask_token_id {recorded_mask} is appended after the tokenizer vocabulary {vocab_size}, "
            f"so the HF vocab_size should be {int(recorded_mask) + 1}, got {hf_vocab}"
        )
    tokenizer_size = hf.get("opdlm_tokenizer_size", tokenizer_size)
    if tokenizer_size is not None and int(tokenizer_size) > vocab_size:
        raise ConversionError(f"the tokenizer has {tokenizer_size} tokens but the checkpoint only {vocab_size} "
                              "embedding rows")
    tokenizer_size = None if tokenizer_size is None or int(tokenizer_size) >= vocab_size else int(tokenizer_size)
    if tokenizer_mask_token_id is not None and not 0 <= int(tokenizer_mask_token_id) < vocab_size:
        tokenizer_mask_token_id = None
    mask, initialise = place_mask_token(vocab_size, tokenizer_size, tokenizer_mask_token_id, recorded_mask,
                                        mask_token_id)
    pad = _get(hf, "pad_token_id", (generation_config or {}).get("pad_token_id"))
    tokens = tokenizer_size or vocab_size
    eos = [t for t in eos_token_ids_from_hf(hf, generation_config) if t < tokens]

    fields = dict(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        vocab_size=vocab_size,
        tokenizer_size=tokenizer_size,
        max_sequence_length=max_positions,
        normalization="RMSNorm",
        norm_epsilon=float(_get(hf, "rms_norm_eps", 1e-6)),
        activation="swiglu",
        add_bias_linear=False,
        add_qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v projections always carry biases
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        **moe,
        rotary_base=theta,
        rotary_percent=float(_get(hf, "partial_rotary_factor", 1.0)),
        rope_scaling=scaling,
        mask_token_id=mask,
        block_size=int(_get(hf, "opdlm_block_size", 4)),
        logit_shift=bool(_get(hf, "opdlm_logit_shift", False)),
        eos_token_ids=eos,
        pad_token_id=int(pad) if pad is not None and 0 <= int(pad) < tokens else None,
        params_dtype=canonical_dtype(params_dtype),
        source={
            "format": "huggingface",
            "architecture": arch,
            "model_type": model_type,
            "hf_config": {k: v for k, v in hf.items() if k not in OPDLM_HF_FIELDS},
            "mask_token_added": mask >= vocab_size,
            "mask_token_initialised": initialise,
            "sliding_window": window,
        },
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def includes_mask_row(config: ModelConfig, include_mask_token: Optional[bool] = None) -> bool:
    """Whether the exported HF embedding keeps an appended [MASK] row (default: when the converter
    added it, which every student conversion does)."""
    appended = config.mask_token_id >= config.vocab_size
    if include_mask_token is None:
        include_mask_token = bool(config.source.get("mask_token_added", False))
    return appended and include_mask_token


def hf_vocab_rows(config: ModelConfig, include_mask_token: Optional[bool] = None) -> int:
    """Rows of the HF embedding: the tokenizer vocabulary, plus [MASK] when it is exported."""
    return config.vocab_size + int(includes_mask_row(config, include_mask_token))


def hf_config_from_model_config(
    config: ModelConfig, dtype: Optional[str] = None, include_mask_token: Optional[bool] = None
) -> Dict:
    """A ``config.json`` dict for ``config``: the recorded HF config with the architecture fields
    rewritten from ``config``, plus the ``opdlm_*`` student fields."""
    if config.normalization != "RMSNorm" or config.activation != "swiglu" or config.add_bias_linear:
        raise ConversionError(
            f"only RMSNorm + SwiGLU models without linear biases export to HF "
            f"(got normalization={config.normalization!r}, activation={config.activation!r}, "
            f"add_bias_linear={config.add_bias_linear})"
        )
    if config.qk_layernorm and config.add_qkv_bias:
        raise ConversionError("no supported HF architecture has both QK-norm and qkv biases")
    recorded = dict(config.source.get("hf_config") or {})
    if recorded:
        arch = hf_architecture(recorded)
    elif config.num_experts is not None:
        arch = "Qwen3MoeForCausalLM" if config.qk_layernorm else "MixtralForCausalLM"
    else:
        arch = "Qwen3ForCausalLM" if config.qk_layernorm else "Qwen2ForCausalLM" if config.add_qkv_bias else "LlamaForCausalLM"
    model_type = SUPPORTED_ARCHITECTURES[arch]
    if (config.num_experts is not None) != (model_type in MOE_MODEL_TYPES):
        raise ConversionError(f"recorded architecture {arch} does not match num_experts={config.num_experts}")
    if model_type == "mixtral" and config.moe_router_pre_softmax:
        raise ConversionError("Mixtral renormalises its top-k gates: moe_router_pre_softmax must be False")
    expected_qk_norm, expected_bias = model_type in ("qwen3", "qwen3_moe"), model_type == "qwen2"
    if config.qk_layernorm != expected_qk_norm or config.add_qkv_bias != expected_bias:
        raise ConversionError(
            f"recorded architecture {arch} does not match qk_layernorm={config.qk_layernorm}, "
            f"add_qkv_bias={config.add_qkv_bias}"
        )
    hf = recorded or {
        "max_position_embeddings": config.max_sequence_length,
        "rope_parameters": {"rope_theta": config.rotary_base, "rope_type": "default", **(config.rope_scaling or {})},
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    hf.update(
        architectures=[arch],
        model_type=model_type,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.query_groups,
        # a config that leaves head_dim unset (Mixtral: hidden / heads) keeps it unset
        head_dim=None if hf.get("head_dim", 0) is None and config.head_dim * config.num_attention_heads
        == config.hidden_size else config.head_dim,
        rms_norm_eps=config.norm_epsilon,
        tie_word_embeddings=config.tie_word_embeddings,
        vocab_size=hf_vocab_rows(config, include_mask_token),
    )
    if model_type == "qwen3_moe":
        hf["num_local_experts" if "num_local_experts" in hf and "num_experts" not in hf else "num_experts"] = \
            config.num_experts
        hf.update(num_experts_per_tok=config.moe_router_topk,
                  moe_intermediate_size=config.expert_ffn_hidden_size, decoder_sparse_step=1, mlp_only_layers=[],
                  norm_topk_prob=not config.moe_router_pre_softmax)
    elif model_type == "mixtral":
        hf.update(num_local_experts=config.num_experts, num_experts_per_tok=config.moe_router_topk,
                  intermediate_size=config.expert_ffn_hidden_size)
    if not recorded:
        hf["eos_token_id"] = (config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else list(config.eos_token_ids)) or None
        hf["pad_token_id"] = config.pad_token_id
    if dtype is not None:
        hf["dtype"] = canonical_dtype(dtype)
        if "torch_dtype" in hf:
            hf["torch_dtype"] = hf["dtype"]
    if includes_mask_row(config, include_mask_token):
        hf["opdlm_mask_token_id"] = config.mask_token_id
        hf["opdlm_tokenizer_vocab_size"] = config.vocab_size
    elif config.mask_token_id < config.vocab_size:  # a row of the vocabulary: exported with it
        hf["opdlm_mask_token_id"] = config.mask_token_id
    if config.tokenizer_size is not None:
        hf["opdlm_tokenizer_size"] = config.tokenizer_size
    hf["opdlm_block_size"] = config.block_size
    hf["opdlm_logit_shift"] = config.logit_shift
    return hf


# ======================================================================================== names
@dataclass(frozen=True)
class TensorMapping:
    """One Megatron parameter (global layer numbering) and the HF tensors it is made of."""

    megatron: str
    hf: Tuple[str, ...]
    layout: str

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}")


def layer_mappings(config: ModelConfig, layer: int) -> List[TensorMapping]:
    """Mappings of decoder layer ``layer`` (0-based, global) for the config's transformer_impl."""
    m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    te = config.transformer_impl == "transformer_engine"
    input_norm = m + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight")
    mlp_norm = m + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight")
    qkv = tuple(f"{h}self_attn.{p}_proj" for p in "qkv")
    out = [
        TensorMapping(input_norm, (h + "input_layernorm.weight",), "replicated"),
        TensorMapping(m + "self_attention.linear_qkv.weight", tuple(n + ".weight" for n in qkv), "qkv"),
    ]
    if config.add_qkv_bias:
        out.append(TensorMapping(m + "self_attention.linear_qkv.bias", tuple(n + ".bias" for n in qkv), "qkv"))
    if config.qk_layernorm:
        out.append(TensorMapping(m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",), "replicated"))
        out.append(TensorMapping(m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",), "replicated"))
    out += [
        TensorMapping(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "row"),
    ]
    if config.num_experts is None:
        return out + [
            TensorMapping(mlp_norm, (h + "post_attention_layernorm.weight",), "replicated"),
            TensorMapping(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "fc1"),
            TensorMapping(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "row"),
        ]
    # MoE layers keep their own pre-MLP norm in either spec (the router reads the normalised input)
    out.append(TensorMapping(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "replicated"))
    # the names of the architecture the checkpoint came from (or that the export picks: Qwen3-MoE with QK-norm)
    mixtral = config.source.get("model_type", "qwen3_moe" if config.qk_layernorm else "mixtral") == "mixtral"
    moe, (gate, up, down) = (h + "block_sparse_moe.", ("w1", "w3", "w2")) if mixtral else \
        (h + "mlp.", ("gate_proj", "up_proj", "down_proj"))
    out.append(TensorMapping(m + "mlp.router.weight", (moe + "gate.weight",), "replicated"))
    for e in range(config.num_experts):
        expert, hf_expert = f"{m}mlp.experts.local_experts.{e}.", f"{moe}experts.{e}."
        out += [
            TensorMapping(expert + "linear_fc1.weight", (hf_expert + gate + ".weight", hf_expert + up + ".weight"),
                          "fc1"),
            TensorMapping(expert + "linear_fc2.weight", (hf_expert + down + ".weight",), "row"),
        ]
    return out


def model_mappings(config: ModelConfig) -> List[TensorMapping]:
    """Every parameter of the full model (what the HF checkpoint must hold, in file order)."""
    out = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for layer in range(config.num_layers):
        out += layer_mappings(config, layer)
    out.append(TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    if not config.tie_word_embeddings:
        out.append(TensorMapping("output_layer.weight", ("lm_head.weight",), "vocab"))
    return out


def mapping_for(config: ModelConfig, megatron_name: str) -> TensorMapping:
    """The mapping of one Megatron parameter (global layer number). A pipeline stage's copy of the
    tied output layer reads the word embedding."""
    if megatron_name == "output_layer.weight" and config.tie_word_embeddings:
        return TensorMapping(megatron_name, ("model.embed_tokens.weight",), "vocab")
    match = re.match(r"decoder\.layers\.(\d+)\.", megatron_name)
    candidates = layer_mappings(config, int(match.group(1))) if match else model_mappings(config)
    for mapping in candidates:
        if mapping.megatron == megatron_name:
            return mapping
    raise ConversionError(
        f"no HF tensor maps onto megatron parameter {megatron_name!r} "
        f"(transformer_impl={config.transformer_impl!r})"
    )


def expected_hf_shapes(config: ModelConfig, vocab_rows: int) -> Dict[str, Tuple[int, ...]]:
    """Full shapes of every HF tensor the config implies (``vocab_rows`` embedding rows)."""
    hidden, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * d, config.query_groups * d
    shapes: Dict[str, Tuple[int, ...]] = {}
    for mapping in model_mappings(config):
        for name in mapping.hf:
            leaf = name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
            ffn = _ffn_width(config, name)
            shapes[name] = {
                "embed_tokens.weight": (vocab_rows, hidden),
                "lm_head.weight": (vocab_rows, hidden),
                "norm.weight": (hidden,),
                "input_layernorm.weight": (hidden,),
                "post_attention_layernorm.weight": (hidden,),
                "q_norm.weight": (d,),
                "k_norm.weight": (d,),
                "q_proj.weight": (q_out, hidden),
                "k_proj.weight": (kv_out, hidden),
                "v_proj.weight": (kv_out, hidden),
                "q_proj.bias": (q_out,),
                "k_proj.bias": (kv_out,),
                "v_proj.bias": (kv_out,),
                "o_proj.weight": (hidden, q_out),
                "gate_proj.weight": (ffn, hidden),
                "up_proj.weight": (ffn, hidden),
                "down_proj.weight": (hidden, ffn),
                "w1.weight": (ffn, hidden),
                "w3.weight": (ffn, hidden),
                "w2.weight": (hidden, ffn),
                "gate.weight": (config.num_experts or 0, hidden),
            }[leaf]
    return shapes


def _ffn_width(config: ModelConfig, hf_name: str) -> int:
    """The MLP width a HF tensor belongs to: an expert's, or the dense MLP's."""
    return config.expert_ffn_hidden_size if ".experts." in hf_name else config.ffn_hidden_size


def check_hf_tensors(config: ModelConfig, shapes: Dict[str, Sequence[int]], vocab_rows: Iterable[int]) -> int:
    """Checks a checkpoint's tensor names and shapes against ``config`` before anything is built.

    ``vocab_rows``: the acceptable embedding row counts. Returns the one the checkpoint has.
    Raises a ConversionError naming the first missing, unexpected or mis-shaped tensor.
    """
    embed = shapes.get("model.embed_tokens.weight")
    if embed is None:
        raise ConversionError("HF checkpoint has no tensor 'model.embed_tokens.weight'")
    rows = int(embed[0])
    acceptable = sorted(set(vocab_rows))
    if rows not in acceptable:
        raise ConversionError(
            f"tensor 'model.embed_tokens.weight' has {rows} rows but the config implies {acceptable[0]}"
            + (f" (or {acceptable[1:]})" if len(acceptable) > 1 else "")
        )
    expected = expected_hf_shapes(config, rows)
    for name, shape in expected.items():
        if name not in shapes:
            raise ConversionError(f"HF checkpoint is missing tensor {name!r}")
        if tuple(shapes[name]) != shape:
            raise ConversionError(
                f"shape mismatch: tensor {name!r} has shape {list(shapes[name])}, the config implies {list(shape)}"
            )
    extra = sorted(n for n in shapes if n not in expected and not IGNORED_HF_TENSORS.match(n))
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        # Some tied checkpoints store the (identical) head anyway; the embedding is authoritative.
        extra.remove("lm_head.weight")
    if extra:
        raise ConversionError(f"HF checkpoint has tensors this architecture does not use: {extra[:5]}")
    return rows


# ====================================================================================== layouts
# A reader returns the HF tensor ``name`` restricted to ``[start, end)`` along ``dim`` (None: all).
SliceReader = Callable[[str, int, Optional[int], Optional[int]], Tensor]


def _qkv_shard(config: ModelConfig, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Interleaves q/k/v rows of a contiguous run of query groups: [q_g | k_g | v_g] per group."""
    groups = k.shape[0] // config.head_dim
    per_group = config.num_attention_heads // config.query_groups
    rest = q.shape[1:]
    parts = (
        q.reshape(groups, per_group * config.head_dim, *rest),
        k.reshape(groups, config.head_dim, *rest),
        v.reshape(groups, config.head_dim, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(config: ModelConfig, fused: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Inverse of the per-group interleave on a TP=1 tensor: (q, k, v) in HF row order."""
    per_group = config.num_attention_heads // config.query_groups
    d = config.head_dim
    rest = fused.shape[1:]
    grouped = fused.reshape(config.query_groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def megatron_shard(
    config: ModelConfig,
    mapping: TensorMapping,
    read: SliceReader,
    tp_rank: int,
    tp_size: int,
    padded_vocab: int,
    hf_vocab_rows: int,
    mask_row: Optional[Callable[[str], Tensor]] = None,
) -> Tensor:
    """This TP rank's shard of a Megatron parameter, reading only the HF rows/columns it needs.

    ``mask_row(hf_name)`` gives the row to write at ``mask_token_id`` (an appended row the HF tensor
    does not have, or an unused row it has); None: an appended row stays zero like the padding rows,
    a row of the checkpoint keeps its values.
    """
    if mapping.layout == "replicated":
        return read(mapping.hf[0], 0, None, None)
    if mapping.layout == "row":
        width = config.num_attention_heads * config.head_dim if "o_proj" in mapping.hf[0] else \
            _ffn_width(config, mapping.hf[0])
        per = width // tp_size
        return read(mapping.hf[0], 1, tp_rank * per, (tp_rank + 1) * per)
    if mapping.layout == "qkv":
        groups = config.query_groups // tp_size
        d, per_group = config.head_dim, config.num_attention_heads // config.query_groups
        g0, g1 = tp_rank * groups, (tp_rank + 1) * groups
        q = read(mapping.hf[0], 0, g0 * per_group * d, g1 * per_group * d)
        k = read(mapping.hf[1], 0, g0 * d, g1 * d)
        v = read(mapping.hf[2], 0, g0 * d, g1 * d)
        return _qkv_shard(config, q, k, v)
    if mapping.layout == "fc1":
        per = _ffn_width(config, mapping.hf[0]) // tp_size
        start, end = tp_rank * per, (tp_rank + 1) * per
        return torch.cat([read(mapping.hf[0], 0, start, end), read(mapping.hf[1], 0, start, end)], dim=0)
    # vocab: the shard's rows of the padded vocabulary; rows past the HF vocabulary start at zero
    per = padded_vocab // tp_size
    start, end = tp_rank * per, (tp_rank + 1) * per
    real_end = min(end, hf_vocab_rows)
    rows = read(mapping.hf[0], 0, start, real_end) if real_end > start else None
    if rows is not None and real_end == end and not (mask_row is not None and start <= config.mask_token_id < end):
        return rows
    dtype = rows.dtype if rows is not None else read(mapping.hf[0], 0, 0, 1).dtype
    shard = torch.zeros(end - start, config.hidden_size, dtype=dtype)
    if rows is not None:
        shard[: real_end - start] = rows
    mask = config.mask_token_id
    if mask_row is not None and start <= mask < end:
        shard[mask - start] = mask_row(mapping.hf[0]).to(dtype)
    return shard


def hf_tensors(
    config: ModelConfig, mapping: TensorMapping, full: Tensor, hf_vocab_rows: int
) -> Dict[str, Tensor]:
    """The HF tensors of one Megatron parameter given its TP=1 tensor (views where possible)."""
    if mapping.layout in ("replicated", "row"):
        return {mapping.hf[0]: full}
    if mapping.layout == "qkv":
        return dict(zip(mapping.hf, split_qkv(config, full)))
    if mapping.layout == "fc1":
        gate, up = torch.chunk(full, 2, dim=0)
        return {mapping.hf[0]: gate, mapping.hf[1]: up}
    if full.shape[0] < hf_vocab_rows:
        raise ConversionError(f"{mapping.megatron} has {full.shape[0]} rows, fewer than the {hf_vocab_rows} to export")
    return {mapping.hf[0]: full[:hf_vocab_rows]}


def hf_ranges(config: ModelConfig, mapping: TensorMapping, amax: Optional[Tensor]) -> Dict[str, Optional[Tensor]]:
    """A quantized Megatron layer's weight range for each HF projection it is made of: a per-tensor range
    (one number) is every projection's, a per-channel one is split as the weight's rows are."""
    if amax is None or amax.numel() == 1:
        return {name: amax for name in mapping.hf}
    return hf_tensors(config, mapping, amax, hf_vocab_rows=0)


def layer_offset_names(model) -> Callable[[str], str]:
    """Maps a rank's local parameter names to global ones: a pipeline stage's layers are numbered
    from 0 locally (``layer_number`` is global and 1-based), and an expert-parallel rank's experts
    from 0 (the MoE layer's ``local_expert_indices`` are global)."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    offsets = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(layers)}
    experts = {str(i): [str(e) for e in getattr(layer.mlp, "local_expert_indices", [])]
               for i, layer in enumerate(layers)}

    def to_global(name: str) -> str:
        match = re.match(r"(decoder\.layers\.)(\d+)(\..*)", name)
        if not match:
            return name
        local, rest = match.group(2), match.group(3)
        expert = re.match(r"(\.mlp\.experts\.local_experts\.)(\d+)(\..*)", rest)
        if expert:
            rest = expert.group(1) + experts[local][int(expert.group(2))] + expert.group(3)
        return match.group(1) + offsets[local] + rest

    return to_global
