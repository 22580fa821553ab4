"""Integrations with other training stacks (Megatron-LM's pretrain())."""
