"""Prompt and text sources (JSONL, reasoning-gym, token ids) and the project's prompt families."""
