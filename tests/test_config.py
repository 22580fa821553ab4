"""ModelConfig validation: bad configurations fail early with the bad value in the message."""

import pytest

from opdlm_megatron.config.model import ModelConfig
from tests.helpers import tiny_config


@pytest.mark.parametrize("overrides,match", [
    (dict(num_layers=0), "num_layers must be a positive integer, got 0"),
    (dict(block_size=0), "block_size must be a positive integer, got 0"),
    (dict(num_attention_heads=5), "not divisible by num_attention_heads 5"),
    (dict(num_query_groups=3), "num_attention_heads 4 is not divisible by num_query_groups 3"),
    (dict(normalization="BatchNorm"), "unknown normalization 'BatchNorm'"),
    (dict(activation="relu6"), "unknown activation 'relu6'"),
    (dict(attention_backend="sparse"), "unknown attention_backend 'sparse'"),
    (dict(transformer_impl="apex"), "unknown transformer_impl 'apex'"),
    (dict(params_dtype="fp8"), "unknown dtype 'fp8'"),
    (dict(mask_token_id=400), "mask_token_id 400"),
    (dict(eos_token_ids=[999]), "eos token id 999"),
    (dict(padded_vocab=100), "padded_vocab 100 is smaller"),
])
def test_bad_model_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_parallel_layout_errors():
    config = tiny_config()  # 4 heads, 2 query groups, 4 layers
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tensor parallel size 3"):
        config.check_parallel(3, 1)
    with pytest.raises(ValueError, match="num_query_groups 2 is not divisible by tensor parallel size 4"):
        config.check_parallel(4, 1)
    with pytest.raises(ValueError, match="num_layers 4 is not divisible by pipeline parallel size 3"):
        config.check_parallel(1, 3)
    with pytest.raises(ValueError, match="padded vocabulary 256 .* not divisible by tensor parallel size 3"):
        tiny_config(padded_vocab=256).padded_vocab_size(3)


def test_unsupported_rope_scaling(runtime):
    from opdlm_megatron.model.build import build_model

    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        build_model(tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_unknown_role(runtime):
    from opdlm_megatron.model.build import build_model

    with pytest.raises(ValueError, match="unknown role 'critic'"):
        build_model(tiny_config(), "critic")


def test_round_trip_and_unknown_fields(tmp_path):
    config = tiny_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}, logit_shift=True, params_dtype="bf16")
    assert config.params_dtype == "bfloat16"
    config.save(str(tmp_path))
    assert ModelConfig.load(str(tmp_path)) == config
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['hidden'\]"):
        ModelConfig.from_dict({**config.to_dict(), "hidden": 3})
    with pytest.raises(FileNotFoundError, match="model config not found"):
        ModelConfig.load(str(tmp_path / "missing"))
