"""Checkpoints that can be trusted: a manifest (sizes + SHA-256) written last, resume picking the newest
checkpoint that verifies, damaged files named, no pickle loaded from a checkpoint."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.checkpoint.training import (MANIFEST_FILE, latest_checkpoint, load_training_checkpoint,
                                             manifest_problem, write_manifest)
from opdlm_megatron.training.config_files import train_config_from_dict
from tests.distributed.train_common import naive_rollout, tiny_train_dict, write_token_prompts
from tests.helpers import save_trainer_student


class Payload:
    """Anything a pickle could carry instead of tensors."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from opdlm_megatron.training.trainer import Trainer

    root = tmp_path_factory.mktemp("integrity")
    ckpt = save_trainer_student(root / "ckpt")
    data = write_token_prompts(str(root / "prompts.jsonl"), num=4)
    cfg = train_config_from_dict(tiny_train_dict(str(root / "run"), data, ckpt, train=dict(steps=2),
                                                 checkpoint=dict(save_every=1, keep_last=3, resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        trainer.fit()
        trainer.close()
    return cfg


def _load(cfg, directory):
    from opdlm_megatron.training.trainer import Trainer

    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
        try:
            return load_training_checkpoint(directory, trainer.student, trainer.optimizer)
        finally:
            trainer.close()


def test_manifest_lists_every_file(run):
    newest = latest_checkpoint(run.checkpoint_dir)
    assert newest.endswith("step_00000002")
    assert os.path.isfile(os.path.join(newest, MANIFEST_FILE)) and manifest_problem(newest) is None


def test_damaged_newest_is_skipped_and_named(run, tmp_path, caplog):
    import shutil

    root = tmp_path / "checkpoints"
    shutil.copytree(run.checkpoint_dir, root)
    shard = next(f for f in os.listdir(root / "step_00000002") if f.endswith(".distcp"))
    with open(root / "step_00000002" / shard, "r+b") as f:
        f.truncate(os.path.getsize(root / "step_00000002" / shard) // 2)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(root)).endswith("step_00000001")
    assert any("skipping checkpoint" in r.getMessage() and shard in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=f"damaged or incomplete: {shard} has"):
        _load(run, str(root / "step_00000002"))
    # a flipped byte of the same size is caught by the checksum
    shutil.copytree(run.checkpoint_dir, tmp_path / "flip")
    target = tmp_path / "flip" / "step_00000002" / shard
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert manifest_problem(str(tmp_path / "flip" / "step_00000002")) == f"{shard} does not match its checksum"


def test_pickled_rng_file_is_refused(run, tmp_path):
    import shutil

    directory = tmp_path / "step"
    shutil.copytree(os.path.join(run.checkpoint_dir, "step_00000002"), directory)
    torch.save({"payload": Payload()}, directory / "rng" / "rank00000.pt")  # a pickle of an arbitrary object
    write_manifest(str(directory), 2, "x")  # even with a manifest that matches it
    with pytest.raises(ValueError, match="refused to unpickle"):
        _load(run, str(directory))
