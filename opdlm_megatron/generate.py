"""``python -m opdlm_megatron.generate`` (what torchrun launches for TP/PP decoding): ``commands/generate.py``."""

from .commands.generate import encode_prompt, main, read_prompts  # noqa: F401  (the entry point and its helpers)

if __name__ == "__main__":
    main()
