"""opdlm-megatron: turn an autoregressive LM into a block-diffusion LM by on-policy self-distillation,
on NVIDIA Megatron-Core.

Pipeline: ``masks`` (attention structure) -> ``model`` (student/teacher GPTModels) -> ``rollout``
(the student decodes its own answers) -> ``teacher`` (frozen AR targets) -> ``losses`` (vocab-parallel
divergences) -> ``trainer``; ``tools`` converts HF checkpoints in and out.
"""

__version__ = "0.1.0"
