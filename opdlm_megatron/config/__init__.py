"""Model configuration: architecture, vocabulary and diffusion settings (ModelConfig), dtypes, FP8 precision."""
