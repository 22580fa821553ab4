"""The conversion CLIs on bad input: a clear one-line error naming the bad value, exit code 2, and
nothing at --out (checked before and after each run), nor any temporary directory beside it."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdlm_megatron.commands import convert_hf_to_megatron as hf_to_megatron_cli
from opdlm_megatron.commands import convert_megatron_to_hf as megatron_to_hf_cli
from opdlm_megatron.tools import convert_hf_to_megatron
from tests.conftest import REPO_ROOT
from tests.distributed.convert_common import make_tiny_hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "llama"
    make_tiny_hf("llama_mha_tied", str(directory))
    return directory


def copy_dir(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def run_cli(main, args, out, capsys) -> str:
    """Runs a CLI main() expecting failure; returns its stderr after checking --out stays absent."""
    assert not os.path.exists(out)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    assert not [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n]
    return capsys.readouterr().err


def test_missing_directory(tmp_path, capsys):
    out = str(tmp_path / "out")
    err = run_cli(hf_to_megatron_cli.main, ["--hf-dir", str(tmp_path / "nope"), "--out", out], out, capsys)
    assert "error: HF model directory not found" in err and "nope" in err


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    out = str(tmp_path / "out")
    err = run_cli(hf_to_megatron_cli.main, ["--hf-dir", str(tmp_path / "gpt2"), "--out", out], out, capsys)
    assert "unsupported architecture 'GPT2LMHeadModel'" in err and "LlamaForCausalLM" in err


def test_tp_not_dividing_heads(llama_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    err = run_cli(hf_to_megatron_cli.main, ["--hf-dir", str(llama_dir), "--out", out, "--tp", "3"], out, capsys)
    assert "num_attention_heads 4 is not divisible by tensor parallel size 3" in err


def test_tp_without_enough_processes(llama_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    err = run_cli(hf_to_megatron_cli.main, ["--hf-dir", str(llama_dir), "--out", out, "--tp", "2"], out, capsys)
    assert "world size is 1" in err and "torchrun --nproc_per_node=2" in err


def test_tampered_safetensors(llama_dir, tmp_path, capsys):
    tampered = copy_dir(llama_dir, tmp_path / "tampered")
    tensors = load_file(str(tampered / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:32].clone()
    save_file(tensors, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    out = str(tmp_path / "out")
    err = run_cli(hf_to_megatron_cli.main, ["--hf-dir", str(tampered), "--out", out], out, capsys)
    assert "shape mismatch: tensor 'model.layers.1.self_attn.k_proj.weight' has shape [32, 64]" in err
    assert "the config implies [64, 64]" in err

    del tensors["model.norm.weight"]
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    err = run_cli(hf_to_megatron_cli.main, ["--hf-dir", str(tampered), "--out", out], out, capsys)
    assert "missing tensor 'model.norm.weight'" in err


def test_missing_weights_and_config(llama_dir, tmp_path, capsys):
    no_weights = copy_dir(llama_dir, tmp_path / "no_weights")
    os.remove(no_weights / "model.safetensors")
    out = str(tmp_path / "out")
    err = run_cli(hf_to_megatron_cli.main, ["--hf-dir", str(no_weights), "--out", out], out, capsys)
    assert "no model.safetensors or model.safetensors.index.json" in err
    os.remove(no_weights / "config.json")
    err = run_cli(hf_to_megatron_cli.main, ["--hf-dir", str(no_weights), "--out", out], out, capsys)
    assert "has no config.json" in err


def test_failure_while_writing_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_hf_to_megatron, "copy_tokenizer_files", fail)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        convert_hf_to_megatron.convert(str(llama_dir), str(out))
    assert os.listdir(tmp_path) == []


def test_existing_out_is_left_alone(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        hf_to_megatron_cli.main(["--hf-dir", str(llama_dir), "--out", str(out)])
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_export_bad_inputs(llama_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    err = run_cli(megatron_to_hf_cli.main, ["--megatron-dir", str(tmp_path / "nope"), "--out", out], out, capsys)
    assert "megatron checkpoint directory not found" in err
    err = run_cli(megatron_to_hf_cli.main, ["--megatron-dir", str(llama_dir), "--out", out], out, capsys)
    assert "is not an opdlm-megatron checkpoint" in err
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron.convert(str(llama_dir), str(ckpt))
    err = run_cli(megatron_to_hf_cli.main, ["--megatron-dir", str(ckpt), "--out", out, "--max-shard-size", "lots"],
                  out, capsys)
    assert "cannot parse shard size 'lots'" in err


def test_wrapper_script_exit_code(tmp_path):
    """The top-level script a user runs: non-zero exit and the message on stderr."""
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "convert_hf_to_megatron.py"),
         "--hf-dir", str(tmp_path / "missing"), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "HF model directory not found" in proc.stderr
    assert not out.exists()
