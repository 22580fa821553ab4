"""TP=2 and PP=2 (torchrun, gloo, real megatron-core) give the TP=1 loss, logits and gradients."""

import pytest
import torch

from opdlm_megatron.checkpoint.model import save_model_checkpoint
from opdlm_megatron.model.build import build_model
from tests.conftest import run_torchrun
from tests.helpers import forward_backward, random_batch, tiny_config

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP=1 model, its checkpoint, and its results on the shared batch."""
    from opdlm_megatron.runtime.platform import initialize_runtime

    ckpt = tmp_path_factory.mktemp("ref") / "ckpt"
    config = tiny_config()
    with initialize_runtime(device="cpu", seed=7):
        model = build_model(config, "student")
        save_model_checkpoint(model, str(ckpt), config)
        batch = random_batch(config)
        results = {kind: forward_backward(model, config, batch, kind) for kind in ("block", "causal")}
    return ckpt, results


@pytest.mark.parametrize("tp,pp,microbatches", [(2, 1, 1), (1, 2, 3)])
def test_parallel_matches_tp1(reference, tmp_path, tp, pp, microbatches):
    ckpt, expected = reference
    out = tmp_path / "out.pt"
    run_torchrun("model_parallel.py", f"--ckpt={ckpt}", f"--tp={tp}", f"--pp={pp}",
                 f"--microbatches={microbatches}", f"--out={out}")
    got = torch.load(out)
    for kind in ("block", "causal"):
        exp, res = expected[kind], got[kind]
        valid = torch.ones_like(exp["logits"][..., 0], dtype=torch.bool)
        assert torch.allclose(res["loss"], exp["loss"], atol=1e-5, rtol=1e-5), (kind, res["loss"], exp["loss"])
        assert (res["logits"] - exp["logits"])[valid].abs().max() < 1e-4, kind
        assert torch.allclose(res["grad_norm"], exp["grad_norm"], rtol=1e-4), (kind, res["grad_norm"], exp["grad_norm"])
