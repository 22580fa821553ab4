"""Post-training quantization with NVIDIA ModelOpt (model/quantization.py, rollout/calibration.py) on CPU:
FP8 and INT8 SmoothQuant fake quantization of megatron's linear layers through ModelOpt's Megatron-Core plugin,
calibrated on the student's own decoding. References: the unquantized model's decoding forwards (the ranges),
torch's float8_e4m3fn rounding (the quantized layers), the naive block-diffusion decoder (the engine)."""

import pytest
import torch
import torch.nn.functional as F

from opdlm_megatron.model.build import build_model
from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
from tests.helpers import tiny_config
from tests.test_rollout import PROMPTS

pytest.importorskip("modelopt.torch.quantization")

DECODE = DecodeConfig(max_new_tokens=8, block_size=4, threshold=0.5)
FP8_MAX = 448.0  # E4M3's largest finite value


def _linears(model, prefix: str = "decoder."):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return {name: m for name, m in model.named_modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and name.startswith(prefix)}


def _fp8(tensor: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 E4M3 fake quantization, with torch's own float8 rounding."""
    scale = FP8_MAX / amax.double()
    return (tensor.double() * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() / scale


def quantized_ranges(model) -> dict:
    """{(global layer number, linear name): (input amax, weight amax)} of this rank's quantized linears."""
    return {(layer.layer_number, name): (float(m.input_quantizer.amax), float(m.weight_quantizer.amax))
            for layer in model.decoder.layers for name, m in _linears(layer, prefix="").items()}


def _student(seed: int = 0):
    from megatron.core import tensor_parallel

    config = tiny_config()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return build_model(config, "student", init_method_std=0.5).eval(), config


def test_fp8_ptq_calibrates_on_decoding_states_and_quantizes_like_float8(runtime):
    """Every quantized linear's input range is the largest input it saw while the unquantized student decoded the
    calibration prompts, its weight range the weight's; its output equals the float64 product of the
    float8-rounded input and weight; the output layer stays unquantized."""
    from opdlm_megatron.rollout.calibration import quantize_on_rollouts

    model, config = _student()
    reference = build_model(config, "student").eval()
    reference.load_state_dict(model.state_dict())
    largest = {}

    def track(name):
        def hook(module, args):
            largest[name] = max(largest.get(name, 0.0), float(args[0].detach().abs().max()))
        return hook

    hooks = [m.register_forward_pre_hook(track(n)) for n, m in _linears(reference).items()]
    DiffusionRolloutEngine(reference, config, forward_impl="megatron").generate(PROMPTS, DECODE)
    for h in hooks:
        h.remove()

    quantize_on_rollouts(model, config, "fp8", PROMPTS, DECODE)
    linears = _linears(model)
    assert set(linears) == set(largest) and len(linears) == 4 * 4
    for name, module in linears.items():
        assert float(module.input_quantizer.amax) == pytest.approx(largest[name], rel=1e-6), name
        assert float(module.weight_quantizer.amax) == pytest.approx(float(module.weight.abs().max()), rel=1e-6)
    assert not model.output_layer.weight_quantizer.is_enabled

    seen = {}
    hooks = [m.register_forward_hook(lambda module, args, out, name=n: seen.__setitem__(
        name, (args[0].detach().clone(), out[0].detach().clone())))
             for n, m in linears.items()]
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        model(ids, torch.arange(ids.shape[1])[None], None)
    for h in hooks:
        h.remove()
    for name, (x, y) in seen.items():
        module = linears[name]
        expected = F.linear(_fp8(x, module.input_quantizer.amax), _fp8(module.weight, module.weight_quantizer.amax))
        assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5), (name, (y.double() - expected).abs().max())
        unquantized = F.linear(x.double(), module.weight.double())
        assert not torch.allclose(y.double(), unquantized, rtol=1e-5, atol=1e-5), name  # it really rounds


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq"])
def test_a_quantized_student_decodes_like_the_naive_decoder(runtime, fmt):
    """The engine (KV cache, megatron's forward) on the quantized student gives the tokens and commit rounds of
    the naive decoder that recomputes every round on the same quantized student; the fused forward refuses it.
    INT8 SmoothQuant: per-channel weight ranges (the rows' largest smoothed weights)."""
    from opdlm_megatron.rollout.calibration import quantize_on_rollouts
    from tests.distributed.train_common import naive_rollout

    model, config = _student(seed=1)
    quantize_on_rollouts(model, config, fmt, PROMPTS, DECODE)
    got = DiffusionRolloutEngine(model, config).generate(PROMPTS, DECODE)
    expected = naive_rollout(model, config, PROMPTS, DECODE)
    assert torch.equal(got.answer_ids, expected.answer_ids) and torch.equal(got.commit_step, expected.commit_step)
    with pytest.raises(ValueError, match=f"cannot run this model: ModelOpt {fmt} quantization"):
        DiffusionRolloutEngine(model, config, forward_impl="fused")
    if fmt == "int8_sq":
        fc1 = model.decoder.layers[0].mlp.linear_fc1
        amax = fc1.weight_quantizer.amax.flatten()
        assert amax.numel() == fc1.weight.shape[0]
        assert torch.allclose(amax, fc1.weight.detach().abs().amax(dim=1), rtol=1e-5)


def test_formats_this_machine_cannot_run_are_refused_in_one_line(runtime):
    from opdlm_megatron.model.quantization import quantize

    model, _ = _student()
    with pytest.raises(ValueError, match="'nvfp4' runs on CUDA GPUs only .* on cpu use fp8 or int8_sq"):
        quantize(model, "nvfp4", None, "cpu")
    with pytest.raises(ValueError, match=r"format 'int4' is not one of \['fp8', 'int8_sq', 'nvfp4'\]"):
        quantize(model, "int4", None, "cpu")
    assert not any("quantizer" in name for name, _ in model.named_modules())  # nothing half-done


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_quantized_student_at_tp2_and_pp2_equals_tp1(runtime, tmp_path, tp, pp):
    """FP8 quantization of the same checkpoint calibrated on the same prompts at TP 2 (ModelOpt's Megatron plugin
    takes each range's maximum over the TP ranks' shards) and PP 2 gives TP 1's ranges and decoding, and TP 2 its
    logits."""
    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.rollout.calibration import quantize_on_rollouts
    from tests.conftest import run_torchrun

    model, config = _student(seed=2)
    ckpt = tmp_path / "ckpt"
    save_model_checkpoint(model, str(ckpt), config)
    quantize_on_rollouts(model, config, "fp8", PROMPTS, DECODE)
    expected = DiffusionRolloutEngine(model, config).generate(PROMPTS, DECODE)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], None)
    out = tmp_path / "out.pt"
    run_torchrun("quantize_parallel.py", f"--ckpt={ckpt}", f"--tp={tp}", f"--pp={pp}", f"--out={out}")
    got = torch.load(out)
    ranges = quantized_ranges(model)
    assert set(got["ranges"]) == set(ranges)
    for name, (input_amax, weight_amax) in ranges.items():
        assert got["ranges"][name] == pytest.approx((input_amax, weight_amax), rel=1e-5), name
    if pp == 1:
        assert torch.allclose(got["logits"], logits, rtol=1e-4, atol=1e-4), (got["logits"] - logits).abs().max()
    assert torch.equal(got["answer_ids"], expected.answer_ids) and torch.equal(got["commit_step"], expected.commit_step)
