"""``python -m opdlm_megatron.quantize`` (what torchrun launches for TP/PP quantization): ``commands/quantize.py``."""

from .commands.quantize import main

if __name__ == "__main__":
    main()
