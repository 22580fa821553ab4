"""Training config, schedules and data sources (no model needed)."""

import json
import math
import os

import pytest
import torch

from opdlm_megatron.data.samples import Sample, SampleStream, load_samples
from opdlm_megatron.training.schedules import lr_for_step, rollout_length
from opdlm_megatron.training.config import CurriculumConfig, OptimConfig
from opdlm_megatron.data.config import DataConfig
from opdlm_megatron.training.config_files import load_train_config, train_config_from_dict

BASE = {"model": {"student_checkpoint": "/x"}}


def test_paper_defaults():
    cfg = train_config_from_dict(BASE)
    assert cfg.optim.lr == 1e-5 and cfg.optim.min_lr == 1e-6 and cfg.optim.warmup_steps == 5
    assert cfg.optim.clip_grad == 1.0 and cfg.optim.weight_decay == 0.0
    assert cfg.rollout.threshold == 0.9 and cfg.rollout.temperature == 1.0
    assert cfg.loss.divergence == "forward_kl" and cfg.loss.include_end_of_turn
    assert (cfg.curriculum.min_length, cfg.curriculum.max_length, cfg.curriculum.warmup_rollouts) == (100, 4000, 10)
    # Table 13: 128 tasks per rollout, effective batch 8 -> 16 optimizer steps per rollout; 1 epoch
    assert cfg.rollout.tasks_per_rollout == 128 and cfg.train.global_batch_size == 8
    assert cfg.updates_per_rollout == 16 and cfg.data.epochs == 1
    # Algorithm 1: KL summed over masked positions with w(t) = 1; eq. 2/6: one t per sequence
    assert cfg.loss.normalization == "token" and cfg.loss.t_sampling == "sequence"
    assert cfg.loss.state_selection == "all_rounds" and not cfg.data.enable_thinking
    assert cfg.data.long_prompts == "skip"


def test_legacy_keys_are_translated():
    """The first layout's keys (one rollout of prompts_per_step prompts per optimizer step) still load."""
    cfg = train_config_from_dict({**BASE, "steps": 7, "prompts_per_step": 4, "micro_batch_size": 2,
                                  "curriculum": {"warmup_steps": 3}})
    assert cfg.train.steps == 7 and cfg.train.micro_batch_size == 2
    assert cfg.rollout.tasks_per_rollout == 4 and cfg.train.global_batch_size == 4 and cfg.updates_per_rollout == 1
    assert cfg.curriculum.warmup_rollouts == 3
    # new keys win over the translation
    cfg = train_config_from_dict({**BASE, "prompts_per_step": 4, "rollout": {"tasks_per_rollout": 16}})
    assert cfg.rollout.tasks_per_rollout == 16 and cfg.train.global_batch_size == 4


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: opd_off\nmodel: {student_checkpoint: /ckpt}\noptim: {lr: 2.0e-5}\n")
    cfg = load_train_config(str(path), ["optim.lr=3e-4", "parallel.tensor_model_parallel_size=2",
                                        "loss.top_k=16", "data.gym_datasets=[a, b]"])
    assert cfg.objective == "opd_off" and cfg.optim.lr == 3e-4
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.loss.top_k == 16
    assert cfg.data.gym_datasets == ["a", "b"] and cfg.model.student_checkpoint == "/ckpt"


@pytest.mark.parametrize("data,needle", [
    ({"objective": "ppo"}, "'ppo'"),
    ({"nan_policy": "ignore"}, "'ignore'"),
    ({"optim": {"lr": -1.0}}, "lr=-1.0"),
    ({"optim": {"bogus": 1}}, "bogus"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"global_batch_size": 3, "micro_batch_size": 2}}, "global_batch_size 3"),
    ({"rollout": {"tasks_per_rollout": 12}}, "tasks_per_rollout 12 is not a multiple of train.global_batch_size 8"),
    ({"data": {"epochs": 0}}, "data.epochs"),
    ({"data": {"long_prompts": "crop"}}, "'crop'"),
    ({"loss": {"normalization": "batch"}}, "'batch'"),
    ({"loss": {"t_sampling": "token"}}, "'token'"),
    ({"objective": "ar"}, "'jsonl_chat'"),
    ({"rollout": {"threshold": 1.5}}, "1.5"),
    ({"curriculum": {"min_length": 50, "max_length": 10}}, "max_length 10"),
    ({"objective": "mdlm"}, "'jsonl_chat'"),
    ({"loss": {"state_selection": "random"}}, "'random'"),
    ({"rollout": {"threshold_schedule": {"final": 0.0}}}, "threshold_schedule.final must be in"),
    ({"rollout": {"threshold_schedule": {"final": 0.7, "hold_rollouts": -1}}}, "hold_rollouts must be"),
    ({"rollout": {"threshold_schedule": {"final": 0.7, "ramp_rollouts": 0}}}, "ramp_rollouts must be"),
])
def test_bad_config_values_are_named(data, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        train_config_from_dict({**BASE, **data})


def test_a_decay_shorter_than_the_warm_up_is_refused():
    from opdlm_megatron.training.schedules import decay_steps

    base = train_config_from_dict(BASE)
    assert decay_steps(base.optim, 100) == 100
    with pytest.raises(ValueError, match=r"decay_steps \(2, from train.steps\) must be >= optim.warmup_steps \(5\)"):
        decay_steps(base.optim, 2)
    short = train_config_from_dict({**BASE, "optim": {"warmup_steps": 10, "decay_steps": 5}})
    with pytest.raises(ValueError, match=r"decay_steps \(5\) must be >= optim.warmup_steps \(10\)"):
        decay_steps(short.optim, 100)


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="key=value"):
        train_config_from_dict(BASE, ["optim.lr"])


def test_curriculum_matches_paper_formula():
    cur = CurriculumConfig(min_length=100, max_length=4000, warmup_rollouts=10)
    for s in range(0, 25):
        expected = min(4000, 100 + math.floor(s / 10 * (4000 - 100)))
        assert rollout_length(s, cur) == expected
    assert rollout_length(0, cur) == 100 and rollout_length(10, cur) == 4000
    with pytest.raises(ValueError, match="-1"):
        rollout_length(-1, cur)


def test_threshold_schedule_holds_then_lowers_linearly():
    """rollout.threshold_schedule (the authors' dynamic_threshold_schedule, linear): held, then a linear
    ramp to the floor, then the floor; off by default."""
    from opdlm_megatron.training.schedules import rollout_threshold

    off = train_config_from_dict(BASE).rollout
    assert [rollout_threshold(r, off) for r in (0, 10, 10**6)] == [0.9, 0.9, 0.9]
    cfg = train_config_from_dict({**BASE, "rollout": {"threshold": 0.9, "threshold_schedule": {
        "final": 0.7, "hold_rollouts": 150, "ramp_rollouts": 40}}}).rollout
    for r in range(0, 260, 7):
        expected = 0.9 if r < 150 else 0.9 - 0.2 * min(1.0, (r - 150) / 40)
        assert rollout_threshold(r, cfg) == pytest.approx(expected, abs=1e-12), r
    assert rollout_threshold(170, cfg) == pytest.approx(0.8) and rollout_threshold(190, cfg) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="-1"):
        rollout_threshold(-1, cfg)


def test_rollout_lengths_are_whole_blocks():
    """The paper's curriculum gives lengths like 490; the engine decodes whole blocks of 4."""
    from opdlm_megatron.rollout.config import whole_blocks

    cur = CurriculumConfig(min_length=100, max_length=4000, warmup_rollouts=10)
    for s in range(0, 12):
        length = rollout_length(s, cur)
        rounded = whole_blocks(length, 4)
        assert rounded % 4 == 0 and length - 4 < rounded <= length
    assert whole_blocks(490, 4) == 488 and whole_blocks(3, 4) == 4 and whole_blocks(7, 1) == 7
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        whole_blocks(8, 0)


def test_lr_schedule_megatron_scheduler_matches_closed_form(runtime):
    """Megatron's OptimizerParamScheduler (through LRSchedule) gives warm-up + cosine as written."""
    from opdlm_megatron.training.schedules import LRSchedule

    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=optim.lr)
    opt.param_groups[0].update(max_lr=optim.lr, min_lr=optim.min_lr)
    sched = LRSchedule(opt, optim, total_steps=20)
    for step in range(25):
        s = step + 1
        if s <= 5:
            ref = 1e-3 * s / 5
        elif s > 20:
            ref = 1e-4
        else:
            ref = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 5) / 15))
        assert sched.set_step(step) == pytest.approx(ref, rel=1e-12)
        assert lr_for_step(step, optim, 20) == pytest.approx(ref, rel=1e-12)


def test_sample_stream_is_deterministic_and_resumable():
    samples = [Sample([i]) for i in range(7)]
    a = SampleStream(samples, seed=3)
    seen = [s.prompt_ids[0] for s in a.next_batch(17)]
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))
    assert seen[:7] != seen[7:14]  # a fresh permutation per epoch
    b = SampleStream(samples, seed=3)
    first = [s.prompt_ids[0] for s in b.next_batch(9)]
    c = SampleStream(samples, seed=3)
    c.load_state_dict(b.state_dict())
    rest = [s.prompt_ids[0] for s in c.next_batch(8)]
    assert first + rest == seen
    with pytest.raises(ValueError, match="for 7 samples"):
        SampleStream(samples[:5], seed=3).load_state_dict(b.state_dict())


def _chat_tokenizer(tmp_path):
    """A word-level HF tokenizer with a chat template, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "[UNK]", "what", "is", "2", "+",
             "?", "be", "brief", "four", "Calculate", "-", "."] + [str(i) for i in range(3, 100)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                 unk_token="[UNK]")
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    hf.save_pretrained(tmp_path / "tok")
    from opdlm_megatron.data.samples import load_tokenizer

    return load_tokenizer(str(tmp_path / "tok")), vocab


def test_jsonl_chat_prompts_use_the_chat_template(tmp_path):
    tokenizer, vocab = _chat_tokenizer(tmp_path)
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "what is 2 + 2 ?"}, {"role": "assistant", "content": "four"}]},
        {"prompt": "what is 3 ?"},
    ]) + "\n")
    cfg = DataConfig(source="jsonl_chat", path=str(path), system_prompt="be brief")
    samples = load_samples(cfg, tokenizer)
    v = vocab
    # reference: the template written out by hand (the assistant answer is dropped)
    assert samples[0].prompt_ids == [v["<|system|>"], v["be"], v["brief"], v["<|user|>"], v["what"], v["is"],
                                     v["2"], v["+"], v["2"], v["?"], v["<|assistant|>"]]
    assert samples[1].prompt_ids[-5:] == [v["what"], v["is"], v["3"], v["?"], v["<|assistant|>"]]
    # prompts are never cut: a prompt over the limit is skipped and counted, or stops the run
    limited = dict(source="jsonl_chat", path=str(path), system_prompt="be brief", max_prompt_tokens=9)
    short = load_samples(DataConfig(**limited), tokenizer)
    assert [s.prompt_ids for s in short] == [samples[1].prompt_ids] and short.skipped_long_prompts == 1
    with pytest.raises(ValueError, match=r"p.jsonl:1: prompt of 11 tokens is longer than data.max_prompt_tokens 9"):
        load_samples(DataConfig(**limited, long_prompts="error"), tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"nothing": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_samples(DataConfig(source="jsonl_chat", path=str(bad)), tokenizer)


def test_text_source_for_mdlm(tmp_path):
    tokenizer, v = _chat_tokenizer(tmp_path)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "what is 2 ?", "response": "four"}) + "\n")
    samples = load_samples(DataConfig(source="text", path=str(path)), tokenizer, eos_token_id=v["</s>"])
    assert samples[0].response_ids == [v["four"], v["</s>"]]
    assert samples[0].prompt_ids[-1] == v["<|assistant|>"]


def test_reasoning_gym_prompts(tmp_path):
    import reasoning_gym

    tokenizer, v = _chat_tokenizer(tmp_path)
    cfg = DataConfig(source="reasoning_gym", gym_datasets=["basic_arithmetic"], gym_size=4, seed=9)
    samples = load_samples(cfg, tokenizer)
    reference = reasoning_gym.create_dataset("basic_arithmetic", size=4, seed=9)
    assert len(samples) == 4
    for sample, item in zip(samples, reference):
        expected = tokenizer.apply_chat_template([{"role": "user", "content": item["question"]}],
                                                 add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(sample.prompt_ids) == tokenizer.decode(tokenizer(expected, add_special_tokens=False)["input_ids"])
    # difficulty options reach the dataset
    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    easy = load_samples(DataConfig(source="reasoning_gym", gym_datasets=["basic_arithmetic"], gym_size=3, seed=9,
                                   gym_options={"basic_arithmetic": options}), tokenizer)
    reference = reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=9, **options)
    for sample, item in zip(easy, reference):
        expected = tokenizer.apply_chat_template([{"role": "user", "content": item["question"]}],
                                                 add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(sample.prompt_ids) == tokenizer.decode(tokenizer(expected, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="no_such_dataset"):
        load_samples(DataConfig(source="reasoning_gym", gym_datasets=["no_such_dataset"], gym_size=2), tokenizer)


def test_enable_thinking_reaches_the_chat_template(tmp_path):
    """A Qwen3-style template (thinks unless enable_thinking is false): the flag is passed through."""
    tokenizer, v = _chat_tokenizer(tmp_path)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>"
                               "{% if enable_thinking is defined and enable_thinking is false %} be{% endif %}"
                               "{% endif %}")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "what is 2 ?"}) + "\n")
    off = load_samples(DataConfig(source="jsonl_chat", path=str(path)), tokenizer)
    on = load_samples(DataConfig(source="jsonl_chat", path=str(path), enable_thinking=True), tokenizer)
    assert off[0].prompt_ids[-2:] == [v["<|assistant|>"], v["be"]]  # default: thinking off
    assert on[0].prompt_ids[-1] == v["<|assistant|>"]


def test_table13_schedule_values():
    """Hand-computed from Table 13: 60K prompts, 1 epoch, 128 tasks per rollout, batch 8."""
    cfg = train_config_from_dict(BASE)
    rollouts = math.ceil(61_816 / 128)  # the paper's corpus (Table 12)
    assert rollouts == 483
    assert cfg.updates_per_rollout * rollouts == 7728
    cur = cfg.curriculum
    # the final length is reached after 10 rollouts = 1,280 prompts (not after 10 optimizer steps)
    assert [rollout_length(r, cur) for r in (0, 1, 5, 9, 10, 11)] == [100, 490, 2050, 3610, 4000, 4000]
    # Table 14 (OPDLM-MATH): 10 epochs, final length 2,000 (non-thinking)
    math_cfg = train_config_from_dict({**BASE, "data": {"epochs": 10}, "curriculum": {"max_length": 2000}})
    assert math_cfg.data.epochs == 10 and rollout_length(10, math_cfg.curriculum) == 2000


def test_tokenizer_dir_defaults_to_the_student_checkpoint():
    from opdlm_megatron.data.samples import load_tokenizer
    from opdlm_megatron.training.config import ModelPaths

    assert ModelPaths(student_checkpoint="ckpt").tokenizer_dir == os.path.join("ckpt", "tokenizer")
    assert ModelPaths(student_checkpoint="ckpt", tokenizer="tok").tokenizer_dir == "tok"
    assert ModelPaths(random_init=True, model_config={"num_layers": 1}).tokenizer_dir is None
    with pytest.raises(FileNotFoundError, match="set model.tokenizer"):
        load_tokenizer(None)
