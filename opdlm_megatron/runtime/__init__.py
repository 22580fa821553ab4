"""Runtime: initialisation on GPUs or CPUs (the CPU shims), collective helpers, exit signals, the run-directory lock, the console and output checks."""
