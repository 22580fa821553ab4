"""The loss normalisation of ``student_step`` (one weight per supervised token over the global batch,
paper Algorithm 1) and its gradient against a dense float64 reference, at TP=1 in-process and at
DP=2 (with and without megatron's distributed optimizer), TP=2 and PP=2 under torchrun, for a
distillation batch (opd), a 1/t-weighted cross-entropy batch (mdlm) and a causal one (ar)."""

import pytest
import torch

from opdlm_megatron.checkpoint.model import save_model_checkpoint
from opdlm_megatron.model.losses import DivergenceConfig
from opdlm_megatron.model.build import build_model
from opdlm_megatron.runtime.platform import initialize_runtime
from opdlm_megatron.training.student import student_step
from opdlm_megatron.distill.teacher import FrozenTeacher
from tests.conftest import run_torchrun
from tests.distributed.grad_layouts import KINDS, LAYOUTS, global_batch, reference, refined_targets
from tests.distributed.student_data import student_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("normalization")
    config = student_config()
    with initialize_runtime(device="cpu", seed=31):
        student = build_model(config, "student")
        save_model_checkpoint(student, str(root / "student"), config)
        student_state = {k: v.detach().clone() for k, v in student.state_dict().items() if not k.endswith("_extra_state")}
    with initialize_runtime(device="cpu", seed=32):
        teacher = build_model(config, "teacher")
        save_model_checkpoint(teacher, str(root / "teacher"), config)
        teacher_state = {k: v.detach().clone() for k, v in teacher.state_dict().items() if not k.endswith("_extra_state")}
    refs, losses = {}, {}
    for kind in KINDS:
        losses[kind], refs[kind] = reference(student_state, teacher_state, config, global_batch(config, kind), kind)
    torch.save(refs, root / "reference.pt")
    return dict(root=root, config=config, refs=refs, losses=losses)


@pytest.mark.parametrize("kind", KINDS)
def test_tp1_loss_and_gradient_match_dense_float64(setup, kind):
    from opdlm_megatron.checkpoint.model import build_from_checkpoint

    root = setup["root"]
    with initialize_runtime(device="cpu", seed=3):
        student, config = build_from_checkpoint(str(root / "student"), "student")
        teacher_model, teacher_config = build_from_checkpoint(str(root / "teacher"), "teacher")
        batch = global_batch(config, kind)
        targets = None
        if batch.distill:
            r = batch.answers
            teacher = FrozenTeacher(teacher_model, teacher_config, config)
            targets = teacher.targets(r.prompt_ids, r.prompt_valid, r.answer_ids, r.answer_valid, batch.supervised,
                                      micro_batch_size=3)
            targets = refined_targets(kind, batch, teacher, targets, micro_batch_size=3)
        student.zero_grad(set_to_none=True)
        out = student_step(student, config, batch, targets, DivergenceConfig(chunk_tokens=5), micro_batch_size=3)
        assert out["loss"] == pytest.approx(setup["losses"][kind], rel=1e-5)
        assert out["num_tokens"] == float(batch.supervised.sum())
        for name, param in student.named_parameters():
            want = setup["refs"][kind][name]
            assert torch.allclose(param.grad, want, rtol=1e-3, atol=1e-6 * float(want.abs().max())), (kind, name)


@pytest.mark.distributed
def test_dp2_tp2_pp2_gradients_match_dense_float64(setup, tmp_path):
    root = setup["root"]
    out = tmp_path / "layouts.pt"
    run_torchrun("grad_layouts.py", f"--student={root / 'student'}", f"--teacher={root / 'teacher'}",
                 f"--reference={root / 'reference.pt'}", f"--out={out}")
    got = torch.load(out, weights_only=True)
    assert set(got) == set(LAYOUTS)
    for layout, per_kind in got.items():
        for kind, result in per_kind.items():
            assert result["loss"] == pytest.approx(setup["losses"][kind], rel=1e-5), (layout, kind)
            assert result["max_rel_grad_err"] < 1e-4, (layout, kind, result)
