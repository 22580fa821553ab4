"""Quantization-aware OPD (``quantization:``; training/build.quantize_student): the student fake-quantized with
NVIDIA ModelOpt for the whole run, calibrated on its own decoding of the run's first prompts, its rollouts
decoded in that precision, the teacher unquantized. References: the calibration done by hand on the same
prompts, the dense float64 OPD loss of the fake-quantized student against the teacher, an uninterrupted run
(resume), TP=1 (TP=2 / PP=2)."""

import json

import pytest
import torch

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.config.model import ModelConfig
from opdlm_megatron.model.build import build_model
from opdlm_megatron.model.quantization import quantization_of
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.config_files import train_config_from_dict
from tests.distributed.train_common import RecordingRollout, naive_rollout, tiny_train_dict
from tests.test_quantization import quantized_ranges
from tests.test_trainer import _against_tp1, _dense_opd_loss, _train, assets  # noqa: F401  (assets: a fixture)

pytest.importorskip("modelopt.torch.quantization")


def _quantized_rollout(seen):
    """naive_rollout that records the precision of the model it decodes with."""
    def rollout(model, config, prompts, decode):
        seen.append(quantization_of(model))
        return naive_rollout(model, config, prompts, decode)
    return rollout


def test_quantization_aware_opd_calibrates_on_its_own_decoding_and_trains_the_quantized_student(assets, tmp_path):
    """Before the first step the student's ranges are those of quantizing it by hand, calibrated on decoding
    the run's first prompts with the first rollout's rule; the teacher has no quantizer; rollouts decode with
    the quantized student; the step's loss is the dense float64 KL of the fake-quantized student against the
    unquantized teacher; the weights move, the ranges stay."""
    from opdlm_megatron.distill import states
    from opdlm_megatron.rollout.calibration import quantize_on_rollouts
    from opdlm_megatron.training.schedules import rollout_length
    from opdlm_megatron.training.trainer import Trainer

    cfg = train_config_from_dict(tiny_train_dict(
        str(tmp_path / "run"), assets["data"], assets["ckpt"], train=dict(steps=1), checkpoint=dict(resume=False),
        quantization=dict(format="fp8", calibration_prompts=4)))
    seen = []
    rec = RecordingRollout(_quantized_rollout(seen))
    prompts = [json.loads(line)["prompt_ids"] for line in open(assets["data"])][:4]
    with initialize_runtime(device="cpu", seed=cfg.seed) as rt:
        trainer = Trainer(cfg, rt, rollout_fn=rec)
        student = trainer.student
        assert quantization_of(student) == "fp8"
        assert not any("quantizer" in name for name, _ in trainer.teacher.model.named_modules())
        reference, config = build_from_checkpoint(assets["ckpt"], "student")
        quantize_on_rollouts(reference.eval(), config, "fp8", prompts,
                             trainer.data.decode_config(0, rollout_length(0, cfg.curriculum)), cfg.rollout.tasks_per_rollout)
        ranges = quantized_ranges(student)
        assert set(ranges) == set(quantized_ranges(reference)) and ranges
        for name, value in quantized_ranges(reference).items():
            assert ranges[name] == pytest.approx(value, rel=1e-6), name

        student0 = build_model(trainer.config.replace(quantization="fp8"), "student").eval()
        student0.load_state_dict(student.state_dict())
        metrics = trainer.train_step()
        assert seen == ["fp8"]
        xt = states.select_states(rec.results[0], "trajectory", trainer.data._step_generator(0),
                                  trainer.config.mask_token_id, block_size=trainer.config.block_size)
        expected = _dense_opd_loss(student0, trainer.teacher.model, trainer.config, rec.results[0], xt,
                                   trainer.data.end_of_turn_ids)
        assert metrics["loss"] == pytest.approx(float(expected), rel=1e-4)
        unquantized = build_model(trainer.config, "student").eval()
        unquantized.load_state_dict(student0.state_dict(), strict=False)
        assert float(_dense_opd_loss(unquantized, trainer.teacher.model, trainer.config, rec.results[0], xt,
                                     trainer.data.end_of_turn_ids)) != pytest.approx(metrics["loss"], rel=1e-4)
        after = student.state_dict()
        before = student0.state_dict()
        assert not torch.equal(after["decoder.layers.0.mlp.linear_fc1.weight"], before["decoder.layers.0.mlp.linear_fc1.weight"])
        assert quantized_ranges(student) == ranges
        trainer.close()


def test_a_quantization_aware_run_resumes_exactly(assets, tmp_path):
    """INT8 SmoothQuant (the weights rescaled at calibration): stopped after step 1 and resumed, the run's
    losses, gradient norms and rollouts equal an uninterrupted run's; its checkpoints reload as quantized
    students."""
    common = dict(train=dict(steps=3), rollout=dict(tasks_per_rollout=2, threshold=0.5, temperature=1.0),
                  quantization=dict(format="int8_sq", calibration_prompts=3), checkpoint=dict(resume=True))
    full = _train(train_config_from_dict(tiny_train_dict(str(tmp_path / "a"), assets["data"], assets["ckpt"], **common)))
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "b"), assets["data"], assets["ckpt"], **common))
    first = _train(cfg, until=1)
    rest = _train(cfg)
    assert len(full) == len(first + rest) == 3
    for a, b in zip(full, first + rest, strict=True):
        for key in ("loss", "grad_norm", "rollout_len", "teacher_nll"):
            assert a[key] == b[key], (a["step"], key)
    saved = f"{cfg.checkpoint_dir}/step_00000001"
    assert ModelConfig.load(saved).quantization == "int8_sq"
    with initialize_runtime(device="cpu", seed=0):
        model, _ = build_from_checkpoint(saved, "student")
        assert quantization_of(model) == "int8_sq"


@pytest.mark.distributed
def test_quantization_aware_opd_at_tp2_and_pp2_equals_tp1(assets, tmp_path):
    """FP8 quantization-aware OPD over the same replayed rollouts at TP 2 and PP 2 (each calibrating on its own
    decoding of the same prompts): TP 1's losses, teacher NLLs and gradient norms."""
    overrides = ["quantization.format=fp8", "quantization.calibration_prompts=3"]
    histories, got = _against_tp1(assets, tmp_path, ["opd"], ["tp2", "pp2"], overrides)
    for layout in ("tp2", "pp2"):
        for ref, res in zip(histories["opd"], got[layout], strict=True):
            for key in ("loss", "teacher_nll", "grad_norm"):
                assert res[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (layout, ref["step"], key)


def test_quantization_settings_are_checked(assets, tmp_path):
    """Bad sections and a quantized student checkpoint under other settings: one-line ValueErrors."""
    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.rollout import DecodeConfig
    from opdlm_megatron.rollout.calibration import quantize_on_rollouts
    from opdlm_megatron.training.trainer import Trainer

    for section, message in ((dict(format="int4"), "quantization.format must be one of ['fp8', 'int8_sq', 'nvfp4']"),
                             (dict(format="fp8", calibration_prompts=0), "quantization.calibration_prompts"),
                             (dict(format="fp8", exclude="decoder.*"), "quantization.exclude must be a list")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            train_config_from_dict(tiny_train_dict(str(tmp_path / "x"), assets["data"], assets["ckpt"],
                                                   quantization=section))
    from opdlm_megatron.training.build import student_architecture

    nvfp4 = train_config_from_dict(tiny_train_dict(str(tmp_path / "y"), assets["data"], assets["ckpt"],
                                                   quantization=dict(format="nvfp4")))
    with pytest.raises(ValueError, match="'nvfp4' runs on CUDA GPUs only"):
        student_architecture(nvfp4, ModelConfig.load(assets["ckpt"]), "cpu")
    with initialize_runtime(device="cpu", seed=0):
        model, config = build_from_checkpoint(assets["ckpt"], "student")
        quantize_on_rollouts(model.eval(), config, "fp8", [[5, 6, 7]], DecodeConfig(max_new_tokens=4))
        save_model_checkpoint(model, str(tmp_path / "ptq"), config)
    cfg = train_config_from_dict(tiny_train_dict(str(tmp_path / "run"), assets["data"], str(tmp_path / "ptq"),
                                                 quantization=dict(format="int8_sq")))
    with initialize_runtime(device="cpu", seed=0) as rt:
        with pytest.raises(ValueError, match=r"the student checkpoint is quantized \(fp8, exclude \[\]\); "
                                             r"quantization.format 'int8_sq'"):
            Trainer(cfg, rt, rollout_fn=naive_rollout)
