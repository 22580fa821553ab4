"""The names each setting takes, defined once and without importing torch (the configs validate against
them, command-line parsers offer them as choices, ``--help`` stays fast)."""

# parameter dtypes (``config.model.DTYPES`` maps them to torch dtypes) and their short forms
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_CHOICES = sorted(DTYPE_ALIASES) + sorted(DTYPE_NAMES)

# the model (ModelConfig)
LAYER_NORMS = ("RMSNorm", "LayerNorm")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
ATTENTION_BACKENDS = ("dense", "flex")
# NVIDIA ModelOpt's quantization recipes a student takes (model/quantization.py maps them)
QUANT_FORMATS = ("fp8", "int8_sq", "nvfp4")
# how a quantized student is exported to HF: ModelOpt's deployment checkpoint | the fake-quantized HF model
QUANTIZED_EXPORTS = ("unified", "modelopt_state")

# the loss (model/losses.py, training/student.py) and the supervised states (distill/states.py)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
LOSS_NORMALIZATIONS = ("token", "row")  # one weight per supervised token over the global batch | per-row mean
STATE_SELECTIONS = ("trajectory", "block", "all_rounds")
NOISE_LEVELS = ("sequence", "block")  # one masking rate t per sequence | per block
