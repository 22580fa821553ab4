"""TP=2 (with sequence parallelism) and PP=2 rollouts (torchrun, gloo, real megatron-core) give the TP=1 tokens, greedy and seeded,
through both decoding forwards (megatron's and the fused one), against TP=1 through megatron's."""

import pytest
import torch

from opdlm_megatron.rollout import DecodeConfig

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 30, 40, 50, 60, 70, 80, 90, 100, 110]]
CASES = {
    "greedy": (False, dict(threshold=0.5)),
    "greedy_shift_static": (True, dict(tokens_per_step=2)),
    "sampled": (False, dict(temperature=1.0, top_k=40, top_p=0.95, seed=3, threshold=0.5)),
    "sampled_shift_margin": (True, dict(temperature=0.8, seed=4, confidence="margin", threshold=0.3)),
}


FORWARD_IMPLS = ("megatron", "fused")


def decode_config(**kwargs) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=12, block_size=4, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.rollout import DiffusionRolloutEngine
    from tests.helpers import tiny_config

    ckpt = tmp_path_factory.mktemp("rollout") / "ckpt"
    config = tiny_config()
    results = {}
    with initialize_runtime(device="cpu", seed=5):
        model = build_model(config, "student", init_method_std=0.5)
        save_model_checkpoint(model, str(ckpt), config)
        for name, (shift, kwargs) in CASES.items():
            result = DiffusionRolloutEngine(model, config.replace(logit_shift=shift), forward_impl="megatron").generate(
                PROMPTS, decode_config(**kwargs))
            results[name] = result
    return ckpt, results


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,sequence_parallel", [(2, 1, True), (1, 2, False)])
def test_parallel_rollout_matches_tp1(reference, tmp_path, tp, pp, sequence_parallel):
    """TP=2 is built with sequence parallelism, which the engine leaves for decoding (the same
    weights decode alike either way; the fused forward needs it off) and restores after."""
    from tests.conftest import run_torchrun

    ckpt, expected = reference
    out = tmp_path / "out.pt"
    run_torchrun("rollout_parallel.py", f"--ckpt={ckpt}", f"--tp={tp}", f"--pp={pp}", f"--out={out}",
                 *(["--sequence-parallel"] if sequence_parallel else []))
    got = torch.load(out)
    assert set(got) == {f"{name}/{impl}" for name in expected for impl in FORWARD_IMPLS}
    for key, res in got.items():
        name = key.split("/")[0]
        exp = expected[name]
        assert torch.equal(res["answer_ids"], exp.answer_ids), key
        assert torch.equal(res["answer_valid"], exp.answer_valid), key
        assert torch.equal(res["commit_step"], exp.commit_step), key
        assert res["num_forward_passes"] == exp.num_forward_passes, key
    # the cases really commit several tokens per step somewhere
    steps = expected["greedy"].commit_step
    assert any((steps[i] == s).sum() > 1 for i in range(len(PROMPTS)) for s in steps[i].unique() if s >= 0)


MOE_CASES = ("greedy", "sampled")


@pytest.mark.distributed
def test_moe_rollout_at_tp2_matches_tp1(tmp_path):
    """A mixture-of-experts student (4 experts, top 2; megatron's MoE layer, its forward: the fused one names
    MoE as unsupported) built at TP 2 with sequence parallelism decodes the TP=1 tokens, greedy and sampled:
    the engine decodes outside sequence parallelism in eval mode, where the token dispatcher's gather over
    the TP ranks routes each rank's whole sequence once."""
    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.rollout import DiffusionRolloutEngine
    from tests.conftest import run_torchrun
    from tests.helpers import tiny_config

    ckpt = tmp_path / "ckpt"
    config = tiny_config(num_layers=2, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)
    expected = {}
    with initialize_runtime(device="cpu", seed=5):
        model = build_model(config, "student", init_method_std=0.5)
        save_model_checkpoint(model, str(ckpt), config)
        for name in MOE_CASES:
            shift, kwargs = CASES[name]
            expected[name] = DiffusionRolloutEngine(model, config.replace(logit_shift=shift),
                                                    forward_impl="megatron").generate(PROMPTS, decode_config(**kwargs))
    out = tmp_path / "out.pt"
    run_torchrun("rollout_parallel.py", f"--ckpt={ckpt}", "--tp=2", f"--out={out}", "--sequence-parallel",
                 "--impls=megatron", f"--cases={','.join(MOE_CASES)}")
    got = torch.load(out)
    assert set(got) == {f"{name}/megatron" for name in MOE_CASES}
    for name in MOE_CASES:
        res, exp = got[f"{name}/megatron"], expected[name]
        for key in ("answer_ids", "answer_valid", "commit_step"):
            assert torch.equal(res[key], getattr(exp, key)), (name, key)
    steps = expected["greedy"].commit_step
    assert any((steps[i] == s).sum() > 1 for i in range(len(PROMPTS)) for s in steps[i].unique() if s >= 0)
