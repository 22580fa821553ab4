"""HF -> Megatron at TP=2 and PP=2 (torchrun, gloo, real megatron-core): the converted models'
logits equal HF transformers', and every checkpoint written across ranks exports back bit for bit."""

import pytest
import torch

from opdlm_megatron.tools.convert_megatron_to_hf import export
from tests.conftest import run_torchrun
from tests.distributed.convert_common import TINY_MODELS, hf_logits, make_tiny_hf, max_valid_diff, sample_batch
from tests.test_convert import read_safetensors

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    batch = sample_batch()
    return root, {name: hf_logits(make_tiny_hf(name, str(root / name)), batch) for name in TINY_MODELS}


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_conversion_matches_hf(models, tmp_path, tp, pp):
    root, expected = models
    out = tmp_path / "logits.pt"
    run_torchrun("convert_parallel.py", f"--models-dir={root}", f"--ckpt-dir={tmp_path / 'ckpt'}",
                 f"--tp={tp}", f"--pp={pp}", f"--out={out}")
    got = torch.load(out)
    valid = sample_batch()["valid"]
    assert sorted(got) == sorted(expected)
    for name, logits in expected.items():
        assert max_valid_diff(got[name], logits, valid) <= 1e-4, name
        # the shards written by the ranks reassemble into the original tensors
        export(str(tmp_path / "ckpt" / name), str(tmp_path / "hf" / name), include_mask_token=False)
        original, exported = read_safetensors(str(root / name)), read_safetensors(str(tmp_path / "hf" / name))
        assert sorted(exported) == sorted(original), name
        assert all(torch.equal(exported[k], original[k]) for k in original), name
