"""Mixtures of experts: tiny random Qwen3-MoE and Mixtral models from transformers, converted to megatron-core's
MoE layers (local spec, SequentialMLP, dropless top-k routing) on CPU. References: HF transformers' logits of the
original model and its safetensors files (round trips bit for bit in fp32)."""

import json
import re
import math
import os

import pytest
import torch

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.tools.convert_hf_to_megatron import convert
from opdlm_megatron.tools.convert_megatron_to_hf import export
from opdlm_megatron.tools.hf_mapping import ConversionError, model_config_from_hf
from tests.distributed.convert_common import (VOCAB, hf_logits, make_tiny_hf, max_valid_diff, megatron_logits,
                                              sample_batch)
from tests.test_convert import read_safetensors

COMMON = dict(hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
              eos_token_id=2, num_attention_heads=4, num_key_value_heads=2)
# name -> (config class, fields): QK-norm + head_dim != hidden/heads + normalised top-2 of 4 (Qwen3-MoE), the same
# unnormalised (softmax over all experts, top-k kept: megatron's pre-softmax router), top-2 of 3 untied (Mixtral)
MOE_MODELS = {
    "qwen3_moe_norm_topk": ("Qwen3MoeConfig", dict(head_dim=32, intermediate_size=96, moe_intermediate_size=48,
                                                   num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                                   decoder_sparse_step=1, mlp_only_layers=[],
                                                   tie_word_embeddings=True)),
    "qwen3_moe_pre_softmax": ("Qwen3MoeConfig", dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                                     num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                                     decoder_sparse_step=1, mlp_only_layers=[],
                                                     tie_word_embeddings=False)),
    "mixtral_top2_of_3": ("MixtralConfig", dict(intermediate_size=40, num_local_experts=3, num_experts_per_tok=2,
                                                tie_word_embeddings=False)),
}


def make_moe_hf(name: str, directory: str, seed: int = 0):
    """A tiny random MoE model with randomised norms and routers (a mis-mapped one shows in the logits)."""
    return make_tiny_hf(name, directory, seed, models=MOE_MODELS, common=COMMON)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    batch = sample_batch()
    return {name: (str(root / name), hf_logits(make_moe_hf(name, str(root / name)), batch)) for name in MOE_MODELS}


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_moe_logits_match_hf_and_round_trip_bitwise(moe_models, tmp_path, runtime, name):
    hf_dir, expected = moe_models[name]
    convert(hf_dir, str(tmp_path / "ckpt"))
    model, config = build_from_checkpoint(str(tmp_path / "ckpt"), "teacher")
    hf = json.load(open(os.path.join(hf_dir, "config.json")))
    assert config.num_experts == hf.get("num_experts") or config.num_experts == hf.get("num_local_experts")
    assert type(model.decoder.layers[0].mlp).__name__ == "MoELayer"
    batch = sample_batch()
    got = megatron_logits(model, config, batch)
    assert max_valid_diff(got, expected, batch["valid"]) <= 1e-4

    export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), include_mask_token=False)
    original, exported = read_safetensors(hf_dir), read_safetensors(str(tmp_path / "hf"))
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    after = json.load(open(tmp_path / "hf" / "config.json"))
    for key, value in hf.items():
        assert after[key] == value, key
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert max_valid_diff(hf_logits(reloaded, batch), expected, batch["valid"]) == 0.0


def test_moe_layouts_the_converter_refuses():
    base = dict(COMMON, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=16,
                intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    assert model_config_from_hf(base).num_experts == 4
    with pytest.raises(ConversionError, match="mlp_only_layers"):
        model_config_from_hf(dict(base, mlp_only_layers=[1]))
    with pytest.raises(ConversionError, match="decoder_sparse_step=2"):
        model_config_from_hf(dict(base, decoder_sparse_step=2))
    with pytest.raises(ConversionError, match="shared experts"):
        model_config_from_hf(dict(base, shared_expert_intermediate_size=64))
    with pytest.raises(ConversionError, match="unsupported architecture 'DeepseekV3ForCausalLM'"):
        model_config_from_hf(dict(base, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"))
    with pytest.raises(ValueError, match="moe_router_topk 5 exceeds num_experts 4"):
        model_config_from_hf(dict(base, num_experts_per_tok=5))


def test_moe_student_decodes_like_the_naive_decoder_and_alone_as_in_a_batch(moe_models, tmp_path, runtime):
    """The engine decodes an MoE student through megatron's forward (the fused one names MoE as unsupported):
    the same tokens and commit rounds as a full-recompute reference, and a prompt alone as in the batch
    (dropless routing: a row's experts never depend on the rows beside it)."""
    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
    from tests.test_rollout import PROMPTS, _result_rows, reference_decode

    convert(moe_models["qwen3_moe_norm_topk"][0], str(tmp_path / "ckpt"), block_size=4)
    model, config = build_from_checkpoint(str(tmp_path / "ckpt"), "student")
    engine = DiffusionRolloutEngine(model.eval(), config)
    assert engine.forward_reason == "mixture of experts"
    for rule in (dict(threshold=0.5), dict(tokens_per_step=2)):
        decode = DecodeConfig(max_new_tokens=12, block_size=4, eos_token_ids=[], **rule)
        rows = _result_rows(engine.generate(PROMPTS, decode))
        for prompt, row in zip(PROMPTS, rows):
            assert row == reference_decode(model, config, prompt, block=4, max_new=12, **rule)
            assert _result_rows(engine.generate([prompt], decode))[0] == row
    assert all(steps.count(s) == 2 for _, steps in rows for s in steps)  # two commits per step: several rows


def test_opd_step_of_an_moe_student_equals_the_dense_reference_and_trains_its_routers(moe_models, tmp_path):
    """One OPD step of a converted Qwen3-MoE student (megatron's MoE layers, dropless): the trainer's loss equals
    the float64 forward-KL reference over the same rollout and states; a second step moves the student's routers
    while the frozen teacher's stay put."""
    from opdlm_megatron.distill import states
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.training.config_files import train_config_from_dict
    from opdlm_megatron.training.trainer import Trainer
    from tests.distributed.train_common import RecordingRollout, naive_rollout, tiny_train_dict, write_token_prompts
    from tests.test_trainer import _dense_opd_loss

    ckpt = str(tmp_path / "ckpt")
    convert(moe_models["mixtral_top2_of_3"][0], ckpt, block_size=4)
    data = write_token_prompts(str(tmp_path / "prompts.jsonl"), num=4, vocab=VOCAB)
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), data, ckpt, train=dict(steps=2),
                                                 checkpoint=dict(resume=False),
                                                 loss=dict(state_selection="trajectory")))
    rec = RecordingRollout(naive_rollout)
    router = "decoder.layers.0.mlp.router.weight"
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=rec)
        student0 = build_model(trainer.config, "student")
        student0.load_state_dict(trainer.student.state_dict(), strict=False)
        teacher_router = trainer.teacher.model.state_dict()[router].clone()
        first = trainer.train_step()
        result = rec.results[0]
        xt = states.select_states(result, "trajectory", trainer.data._step_generator(0), trainer.config.mask_token_id,
                                  block_size=trainer.config.block_size)
        ref = _dense_opd_loss(student0.eval(), trainer.teacher.model, trainer.config, result, xt,
                              trainer.config.eos_token_ids)
        second = trainer.train_step()
        moved = not torch.equal(trainer.student.state_dict()[router], student0.state_dict()[router])
        teacher_still = torch.equal(trainer.teacher.model.state_dict()[router], teacher_router)
        trainer.close()
    assert first["loss"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert moved and teacher_still and math.isfinite(second["grad_norm"])


@pytest.mark.distributed
@pytest.mark.parametrize("layouts,nproc", [("pp2,ep2", 2), ("pp2ep2,cp2ep2", 4)])
def test_opd_steps_of_an_moe_student_at_pp2_and_ep2_equal_one_rank(moe_models, tmp_path, layouts, nproc):
    """Two OPD steps (all_rounds states) of a converted Qwen3-MoE student over replayed rollouts, split over two
    pipeline stages, over two expert-parallel ranks (each holds two of the four experts; the two data-parallel
    ranks' rows differ in length, tokens go to their experts by all-to-all), and on 4 ranks PP 2 x EP 2 and
    CP 2 x EP 2 (each row's columns over two ranks, the experts over the data x context parallel ranks): the
    same losses, teacher NLLs and gradient norms as on one rank."""
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.training.config_files import train_config_from_dict
    from opdlm_megatron.training.trainer import Trainer
    from tests.conftest import run_torchrun
    from tests.distributed.train_common import RecordingRollout, naive_rollout, tiny_train_dict, write_token_prompts

    ckpt = str(tmp_path / "ckpt")
    convert(moe_models["qwen3_moe_norm_topk"][0], ckpt, block_size=4)
    data = write_token_prompts(str(tmp_path / "prompts.jsonl"), num=4, vocab=VOCAB)
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "pp1"), data, ckpt, train=dict(steps=2),
                                                 checkpoint=dict(resume=False)))
    rec = RecordingRollout(naive_rollout)
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=rec)
        history = trainer.fit()
        trainer.close()
    torch.save({"results": rec.results}, tmp_path / "rollouts.pt")
    out = tmp_path / "parallel.pt"
    run_torchrun("train_parallel.py", f"--ckpt={ckpt}", f"--data={data}", f"--rollouts={tmp_path / 'rollouts.pt'}",
                 f"--run-dir={tmp_path}", f"--out={out}", f"--layouts={layouts}", nproc=nproc)
    results = torch.load(out)
    for layout in layouts.split(","):
        got = results[layout]
        assert len(got) == len(history) == 2
        for ref, res in zip(history, got):
            for key in ("loss", "teacher_nll", "grad_norm"):
                assert res[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (layout, ref["step"], key)


def test_moe_parameter_counts_match_the_built_model(runtime):
    """ModelConfig.num_parameters counts every expert (memory: the planner) and, active=True, the top-k a
    token runs through (FLOPs); checked against megatron's MoE model and a hand count."""
    from opdlm_megatron.config.model import ModelConfig
    from opdlm_megatron.model.build import build_model

    config = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                         vocab_size=250, num_experts=4, moe_ffn_hidden_size=24, moe_router_topk=2,
                         tie_word_embeddings=False)
    model = build_model(config, "student")
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())
    per_expert = 3 * 24 * 64
    assert config.num_parameters() - config.num_parameters(active=True) == 2 * (4 - 2) * per_expert


def test_moe_layouts_are_checked():
    """Experts split over expert-parallel ranks (EP must divide them); TP > 1 needs megatron's sequence parallelism
    for MoE layers, which the OPD layouts do not have yet; EP on a dense model is refused."""
    from opdlm_megatron.config.model import ModelConfig

    config = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, vocab_size=250,
                         num_experts=4, moe_router_topk=2)
    config.check_parallel(1, 2, 4)
    with pytest.raises(ValueError, match="num_experts 4 is not divisible by expert parallel size 3"):
        config.check_parallel(1, 1, 3)
    with pytest.raises(ValueError, match="tensor parallel size 1 .* got TP 2"):
        config.check_parallel(2, 1, 1)
    with pytest.raises(ValueError, match="expert parallel size 2 needs a mixture-of-experts model"):
        config.replace(num_experts=None).check_parallel(1, 1, 2)


def test_bad_expert_parallel_conversions_are_refused_in_one_line(moe_models, tmp_path, capsys):
    """--ep that does not divide the experts, --ep on a dense model, --ep > 1 without torchrun: one line, exit 2,
    nothing written."""
    from opdlm_megatron.commands import convert_hf_to_megatron as cli
    from tests.distributed.convert_common import make_tiny_hf
    from tests.test_cli_hardening import _refused

    dense = str(tmp_path / "dense")
    make_tiny_hf("llama_mha_tied", dense)
    capsys.readouterr()  # transformers' progress bars while the fixtures wrote their models
    program = "opdlm-convert-hf-to-megatron"
    for hf_dir, ep, message in ((moe_models["mixtral_top2_of_3"][0], 2, "num_experts 3 is not divisible by expert "
                                 "parallel size 2"),
                                (dense, 2, "expert parallel size 2 needs a mixture-of-experts model"),
                                (moe_models["qwen3_moe_norm_topk"][0], 2, "needs a multiple of 2 processes"),
                                (moe_models["qwen3_moe_norm_topk"][0], 0, "--ep must be a positive integer")):
        _refused(cli.main, ["--hf-dir", hf_dir, "--out", tmp_path / "out", "--ep", ep], program, message, capsys)
        assert not os.path.exists(tmp_path / "out")


@pytest.mark.distributed
def test_ep2_and_pp2_conversions_give_hf_logits_and_export_bitwise(moe_models, tmp_path):
    """HF -> Megatron with the experts split over two expert-parallel ranks (each reads and saves its own) and over
    two pipeline stages (torchrun, gloo, megatron's all-gather token dispatcher): the logits equal HF's, a
    checkpoint converted at one rank loads at either layout to the same logits, and the EP=2 checkpoint exports
    back to the original safetensors bit for bit."""
    from tests.conftest import run_torchrun

    names = ["qwen3_moe_norm_topk", "qwen3_moe_pre_softmax"]  # four experts: two per rank
    root = os.path.dirname(moe_models[names[0]][0])
    for name in names:
        convert(moe_models[name][0], str(tmp_path / "reference" / name))
    out = tmp_path / "logits.pt"
    run_torchrun("convert_moe_parallel.py", f"--models-dir={root}", f"--names={','.join(names)}",
                 f"--reference-dir={tmp_path / 'reference'}", f"--ckpt-dir={tmp_path / 'ckpt'}", f"--out={out}")
    got = torch.load(out)
    valid = sample_batch()["valid"]
    assert sorted(got) == ["ep2", "pp2"]
    for layout, results in got.items():
        for name in names:
            for kind in ("converted", "reloaded"):
                assert max_valid_diff(results[name][kind], moe_models[name][1], valid) <= 1e-4, (layout, name, kind)
    for name in names:
        export(str(tmp_path / "ckpt" / "ep2" / name), str(tmp_path / "hf" / name), include_mask_token=False)
        original, exported = read_safetensors(moe_models[name][0]), read_safetensors(str(tmp_path / "hf" / name))
        assert sorted(exported) == sorted(original), name
        assert all(torch.equal(exported[k], original[k]) for k in original), name


@pytest.mark.distributed
def test_expert_parallel_ranks_with_work_of_different_lengths_keep_in_step(moe_models, tmp_path, runtime):
    """EP=2 (torchrun, gloo; each rank holds two of the four experts): rank 0 decodes one prompt for 8 tokens while
    rank 1 decodes three for 16, scores one answer against three and trains one micro-batch against three, so
    rank 0 forwards idle rows while rank 1 still works (an MoE forward is a collective over the EP group). Every
    rank's tokens, commit rounds and teacher NLLs equal one rank's decoding of the same prompts, and the step's
    loss equals one rank's loss over all rows."""
    from opdlm_megatron.distill.teacher import FrozenTeacher
    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
    from opdlm_megatron.rollout.types import RolloutResult
    from tests.conftest import run_torchrun
    from tests.distributed.moe_expert_parallel import shares
    from tests.helpers import student_forward_backward
    from tests.test_rollout import _result_rows

    ckpt = str(tmp_path / "ckpt")
    convert(moe_models["qwen3_moe_norm_topk"][0], ckpt, block_size=4)
    model, config = build_from_checkpoint(ckpt, "student")
    teacher = FrozenTeacher(model, config, config)
    expected, nll, xts = {}, {}, {}
    g = torch.Generator().manual_seed(3)
    for rank in (0, 1):
        prompts, max_new = shares(rank)
        decode = DecodeConfig(max_new_tokens=max_new, block_size=4, threshold=0.5, eos_token_ids=[])
        expected[rank] = DiffusionRolloutEngine(model.eval(), config).generate(prompts, decode)
        r = expected[rank]
        nll[rank] = teacher.answer_nll(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid, micro_batch_size=4)
        masked = torch.rand(r.answer_ids.shape, generator=g) < 0.5
        xts[rank] = torch.where(masked, torch.full_like(r.answer_ids, config.mask_token_id), r.answer_ids)
    torch.save(xts, tmp_path / "xt.pt")
    union = RolloutResult.concat([expected[0], expected[1]], config.pad_token_id or 0)
    width = union.answer_ids.shape[1]
    xt = torch.cat([torch.nn.functional.pad(xts[r], (0, width - xts[r].shape[1]), value=config.pad_token_id or 0)
                    for r in (0, 1)])
    reference = student_forward_backward(model.train(), config, union, xt, union.answer_ids, "ce", None,
                                         micro_batch_size=4, normalization="token")["loss"]

    out = tmp_path / "ep2.pt"
    run_torchrun("moe_expert_parallel.py", f"--ckpt={ckpt}", f"--xt={tmp_path / 'xt.pt'}", f"--out={out}")
    got = torch.load(out, weights_only=False)
    assert got["local_experts"] == [2, 2]
    for rank in (0, 1):
        assert _result_rows(RolloutResult.from_tensors(got["rollouts"][rank])) == _result_rows(expected[rank])
        torch.testing.assert_close(got["nll"][rank], nll[rank], rtol=1e-5, atol=1e-6)
    assert expected[0].num_forward_passes < expected[1].num_forward_passes  # the ranks' work did differ
    assert got["loss"] == pytest.approx(reference, rel=1e-5)


@pytest.mark.distributed
def test_megatron_lm_pretrain_of_an_moe_student_at_ep2_matches_the_projects_trainer(moe_models, tmp_path):
    """Megatron-LM's real ``pretrain()`` with ``--expert-model-parallel-size 2`` (torchrun, gloo; its MoE flags
    filled from the student's config) trains a converted Qwen3-MoE student with the losses and gradient norms of
    the project's own trainer on one rank (the same prompts, seeds and real rollouts)."""
    import yaml

    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.training.config_files import train_config_from_dict
    from opdlm_megatron.training.trainer import Trainer
    from tests.conftest import run_torchrun
    from tests.distributed.train_common import tiny_train_dict, write_token_prompts
    from tests.test_megatron_lm import ENTRY, LR, _megatron_flags, _steps

    ckpt = str(tmp_path / "ckpt")
    convert(moe_models["qwen3_moe_norm_topk"][0], ckpt, block_size=4)
    data = write_token_prompts(str(tmp_path / "prompts.jsonl"), num=6, vocab=VOCAB)
    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / "own"), data, ckpt, train=dict(steps=2),
        optim=dict(lr=LR, min_lr=LR, warmup_steps=0, weight_decay=0.0, clip_grad=1.0), checkpoint=dict(resume=False)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt)
        reference = [(h["step"] + 1, h["loss"], h["grad_norm"]) for h in trainer.fit()]
        trainer.close()
    opd = tiny_train_dict(str(tmp_path / "ref"), data, ckpt)
    for owned in ("train", "optim", "parallel", "checkpoint"):
        opd.pop(owned)
    (tmp_path / "opd.yaml").write_text(yaml.safe_dump(opd))
    assets = dict(ckpt=ckpt, opd_yaml=str(tmp_path / "opd.yaml"))
    stdout = run_torchrun(ENTRY, *_megatron_flags(assets, 2, "--expert-model-parallel-size", "2",
                                                  run_dir=tmp_path / "mlm"))
    got = _steps(tmp_path / "mlm")
    assert [g[0] for g in got] == [1, 2], stdout[-3000:]
    assert re.search(r"num_experts \.+ 4\n", stdout) and re.search(r"moe_router_topk \.+ 2\n", stdout), stdout[:3000]
    for (it, loss, norm), (_, ref_loss, ref_norm) in zip(got, reference):
        assert loss == pytest.approx(ref_loss, rel=1e-4), (it, loss, ref_loss)
        assert norm == pytest.approx(ref_norm, rel=1e-4), (it, norm, ref_norm)


def test_bad_expert_parallel_training_layouts_are_refused_in_one_line(moe_models, tmp_path, capsys):
    """opdlm-train: EP 2 without torchrun (one process), EP 0: one line, exit 2, no run directory (a dense
    student at EP 2 and experts EP does not divide: test_moe_layouts_are_checked)."""
    import yaml

    from opdlm_megatron.commands import train as cli
    from tests.distributed.train_common import tiny_train_dict, write_token_prompts
    from tests.test_cli_hardening import _refused

    moe = str(tmp_path / "moe")
    convert(moe_models["qwen3_moe_norm_topk"][0], moe, block_size=4)
    data = write_token_prompts(str(tmp_path / "prompts.jsonl"), num=4, vocab=VOCAB)
    capsys.readouterr()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_train_dict(str(tmp_path / "run"), data, moe)))
    for ep, message in ((2, "launch a multiple of 2 ranks"),
                        (0, "parallel.expert_model_parallel_size must be a positive integer")):
        _refused(cli.main, ["--config", config, f"parallel.expert_model_parallel_size={ep}",
                            "parallel.device=cpu"], "opdlm-train", message, capsys)
        assert not os.path.exists(tmp_path / "run")
