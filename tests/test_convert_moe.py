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
    "mixtral_top2_of_4": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                                tie_word_embeddings=True)),
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
    # the routing of the student's training forwards (3 experts): dropless, not one expert idle or all-taking
    assert first["moe/dropped_share"] == 0.0
    assert 0 < first["moe/expert_share_min"] <= 1 / 3 <= first["moe/expert_share_max"] < 1
    assert "moe/load_balancing_loss" not in first  # off by default

    # with the load-balancing loss on: the same KL (it is not part of the reported loss), another gradient
    balanced = train_config_from_dict(tiny_train_dict(str(tmp_path / "balanced"), data, ckpt, train=dict(steps=1),
                                                      checkpoint=dict(resume=False),
                                                      loss=dict(state_selection="trajectory"),
                                                      moe=dict(load_balancing="aux_loss", aux_loss_coeff=1.0)))
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(balanced, rt, rollout_fn=naive_rollout)
        step = trainer.train_step()
        assert trainer.student.config.moe_aux_loss_coeff == 1.0 and trainer.teacher.model.config.moe_aux_loss_coeff == 0
        trainer.close()
    assert step["loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert step["moe/load_balancing_loss"] >= 1.0 - 1e-6  # the switch loss is >= 1, = 1 only when balanced
    assert step["grad_norm"] != pytest.approx(first["grad_norm"], rel=1e-3)


@pytest.mark.distributed
@pytest.mark.parametrize("layouts,nproc,name", [("pp2,ep2,tp2sp", 2, "mixtral_top2_of_4"),
                                               ("pp2ep2,cp2ep2", 4, "qwen3_moe_norm_topk")])
def test_opd_steps_of_an_moe_student_at_pp2_and_ep2_equal_one_rank(moe_models, tmp_path, layouts, nproc, name):
    """Two OPD steps (all_rounds states) of a converted Mixtral student over replayed rollouts, split over two
    pipeline stages, over two expert-parallel ranks (each holds two of the four experts; the two data-parallel
    ranks' rows differ in length, tokens go to their experts by all-to-all), over two tensor-parallel ranks
    with sequence parallelism (each routes its share of the columns; the experts split over the TP ranks), and
    of a Qwen3-MoE student on 4 ranks at PP 2 x EP 2 and CP 2 x EP 2 (each row's columns over two ranks, the
    experts over the data x context parallel ranks): the same losses, teacher NLLs and gradient norms as on one
    rank; every layout's routing drops nothing."""
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.training.config_files import train_config_from_dict
    from opdlm_megatron.training.trainer import Trainer
    from tests.conftest import run_torchrun
    from tests.distributed.train_common import RecordingRollout, naive_rollout, tiny_train_dict, write_token_prompts

    ckpt = str(tmp_path / "ckpt")
    convert(moe_models[name][0], ckpt, block_size=4)
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
            assert res["moe/dropped_share"] == 0.0, layout
            assert res["moe/expert_share_min"] <= 0.25 <= res["moe/expert_share_max"], layout


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
    """Experts split over expert-parallel ranks (EP must divide them); an MoE student trains at TP > 1 only
    with sequence parallelism (megatron's MoE layer; decoding and the teacher run at TP 2 without it); EP on a
    dense model is refused; the router's training terms are checked, and refused for a dense student."""
    from opdlm_megatron.config.model import ModelConfig
    from opdlm_megatron.training.build import student_architecture
    from opdlm_megatron.training.config_files import train_config_from_dict

    config = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, vocab_size=250,
                         num_experts=4, moe_router_topk=2)
    config.check_parallel(1, 2, 4)
    config.check_parallel(2, 1, 2)
    with pytest.raises(ValueError, match="num_experts 4 is not divisible by expert parallel size 3"):
        config.check_parallel(1, 1, 3)
    with pytest.raises(ValueError, match="expert parallel size 2 needs a mixture-of-experts model"):
        config.replace(num_experts=None).check_parallel(1, 1, 2)

    def run(**sections):
        return train_config_from_dict(dict(model=dict(random_init=True, model_config={"x": 1}), **sections))

    tp2 = dict(tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="tensor parallel size 2 only with parallel.sequence_parallel=true"):
        student_architecture(run(parallel=tp2), config, "cpu")
    assert student_architecture(run(parallel=dict(tp2, sequence_parallel=True)), config, "cpu").num_experts == 4
    balancing = dict(load_balancing="aux_loss", aux_loss_coeff=1e-2)
    with pytest.raises(ValueError, match="this student is dense"):
        student_architecture(run(moe=balancing), config.replace(num_experts=None), "cpu")
    assert run(moe=dict(balancing, z_loss_coeff=1e-3)).moe.transformer_overrides() == dict(
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    for bad, message in ((dict(load_balancing="aux_loss"), "disagree: a balancing loss needs a coefficient > 0"),
                         (dict(aux_loss_coeff=0.1), "'none' takes 0"),
                         (dict(load_balancing="sinkhorn", aux_loss_coeff=0.1), "moe.load_balancing"),
                         (dict(z_loss_coeff=-1), "moe.z_loss_coeff must be a number >= 0")):
        with pytest.raises(ValueError, match=message):
            run(moe=bad)


def test_megatron_lm_router_flags_fill_the_moe_section():
    """Under Megatron-LM its router flags are the ``moe`` section (one balancing type, one coefficient); the
    balancing algorithms that are not a loss are refused."""
    from argparse import Namespace

    from opdlm_megatron.integrations.megatron_lm.arguments import _router_terms

    args = Namespace(moe_router_load_balancing_type=["seq_aux_loss"], moe_aux_loss_coeff=[1e-3], moe_z_loss_coeff=None)
    assert _router_terms(args) == dict(load_balancing="seq_aux_loss", aux_loss_coeff=1e-3, z_loss_coeff=0.0)
    with pytest.raises(ValueError, match="--moe-router-load-balancing-type aux_loss seq_aux_loss: OPD takes one"):
        _router_terms(Namespace(**{**vars(args), "moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"]}))
    with pytest.raises(ValueError, match="sinkhorn: OPD's routers take none, aux_loss"):
        _router_terms(Namespace(**{**vars(args), "moe_router_load_balancing_type": "sinkhorn"}))


def test_router_statistics_equal_a_float64_routing_of_the_same_inputs(runtime):
    """The per-step router statistics (tokens per expert, dropped share, the load-balancing and z losses megatron's
    router computes) equal a float64 top-k routing of the routers' inputs: two micro-batches through each MoE layer
    in training mode; an eval-mode forward in between (a rollout) is not counted."""
    from opdlm_megatron.model.build import build_model
    from opdlm_megatron.training.config import MoEConfig
    from opdlm_megatron.training.router_stats import RouterStatistics
    from tests.helpers import tiny_config

    config = tiny_config(num_layers=2, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)
    moe = MoEConfig(load_balancing="aux_loss", aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    model = build_model(config, "student", init_method_std=0.5, **moe.transformer_overrides())
    stats = RouterStatistics.for_student(model, config, moe)
    seen = []
    hooks = [layer.mlp.router.register_forward_pre_hook(lambda module, args: seen.append(
        (module.layer_number, args[0].detach().double(), module.weight.detach().double()))) for layer in model.decoder.layers]
    g = torch.Generator().manual_seed(0)
    model.train()
    for micro in range(2):
        for layer in model.decoder.layers:
            layer.mlp(torch.randn(5 + micro, 3, config.hidden_size, generator=g))
    model.eval()
    with torch.no_grad():
        model.decoder.layers[0].mlp(torch.randn(7, 2, config.hidden_size, generator=g))
    for hook in hooks:
        hook.remove()
    got = stats.collect()
    counts = torch.zeros(2, 4, dtype=torch.float64)
    balance, z = torch.zeros(2), torch.zeros(2)
    for layer_number, hidden, weight in seen[:4]:  # the training forwards (the eval one is seen[4])
        logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
        top = torch.zeros_like(logits).scatter(1, logits.topk(2, dim=1).indices, 1.0)
        counts[layer_number - 1] += top.sum(0)
        tokens = logits.shape[0]
        scores = logits.softmax(dim=1)
        balance[layer_number - 1] += (scores.sum(0) * top.sum(0)).sum() * 4 / (2 * tokens * tokens) / 2
        z[layer_number - 1] += torch.logsumexp(logits, dim=1).square().mean() / 2
    assert torch.equal(stats.last_tokens_per_expert, counts)
    shares = counts / counts.sum(dim=1, keepdim=True)
    assert got["moe/expert_share_max"] == pytest.approx(float(shares.max()))
    assert got["moe/expert_share_min"] == pytest.approx(float(shares.min()))
    assert got["moe/dropped_share"] == 0.0
    assert got["moe/load_balancing_loss"] == pytest.approx(float(balance.mean()), rel=1e-5)
    assert got["moe/z_loss"] == pytest.approx(float(z.mean()), rel=1e-5)
    assert float(shares.max()) > 0.25 > float(shares.min())  # the random router is not uniform: a real check
    again = stats.collect()  # counts and megatron's tracker were reset
    assert math.isnan(again["moe/z_loss"]) and "moe/expert_share_max" not in again
    stats.close()


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


def test_every_objective_trains_an_moe_student(moe_models, tmp_path):
    """Each registered objective takes a step on a converted Mixtral student (one rank): a finite loss, the
    student's routers move, its routing drops nothing (OPD's parity with one rank at EP / PP / TP / CP: above)."""
    from opdlm_megatron.objectives import objective_names
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.training.config_files import train_config_from_dict
    from opdlm_megatron.training.trainer import Trainer
    from tests.distributed.train_common import naive_rollout, tiny_train_dict, write_token_prompts

    ckpt = str(tmp_path / "ckpt")
    convert(moe_models["mixtral_top2_of_4"][0], ckpt, block_size=4)
    data = write_token_prompts(str(tmp_path / "prompts.jsonl"), num=4, vocab=VOCAB)
    router = "decoder.layers.1.mlp.router.weight"
    for objective in objective_names():
        cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / objective), data, ckpt, objective=objective,
                                                     train=dict(steps=1), checkpoint=dict(resume=False),
                                                     optim=dict(lr=1e-2, min_lr=1e-2, warmup_steps=0)))
        with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
            trainer = Trainer(cfg, rt, rollout_fn=naive_rollout)
            before = trainer.student.state_dict()[router].clone()
            step = trainer.train_step()
            moved = not torch.equal(trainer.student.state_dict()[router], before)
            trainer.close()
        assert math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]), objective
        assert moved and step["moe/dropped_share"] == 0.0, objective
