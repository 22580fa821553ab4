"""opdlm-megatron: convert autoregressive LMs into diffusion LMs by on-policy self-distillation,
as a plugin for NVIDIA Megatron-Core."""

from setuptools import find_packages, setup

EXTRAS = {
    # Transformer Engine for the TE layer spec and FP8 (GPU only).
    "te": ["transformer-engine[pytorch]>=2.0"],
    # post-training quantization (model/quantization.py; tested with 0.47: its recipes and Megatron-Core plugin)
    "modelopt": ["nvidia-modelopt>=0.47,<0.48"],
    # HF checkpoints in and out, the GGUF-shipped SmolLM2 demo model.
    "hf": ["transformers>=4.51", "safetensors>=0.4", "gguf>=0.10", "accelerate"],
    "data": ["reasoning-gym>=0.1.20"],
    # opdlm-eval plots and the lm-evaluation-harness model "opdlm" (tested against 0.4.13)
    "eval": ["lm-eval==0.4.13", "matplotlib"],
    "wandb": ["wandb"],
    # logging.tensorboard (and Megatron-LM's --tensorboard-dir)
    "tensorboard": ["tensorboard"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout", "import-linter>=2.1"],
}
EXTRAS["all-cpu"] = sorted({d for k in ("hf", "data", "eval", "tensorboard", "dev") for d in EXTRAS[k]})

setup(
    name="opdlm-megatron",
    version="0.1.0",
    description="On-policy self-distillation of autoregressive LMs into block-diffusion LMs on Megatron-Core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["opdlm_megatron", "opdlm_megatron.*"]),
    install_requires=[
        # Never PyPI's `apex` (an unrelated package); NVIDIA apex is optional for megatron-core.
        # the tested release line: megatron/training's pretrain(cfg_container, ...) API (the Megatron-LM
        # path) and the 0.19 model/optimizer internals the CPU shims redirect are 0.19.x-specific
        "megatron-core>=0.19.2,<0.20",
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",  # megatron dist_checkpointing's file writer workers need it
    ],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            # one light module per command (opdlm_megatron/commands/): --help answers without importing torch
            "opdlm-convert-hf-to-megatron=opdlm_megatron.commands.convert_hf_to_megatron:main",
            "opdlm-convert-megatron-to-hf=opdlm_megatron.commands.convert_megatron_to_hf:main",
            "opdlm-prepare-smollm2=opdlm_megatron.commands.prepare_smollm2:main",
            "opdlm-generate=opdlm_megatron.commands.generate:main",
            "opdlm-train=opdlm_megatron.commands.train:main",
            "opdlm-eval=opdlm_megatron.commands.evaluate:main",
            "opdlm-lm-eval=opdlm_megatron.commands.lm_eval:main",
            "opdlm-convert-layout=opdlm_megatron.commands.convert_layout:main",
            "opdlm-plan=opdlm_megatron.commands.plan:main",
            "opdlm-pretrain-megatron-lm=opdlm_megatron.commands.pretrain_megatron_lm:main",
            "opdlm-quantize=opdlm_megatron.commands.quantize:main",
        ]
    },
)
