"""Checkpoints: model checkpoints (dist_checkpointing, atomic), training checkpoints with their manifest, Megatron-LM's layout, tokenizer files."""
