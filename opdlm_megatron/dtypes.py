"""Parameter dtypes by name, without importing torch (command-line parsers offer them as choices;
``config.DTYPES`` maps the names to torch dtypes)."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_CHOICES = sorted(DTYPE_ALIASES) + sorted(DTYPE_NAMES)
