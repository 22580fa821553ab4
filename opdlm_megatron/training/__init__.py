"""Training: the run config, the one build path of both loops, step data, the student step, schedules, metrics and the trainer."""
