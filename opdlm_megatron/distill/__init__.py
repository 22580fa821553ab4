"""Distillation pieces: the frozen AR teacher and its targets, the supervised states of trajectories, the answer sources of a rollout."""
