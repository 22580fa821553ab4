"""Model configuration: one serialisable description of the network, from which the student and
the teacher GPTModels are built at any TP/PP size.

``ModelConfig`` holds the architecture (what a HF ``config.json`` holds), the vocabulary, RoPE
settings and the diffusion settings of the student (mask token, block size, logit shift).
``ModelConfig.transformer_config`` turns it into megatron-core's ``TransformerConfig`` for the
current parallel layout; everything else (``vocab`` padding, specs) lives in ``model.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .choices import ATTENTION_BACKENDS, DTYPE_ALIASES, DTYPE_NAMES, LAYER_NORMS, QUANT_FORMATS, TRANSFORMER_IMPLS

ACTIVATIONS = {"swiglu": (F.silu, True), "geglu": (F.gelu, True), "gelu": (F.gelu, False), "silu": (F.silu, False)}
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

CONFIG_FILE_NAME = "opdlm_model_config.json"


def canonical_dtype(name: str) -> str:
    """``"bf16"`` -> ``"bfloat16"`` etc.; raises on an unknown name."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}")
    return name


@dataclass
class ModelConfig:
    """Architecture + vocabulary + diffusion settings of an OPDLM model pair.

    Vocabulary: ``vocab_size`` is the vocabulary of the source checkpoint (the HF embedding's rows).
    ``tokenizer_size`` (None: ``vocab_size``) is how many of those ids the tokenizer can produce; the
    rows in between exist but are unused (Qwen3: 151,669 tokens in 151,936 rows). ``[MASK]`` is the
    tokenizer's own mask token, one of the unused rows, or a row appended at ``vocab_size``
    (``model_vocab_size`` counts it). The embedding is padded up to a multiple of
    ``make_vocab_size_divisible_by x TP`` as Megatron does. Padded rows, unused rows and ``[MASK]``
    are never sampled and get no probability mass in losses (``unused_token_mask``).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    tokenizer_size: Optional[int] = None  # None: vocab_size
    num_query_groups: Optional[int] = None  # None: multi-head attention
    kv_channels: Optional[int] = None  # None: hidden_size // num_attention_heads
    max_sequence_length: int = 4096
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: str = "swiglu"
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = True
    # RoPE. rope_scaling follows HF's dict, e.g. {"rope_type": "llama3", "factor": 8.0}.
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling: Optional[dict] = None
    # Diffusion student.
    mask_token_id: Optional[int] = None  # None: appended after the tokenizer vocabulary
    block_size: int = 4
    logit_shift: bool = False  # Dream-style: position i-1 predicts token i
    eos_token_ids: list = field(default_factory=list)
    pad_token_id: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    # Pinned padded vocabulary (set by checkpoints so they reload at another TP); None: Megatron's rule.
    padded_vocab: Optional[int] = None
    # Mixture of experts (None: a dense MLP in every layer). Every layer is an MoE layer of
    # ``num_experts`` SwiGLU experts of ``moe_ffn_hidden_size``, ``moe_router_topk`` per token, dropless
    # (no capacity factor: a row's tokens never depend on the rest of the batch). ``moe_router_pre_softmax``
    # False: the top-k gates are renormalised over the chosen experts (HF norm_topk_prob, Mixtral); True:
    # softmax over all experts, the top-k kept as they are.
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None  # None: ffn_hidden_size
    moe_router_topk: int = 2
    moe_router_pre_softmax: bool = False
    # Implementation.
    transformer_impl: str = "local"
    attention_backend: str = "dense"
    params_dtype: str = "float32"
    # The ModelOpt format the student's linear layers are (fake-)quantized to (QUANT_FORMATS; None: not
    # quantized). Written by opdlm-quantize and quantization-aware runs: a model built from this config gets
    # the format's quantizers, whose ranges the checkpoint then supplies (model/quantization.py).
    quantization: Optional[str] = None
    quantization_exclude: list = field(default_factory=list)  # module-name patterns left unquantized
    # Free-form extra TransformerConfig keyword arguments (e.g. recompute settings).
    extra_transformer_config: dict = field(default_factory=dict)
    # Where the weights came from (informational; e.g. the HF architecture name).
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params_dtype = canonical_dtype(self.params_dtype)
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size
        self.eos_token_ids = [int(t) for t in self.eos_token_ids]
        self.validate()

    # ----------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")

        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "max_sequence_length", "block_size", "make_vocab_size_divisible_by"):
            positive(name)
        if self.num_experts is not None:
            positive("num_experts")
            positive("moe_router_topk")
            if self.moe_router_topk > self.num_experts:
                raise ValueError(f"ModelConfig.moe_router_topk {self.moe_router_topk} exceeds num_experts "
                                 f"{self.num_experts}")
            if self.moe_ffn_hidden_size is not None:
                positive("moe_ffn_hidden_size")
        if self.normalization not in LAYER_NORMS:
            raise ValueError(f"unknown normalization {self.normalization!r}; expected one of {LAYER_NORMS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(
                f"unknown transformer_impl {self.transformer_impl!r}; expected one of {TRANSFORMER_IMPLS}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention_backend {self.attention_backend!r}; expected one of {ATTENTION_BACKENDS}"
            )
        if self.quantization is not None and self.quantization not in QUANT_FORMATS:
            raise ValueError(f"ModelConfig.quantization {self.quantization!r} is not one of {list(QUANT_FORMATS)}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; set kv_channels explicitly"
            )
        if self.num_attention_heads % self.query_groups != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.query_groups}"
            )
        if self.tokenizer_size is not None and not 1 <= self.tokenizer_size <= self.vocab_size:
            raise ValueError(f"tokenizer_size {self.tokenizer_size} must lie in [1, vocab_size {self.vocab_size}]")
        if not 0 <= self.mask_token_id <= self.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} must be a row of the vocabulary (< {self.vocab_size}) or "
                f"{self.vocab_size} (appended)"
            )
        if self.padded_vocab is not None and self.padded_vocab < self.model_vocab_size:
            raise ValueError(f"padded_vocab {self.padded_vocab} is smaller than the vocabulary {self.model_vocab_size}")
        for token in self.eos_token_ids:
            if not 0 <= token < self.num_tokens:
                raise ValueError(f"eos token id {token} is outside the tokenizer's ids [0, {self.num_tokens})")

    def check_parallel(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                       expert_model_parallel_size: int = 1) -> None:
        """Clear errors for layouts this model cannot be split into."""
        tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
        if self.num_attention_heads % tp != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by tensor parallel size {tp}"
            )
        if self.query_groups % tp != 0:
            raise ValueError(
                f"num_query_groups {self.query_groups} is not divisible by tensor parallel size {tp}"
            )
        if self.ffn_hidden_size % tp != 0:
            raise ValueError(f"ffn_hidden_size {self.ffn_hidden_size} is not divisible by tensor parallel size {tp}")
        if self.num_layers % pp != 0:
            raise ValueError(f"num_layers {self.num_layers} is not divisible by pipeline parallel size {pp}")
        if ep != 1 and self.num_experts is None:
            raise ValueError(f"expert parallel size {ep} needs a mixture-of-experts model; this one is dense (use 1)")
        if self.num_experts is not None:
            if self.num_experts % ep != 0:
                raise ValueError(f"num_experts {self.num_experts} is not divisible by expert parallel size {ep}")

    # ------------------------------------------------------------------------------- vocabulary
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def num_tokens(self) -> int:
        """Ids the tokenizer can produce: ``[0, num_tokens)`` (minus [MASK]) is what is sampled and supervised."""
        return self.tokenizer_size or self.vocab_size

    @property
    def model_vocab_size(self) -> int:
        """Embedding rows before padding: the source vocabulary plus an appended [MASK] if any."""
        return max(self.vocab_size, self.mask_token_id + 1)

    def unused_token_mask(self, start: int, end: int, exclude_mask_token: bool = True) -> torch.Tensor:
        """``[end - start]`` bool over vocabulary ids ``[start, end)``: True for ids that are not
        tokens (padding, unused rows) and, by default, for [MASK]."""
        ids = torch.arange(start, end)
        unused = ids >= self.num_tokens
        if exclude_mask_token:
            unused |= ids == self.mask_token_id
        elif self.mask_token_id >= self.num_tokens:
            unused &= ids != self.mask_token_id
        return unused

    def num_parameters(self, active: bool = False) -> int:
        """Parameters of the whole model (all TP/PP ranks together; padded vocabulary rows included).
        ``active``: a mixture of experts counts only the ``moe_router_topk`` experts a token runs through
        (what the paper's FLOP estimate, eq. 7, needs); by default every expert (what memory holds)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.query_groups * d
        gated = 2 if ACTIVATIONS[self.activation][1] else 1
        per_layer = h * (q + 2 * kv) + q * h + 2 * h
        if self.num_experts is None:
            per_layer += h * self.ffn_hidden_size * gated + self.ffn_hidden_size * h
        else:
            experts = self.moe_router_topk if active else self.num_experts
            per_layer += experts * self.expert_ffn_hidden_size * h * (gated + 1) + self.num_experts * h  # + router
        if self.add_qkv_bias or self.add_bias_linear:
            per_layer += q + 2 * kv
        if self.qk_layernorm:
            per_layer += 2 * d
        vocab = self.padded_vocab_size() * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + vocab + h

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Embedding rows: ``padded_vocab`` if pinned, else the next multiple of divisible_by x TP."""
        if self.padded_vocab is not None:
            if self.padded_vocab % tensor_model_parallel_size != 0:
                raise ValueError(
                    f"padded vocabulary {self.padded_vocab} (pinned by the checkpoint) is not divisible by "
                    f"tensor parallel size {tensor_model_parallel_size}"
                )
            return self.padded_vocab
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.model_vocab_size / multiple) * multiple)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]

    # ------------------------------------------------------------------------ megatron config
    def transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        context_parallel_size: int = 1,
        sequence_parallel: bool = False,
        expert_model_parallel_size: int = 1,
        use_cpu_initialization: bool = False,
        **overrides: Any,
    ):
        """megatron-core ``TransformerConfig`` for this architecture and parallel layout."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size)
        activation_func, gated = ACTIVATIONS[self.activation]
        dtype = self.torch_dtype
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            kv_channels=self.head_dim,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=gated,
            activation_func=activation_func,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            sequence_parallel=sequence_parallel,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=use_cpu_initialization,
            # Fusions need CUDA kernels (and apex); megatron picks them again on GPU when asked.
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
        )
        if self.num_experts is not None:
            kwargs.update(
                num_moe_experts=self.num_experts,
                expert_model_parallel_size=expert_model_parallel_size,
                moe_ffn_hidden_size=self.expert_ffn_hidden_size,
                moe_router_topk=self.moe_router_topk,
                moe_router_pre_softmax=self.moe_router_pre_softmax,
                moe_router_score_function="softmax",
                # one rank: all-gather dispatch (nothing leaves the rank). Expert parallel: all-to-all, whose
                # split sizes vary, so the ranks of the EP group may hold different rows and lengths
                # (their rollouts, all_rounds states); model/expert_parallel.py keeps them in step
                moe_token_dispatcher_type="alltoall" if expert_model_parallel_size > 1 else "allgather",
                moe_grouped_gemm=False,
                moe_expert_capacity_factor=None,  # dropless
                # distillation trains the student's routers through the KL alone (no balancing term)
                moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0,
                moe_permute_fusion=False,
            )
        kwargs.update(self.extra_transformer_config)
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Each expert's FFN width (MoE models)."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    # ---------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return cls(**data)

    def save(self, directory: str) -> str:
        """Writes ``opdlm_model_config.json`` into ``directory`` atomically; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_FILE_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        """Reads a config from a file or from a directory holding ``opdlm_model_config.json``."""
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model config not found: {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
