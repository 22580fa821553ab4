"""opdlm-plan: layout checks with one-line errors, and its static memory parts against the tensors a
built trainer really holds (student weights, fp32 main gradients, Adam state, teacher weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from opdlm_megatron.config import ModelConfig
from opdlm_megatron.plan import plan, stage_parameters
from opdlm_megatron.platform import initialize_runtime
from opdlm_megatron.train_config import train_config_from_dict
from tests.conftest import REPO_ROOT
from tests.helpers import save_trainer_student
from tests.distributed.train_common import TINY_MODEL, naive_rollout, tiny_train_dict, write_token_prompts

SMOLLM2 = dict(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
               vocab_size=49152, max_sequence_length=2048, block_size=4)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    ckpt = save_trainer_student(root / "ckpt")
    data = write_token_prompts(str(root / "prompts.jsonl"), num=4)
    return dict(root=root, ckpt=str(ckpt), data=data)


def test_static_parts_equal_the_trainers_tensors(assets, tmp_path):
    from opdlm_megatron.trainer import Trainer

    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path), assets["data"], assets["ckpt"], train=dict(steps=1),
                                                 checkpoint=dict(resume=False)))
    config = ModelConfig(**TINY_MODEL)
    estimate = plan(cfg, config, world_size=1).parts
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        trainer.fit()
        weights = sum(p.numel() * p.element_size() for p in trainer.student.parameters())
        grads = sum(p.main_grad.numel() * p.main_grad.element_size() for p in trainer.student.parameters())
        adam = sum(t.numel() * t.element_size() for state in trainer.optimizer.optimizer.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
        teacher = sum(p.numel() * p.element_size() for p in trainer.teacher.model.parameters())
        trainer.close()
    assert estimate["student weights"] == weights
    assert estimate["student gradients (fp32)"] == grads
    assert estimate["optimizer (Adam)"] == adam
    assert estimate["teacher weights"] == teacher


def test_stage_parameters_split_over_tp_and_pp():
    config = ModelConfig(**SMOLLM2)
    whole = stage_parameters(config, 1, 1)
    assert whole == config.num_parameters()
    assert stage_parameters(config, 3, 1) == pytest.approx(whole / 3, rel=1e-3)
    first = stage_parameters(config, 1, 2)
    vocab = config.padded_vocab_size(1) * config.hidden_size
    assert first == vocab + (whole - vocab - config.hidden_size) // 2


@pytest.mark.parametrize("world,overrides,message", [
    (3, ["parallel.tensor_model_parallel_size=2"], "world size 3 is not a multiple of TP 2 x PP 1"),
    (2, ["parallel.tensor_model_parallel_size=2"], "num_attention_heads 9 is not divisible by tensor parallel size 2"),
    (4, ["parallel.pipeline_model_parallel_size=4"], "num_layers 30 is not divisible by pipeline parallel size 4"),
    (3, ["train.global_batch_size=8", "rollout.tasks_per_rollout=8"], "train.global_batch_size 8 is not a multiple of data-parallel size 3"),
])
def test_layout_errors(tmp_path, world, overrides, message):
    model_config = tmp_path / "model"
    ModelConfig(**SMOLLM2).save(str(model_config))
    proc = subprocess.run([sys.executable, "-m", "opdlm_megatron.plan", "--config", str(REPO_ROOT / "configs" / "smollm2_opd.yaml"),
                           "--world-size", str(world), "--model-config", str(model_config), *overrides],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2 and f"opdlm-plan: error: {message}" in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


QWEN3_8B = dict(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32, num_query_groups=8,
                kv_channels=128, vocab_size=151936, tokenizer_size=151669, max_sequence_length=40960,
                qk_layernorm=True, tie_word_embeddings=False, rotary_base=1000000.0, norm_epsilon=1e-6, block_size=4)
SHIPPED = {"smollm2_opd.yaml": (SMOLLM2, 1), "smollm2_opd_long.yaml": (SMOLLM2, 1), "tiny_cpu.yaml": (TINY_MODEL, 1),
           "qwen3_8b_opd_fp8.yaml": (QWEN3_8B, 16)}


def test_every_shipped_config_is_checked():
    assert sorted(SHIPPED) == sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config_name", sorted(SHIPPED))
def test_shipped_configs_plan(tmp_path, config_name):
    """Every shipped config passes the planner on its intended world size (architecture from a config
    file: the checkpoints they name are not on a CI machine; the Qwen3-8B example on 2 nodes x 8 80 GB
    GPUs); a too-small GPU is reported with suggestions (exit 1)."""
    architecture, world_size = SHIPPED[config_name]
    model_config = tmp_path / "model"
    ModelConfig(**architecture).save(str(model_config))
    base = [sys.executable, "-m", "opdlm_megatron.plan", "--config", str(REPO_ROOT / "configs" / config_name),
            "--world-size", str(world_size), "--model-config", str(model_config)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    fits = subprocess.run(base + ["--json"], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert fits.returncode == 0, fits.stderr[-1500:]
    report = json.loads(fits.stdout)
    assert report["fits"] and report["total_bytes"] == pytest.approx(sum(report["parts_bytes"].values()))
    if config_name == "qwen3_8b_opd_fp8.yaml":  # model.student_dtype bfloat16: 2 bytes a weight, fp32 gradients
        parts = report["parts_bytes"]
        assert parts["student weights"] * 2 == parts["student gradients (fp32)"]
    tight = subprocess.run(base + ["--gpu-memory-gb", "0.0001"], capture_output=True, text=True, cwd=REPO_ROOT,
                           env=env, timeout=300)
    assert tight.returncode == 1 and "does NOT fit" in tight.stdout and "try:" in tight.stdout
