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


# ----------------------------------------------------------------- checkpoints and opdlm-quantize
def _logits(model, prompt):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None], None)


def _buffers(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if "quantizer" in k}


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq"])
def test_a_quantized_checkpoint_reloads_as_the_same_quantized_student(runtime, tmp_path, fmt):
    """Saved and rebuilt from its config: the same quantizer ranges (and SmoothQuant scales, and the smoothed
    weights), bit for bit, hence the same logits; ModelOpt's pickled per-layer state is not in the checkpoint.
    The checkpoint refuses an unquantized model, and the teacher's places refuse it."""
    from megatron.core import dist_checkpointing

    from opdlm_megatron.checkpoint.model import build_from_checkpoint, load_model_checkpoint, save_model_checkpoint
    from opdlm_megatron.checkpoint.training import check_teacher_checkpoint
    from opdlm_megatron.config.model import ModelConfig
    from opdlm_megatron.rollout.calibration import quantize_on_rollouts

    model, config = _student(seed=3)
    quantize_on_rollouts(model, config, fmt, PROMPTS, DECODE)
    ckpt = str(tmp_path / "q")
    save_model_checkpoint(model, ckpt, config)
    assert ModelConfig.load(ckpt).quantization == fmt
    saved_keys = set(dist_checkpointing.load_tensors_metadata(ckpt))
    assert not any(k.endswith("_extra_state") for k in saved_keys)
    assert any(k.endswith("input_quantizer._amax") for k in saved_keys)

    reloaded, reloaded_config = build_from_checkpoint(ckpt, "student")
    reloaded.eval()
    assert reloaded_config.quantization == fmt
    expected, got = _buffers(model), _buffers(reloaded)
    assert set(expected) == set(got) and expected
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    for key, value in model.state_dict().items():
        if key.endswith("weight") and value is not None:
            assert torch.equal(reloaded.state_dict()[key], value), key
    for prompt in PROMPTS:
        assert torch.equal(_logits(reloaded, prompt), _logits(model, prompt))
    assert not torch.allclose(_logits(reloaded, PROMPTS[0]), _logits(build_model(config, "student").eval(), PROMPTS[0]))

    with pytest.raises(ValueError, match=f"is quantized to {fmt} and the model it is loaded into is not quantized"):
        load_model_checkpoint(build_model(config, "student"), ckpt)
    with pytest.raises(ValueError, match=rf"model.teacher_checkpoint {ckpt} is quantized \({fmt}, ModelOpt\)"):
        check_teacher_checkpoint(ckpt, "model.teacher_checkpoint")


@pytest.fixture(scope="module")
def quantize_assets(tmp_path_factory):
    from tests.helpers import save_tiny_student
    import json

    root = tmp_path_factory.mktemp("quantize")
    ckpt = save_tiny_student(root / "student", seed=5)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{5 + i} w{9 + 2 * i} w{30 - i}"}) + "\n" for i in range(6)))
    return dict(root=root, ckpt=ckpt, prompts=str(prompts))


def _encoded_prompts(assets):
    import json
    import os

    from transformers import AutoTokenizer

    from opdlm_megatron.commands.generate import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(assets["ckpt"], "tokenizer"))
    return [encode_prompt(tokenizer, json.loads(line), False) for line in open(assets["prompts"])]


CLI_DECODE = ["--max-new-tokens", "8", "--threshold", "0.5", "--batch-size", "4", "--device", "cpu"]


def _quantized_in_process(assets, fmt):
    """The reference: the input checkpoint quantized in this process on the same prompts and decoding."""
    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.rollout.calibration import quantize_on_rollouts

    model, config = build_from_checkpoint(assets["ckpt"], "student")
    model.eval()
    decode = DecodeConfig(max_new_tokens=8, threshold=0.5, eos_token_ids=config.eos_token_ids or None)
    quantize_on_rollouts(model, config, fmt, _encoded_prompts(assets), decode, batch_size=4)
    return model, config


def test_opdlm_quantize_writes_a_checkpoint_that_generate_eval_and_lm_eval_run(quantize_assets, tmp_path, monkeypatch):
    """``opdlm-quantize`` (FP8) = quantizing in process on the same prompts (ranges, logits); its checkpoint
    keeps the tokenizer, and opdlm-generate (= the engine on the in-process quantized student), opdlm-eval and
    lm-eval's generate_until (the same score) run it."""
    import json
    import os

    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.commands import generate, quantize
    from opdlm_megatron.runtime.platform import initialize_runtime
    from tests.test_lm_eval_model import _opdlm_eval_then_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = str(tmp_path / "fp8")
    quantize.main(["--checkpoint", quantize_assets["ckpt"], "--prompts", quantize_assets["prompts"], "--out", out,
                   "--format", "fp8", *CLI_DECODE])
    assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))
    with initialize_runtime(device="cpu", seed=0):
        expected, config = _quantized_in_process(quantize_assets, "fp8")
        got, got_config = build_from_checkpoint(out, "student")
        got.eval()
        assert got_config.quantization == "fp8"
        want, have = quantized_ranges(expected), quantized_ranges(got)
        assert set(want) == set(have)
        for name, ranges in want.items():
            assert have[name] == pytest.approx(ranges, rel=1e-6), name
        prompts = _encoded_prompts(quantize_assets)
        assert torch.equal(_logits(got, prompts[0]), _logits(expected, prompts[0]))
        decoded = DiffusionRolloutEngine(expected, config).generate(prompts, DecodeConfig(max_new_tokens=8))
    assert generate.main(["--checkpoint", out, "--prompts", quantize_assets["prompts"], "--out",
                          str(tmp_path / "gen.jsonl"), "--max-new-tokens", "8", "--device", "cpu"]) in (None, 0)
    lines = [json.loads(line) for line in open(tmp_path / "gen.jsonl")]
    for row, line in enumerate(lines):
        assert line["completion_ids"] == decoded.answer_ids[row][decoded.answer_valid[row]].tolist()
    _opdlm_eval_then_lm_eval(out, tmp_path, "quantized_qa")


@pytest.mark.distributed
@pytest.mark.parametrize("fmt", ["fp8", "int8_sq"])
def test_opdlm_quantize_at_tp2_saves_what_tp1_quantizes(quantize_assets, tmp_path, fmt):
    """Quantized at TP 2 (the ranges synchronised over the TP ranks, the per-channel ones sharded with their
    weights), saved, reloaded at TP 1: the ranges and logits of quantizing at TP 1."""
    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.runtime.platform import initialize_runtime
    from tests.conftest import run_torchrun

    out = str(tmp_path / fmt)
    run_torchrun("quantize_cli.py", "--checkpoint", quantize_assets["ckpt"], "--prompts", quantize_assets["prompts"],
                 "--out", out, "--format", fmt, "--tp", "2", *CLI_DECODE)
    with initialize_runtime(device="cpu", seed=0):
        expected, _ = _quantized_in_process(quantize_assets, fmt)
        got, _ = build_from_checkpoint(out, "student")
        got.eval()
        want, have = _buffers(expected), _buffers(got)
        assert set(want) == set(have)
        for key, value in want.items():
            assert torch.allclose(have[key], value, rtol=1e-5, atol=1e-7), (key, (have[key] - value).abs().max())
        prompt = _encoded_prompts(quantize_assets)[0]
        assert torch.allclose(_logits(got, prompt), _logits(expected, prompt), rtol=1e-4, atol=1e-4)


def test_opdlm_quantize_refuses_bad_input_in_one_line(quantize_assets, tmp_path, capsys):
    """NVFP4 on CPU, a format ModelOpt lacks here, an already quantized checkpoint, the input as output, a
    quantized teacher for opdlm-eval: one line, exit 2, nothing written."""
    from opdlm_megatron.commands import quantize
    from opdlm_megatron.evaluate import main as opdlm_eval

    def refused(main, argv, program, message):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{program}: error: ") and message in err[0], err

    base = ["--checkpoint", quantize_assets["ckpt"], "--prompts", quantize_assets["prompts"], *CLI_DECODE]
    out = tmp_path / "q"
    refused(quantize.main, [*base, "--out", str(out), "--format", "nvfp4"], "opdlm-quantize",
            "quantization format 'nvfp4' runs on CUDA GPUs only")
    with pytest.raises(SystemExit) as exit_:  # argparse: the choices
        quantize.main([*base, "--out", str(out), "--format", "int4"])
    assert exit_.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    refused(quantize.main, [*base, "--out", quantize_assets["ckpt"], "--format", "fp8"], "opdlm-quantize",
            f"--out {quantize_assets['ckpt']} is --checkpoint")
    assert not out.exists()
    quantize.main([*base, "--out", str(out), "--format", "fp8"])
    capsys.readouterr()
    refused(quantize.main, ["--checkpoint", str(out), "--prompts", quantize_assets["prompts"], "--out",
                            str(tmp_path / "twice"), "--format", "int8_sq", *CLI_DECODE], "opdlm-quantize",
            f"--checkpoint {out} is already quantized (fp8)")
    assert not (tmp_path / "twice").exists()
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "w5 w6", "reference": "w7"}\n')
    common = ["--task", "jsonl", "--data", str(data), "--max-new-tokens", "4", "--no-chat-template", "--no-progress",
              "--out", str(tmp_path / "eval")]
    refused(opdlm_eval, ["--student", str(out), *common], "opdlm-eval",
            f"--student (the default teacher) {out} is quantized (fp8)")
    refused(opdlm_eval, ["--student", quantize_assets["ckpt"], "--teacher", str(out), *common], "opdlm-eval",
            f"--teacher {out} is quantized (fp8); the teacher must be the unquantized AR model")
    assert not (tmp_path / "eval").exists()


def test_a_quantized_student_exports_as_modelopts_unified_hf_checkpoint(quantize_assets, tmp_path):
    """opdlm-convert-megatron-to-hf on an FP8 checkpoint writes ModelOpt's unified HF checkpoint: FP8 weights
    whose dequantized values are the student's weights rounded by torch's float8 with the checkpoint's ranges,
    scales = ranges / 448, ModelOpt's quantization config beside the student's own fields, the vocabulary cut to
    the tokenizer's rows, the tokenizer copied."""
    import json
    import os

    from safetensors import safe_open

    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.commands import quantize
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.tools.convert_megatron_to_hf import export

    ckpt, out = str(tmp_path / "fp8"), str(tmp_path / "hf")
    quantize.main(["--checkpoint", quantize_assets["ckpt"], "--prompts", quantize_assets["prompts"], "--out", ckpt,
                   "--format", "fp8", *CLI_DECODE])
    export(ckpt, out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["quantization_config"]["quant_algo"] == "FP8" and config["quantization_config"]["quant_method"] == "modelopt"
    assert config["opdlm_block_size"] == 4 and json.load(open(os.path.join(out, "hf_quant_config.json")))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]

    def tensor(name):
        with safe_open(os.path.join(out, index[name]), "pt") as f:
            return f.get_tensor(name)

    assert tensor("model.embed_tokens.weight").shape[0] == config["vocab_size"]
    with initialize_runtime(device="cpu", seed=0):
        model, _ = build_from_checkpoint(ckpt, "student")
    for i, layer in enumerate(model.decoder.layers):
        hf = f"model.layers.{i}."
        pairs = {"self_attn.o_proj": layer.self_attention.linear_proj, "mlp.down_proj": layer.mlp.linear_fc2,
                 "self_attn.q_proj": layer.self_attention.linear_qkv, "mlp.gate_proj": layer.mlp.linear_fc1}
        for name, module in pairs.items():
            assert float(tensor(hf + name + ".weight_scale")) * FP8_MAX == pytest.approx(
                float(module.weight_quantizer.amax), rel=1e-6), name
            assert float(tensor(hf + name + ".input_scale")) * FP8_MAX == pytest.approx(
                float(module.input_quantizer.amax), rel=1e-6), name
        for name, expected in (("self_attn.o_proj", layer.self_attention.linear_proj),
                               ("mlp.down_proj", layer.mlp.linear_fc2)):
            weight = tensor(hf + name + ".weight")
            assert weight.dtype == torch.float8_e4m3fn
            dequantized = weight.double() * tensor(hf + name + ".weight_scale").double()
            assert torch.allclose(dequantized, _fp8(expected.weight.detach(), expected.weight_quantizer.amax),
                                  rtol=1e-6, atol=0), name
        fc1 = layer.mlp.linear_fc1
        gate_up = torch.cat([tensor(hf + "mlp.gate_proj.weight").double() * tensor(hf + "mlp.gate_proj.weight_scale"),
                             tensor(hf + "mlp.up_proj.weight").double() * tensor(hf + "mlp.up_proj.weight_scale")])
        assert torch.allclose(gate_up, _fp8(fc1.weight.detach(), fc1.weight_quantizer.amax), rtol=1e-6, atol=0)


def test_the_benchmarks_quick_modes_print_their_last_lines(tmp_path):
    """benchmarks/quantization.py --quick (a tiny teacher, its weights as the student, 2 QAT steps) and
    benchmarks/gpu_quantized_decode.py --quick --device cpu: every variant measured, the fixed last lines."""
    import json
    import re
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "quantization.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r"format=fp8 ptq_acc_ratio=\S+ qat_acc_ratio=\S+ ptq_tpf_ratio=[0-9.]+ qat_tpf_ratio=[0-9.]+",
                        proc.stdout.strip().splitlines()[-1]), proc.stdout[-2000:]
    results = json.load(open(tmp_path / "quantization_quick.json"))["results"]
    assert set(results) == {"unquantized", "fp8 PTQ", "int8_sq PTQ", "fp8 QAT", "unquantized, continued"}
    assert all(0 <= r["accuracy"] <= 1 and r["tpf"] >= 1 for r in results.values())
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_quantized_decode.py"), "--quick",
                           "--device", "cpu"], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r"gpu_quantized_decode device=cpu fp8_over_unquantized=[0-9.]+ int8_sq_over_unquantized=[0-9.]+ "
                        r"nvfp4_over_unquantized=nan", proc.stdout.strip().splitlines()[-1]), proc.stdout[-2000:]


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq"])
def test_a_quantized_student_reloads_through_modelopts_hf_path_with_its_logits(quantize_assets, tmp_path, fmt):
    """``--quantized-format modelopt_state``: the HF model fake-quantized with the student's ranges (and
    SmoothQuant scales), loaded back by ModelOpt's HF path (``enable_huggingface_checkpointing`` +
    ``from_pretrained``), gives the quantized megatron student's causal logits; the plain HF weights without
    the quantizers do not."""
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from opdlm_megatron.checkpoint.model import build_from_checkpoint
    from opdlm_megatron.commands import quantize
    from opdlm_megatron.runtime.platform import initialize_runtime
    from opdlm_megatron.tools.convert_megatron_to_hf import export
    from tests.distributed.convert_common import hf_logits, max_valid_diff, megatron_logits
    from tests.helpers import random_batch

    ckpt, out = str(tmp_path / fmt), str(tmp_path / "hf")
    quantize.main(["--checkpoint", quantize_assets["ckpt"], "--prompts", quantize_assets["prompts"], "--out", ckpt,
                   "--format", fmt, *CLI_DECODE])
    export(ckpt, out, quantized_format="modelopt_state")
    with initialize_runtime(device="cpu", seed=0):
        model, config = build_from_checkpoint(ckpt, "student")
        batch = random_batch(config, batch_size=3, seq_len=16, seed=1)
        expected = megatron_logits(model.eval(), config, batch)
    mto.enable_huggingface_checkpointing()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert any(name.endswith("q_proj.input_quantizer") for name, _ in hf.named_modules())
    got = hf_logits(hf, batch)[..., :config.vocab_size]
    assert max_valid_diff(got, expected, batch["valid"]) <= 1e-4
    # the same weights with the quantizers off
    mtq.disable_quantizer(hf, "*")
    assert max_valid_diff(hf_logits(hf, batch)[..., :config.vocab_size], expected, batch["valid"]) > 1e-3


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq"])
def test_a_quantized_mixture_of_experts_student_reloads_with_its_logits(runtime, tmp_path, fmt):
    """ModelOpt quantizes every expert's linear layers (the routers stay unquantized); the checkpoint rebuilds the
    same student: equal ranges and logits."""
    from opdlm_megatron.checkpoint.model import build_from_checkpoint, save_model_checkpoint
    from opdlm_megatron.rollout.calibration import quantize_on_rollouts

    config = tiny_config(num_layers=2, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)
    model = build_model(config, "student", init_method_std=0.5, moe_token_dispatcher_type="alltoall").eval()
    quantize_on_rollouts(model, config, fmt, PROMPTS, DECODE)
    experts = [m for name, m in model.named_modules() if ".experts." in name and hasattr(m, "weight_quantizer")]
    assert len(experts) == 2 * 4 * 2 and all(m.weight_quantizer.is_enabled for m in experts)
    assert not any(m.weight_quantizer.is_enabled for name, m in model.named_modules()
                   if name.endswith("router") and hasattr(m, "weight_quantizer"))
    save_model_checkpoint(model, str(tmp_path / "moe"), config)
    reloaded, _ = build_from_checkpoint(str(tmp_path / "moe"), "student", moe_token_dispatcher_type="alltoall")
    reloaded.eval()
    expected, got = _buffers(model), _buffers(reloaded)
    assert set(expected) == set(got)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    for prompt in PROMPTS:
        assert torch.equal(_logits(reloaded, prompt), _logits(model, prompt))
