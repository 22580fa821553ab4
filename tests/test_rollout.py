"""Block-diffusion rollout engine vs an independent naive decoder (CPU, real megatron-core).

The reference below recomputes the whole sequence (prompt + all answer slots, [MASK] where not
committed) with a dense block-causal mask it builds itself at every step, reads full-vocabulary
logits and applies the commit rule with plain torch ops: no KV cache, no vocab-parallel helpers,
no engine code.
"""

from __future__ import annotations

import json

import pytest
import torch

from opdlm_megatron.model.build import build_model
from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine
from opdlm_megatron.rollout import sampling
from tests.helpers import tiny_config

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 30, 40, 50, 60, 70, 80, 90, 100, 110], [3, 4, 5, 6, 7, 8]]


# ------------------------------------------------------------------------------ reference
def _block_causal_mask(prompt_len: int, answer_len: int, block: int) -> torch.Tensor:
    """[1, 1, S, S], True = masked out: prompt tiled from 0, the answer starts a fresh block."""
    prompt_blocks = [i // block for i in range(prompt_len)]
    first_answer_block = -(-prompt_len // block)
    answer_blocks = [first_answer_block + i // block for i in range(answer_len)]
    ids = torch.tensor(prompt_blocks + answer_blocks)
    return ~(ids[None, :] <= ids[:, None])[None, None]


def _full_logits(model, config, tokens, mask):
    seq = torch.tensor([tokens])
    pos = torch.arange(len(tokens))[None]
    logits = model(seq, pos, mask)[0, :, : config.model_vocab_size].double()
    logits[:, config.mask_token_id] = float("-inf")
    return logits


def reference_decode(model, config, prompt, *, block, max_new, threshold=0.9, tokens_per_step=None,
                     steps_per_block=None, eos=(), commit_rule="auto", factor=1.0, entropy_budget=0.5,
                     low_threshold=0.4):
    """Greedy block diffusion by full recompute. Returns (answer, commit rounds)."""
    mask_id, L = config.mask_token_id, len(prompt)
    tokens = list(prompt) + [mask_id] * max_new
    rounds = [-1] * max_new
    attn = _block_causal_mask(L, max_new, block)
    steps_per_block = steps_per_block or (-(-block // tokens_per_step) if tokens_per_step else block)
    r = 0
    with torch.no_grad():
        for j in range(max_new // block):
            cols = list(range(L + j * block, L + (j + 1) * block))
            step = 0
            while any(tokens[c] == mask_id for c in cols):
                logits = _full_logits(model, config, tokens, attn)
                rows = [c - 1 if config.logit_shift else c for c in cols]
                probs = torch.softmax(logits[rows], -1)
                conf, choice = probs.max(-1)
                masked = [tokens[c] == mask_id for c in cols]
                candidates = sorted([s for s in range(block) if masked[s]], key=lambda s: -float(conf[s]))
                if step + 1 >= steps_per_block:
                    chosen = candidates
                elif commit_rule == "factor":  # largest n with c_(n) >= 1 - f / (n + 1)
                    n = max([k for k in range(1, len(candidates) + 1)
                             if float(conf[candidates[k - 1]]) >= 1 - factor / (k + 1)], default=1)
                    chosen = candidates[:n]
                elif commit_rule == "entropy_bounded":  # lowest entropy first while the sum <= budget
                    ent = [-float((p * p.clamp_min(1e-300).log()).sum()) for p in probs]
                    by_entropy = sorted(candidates, key=lambda s: ent[s])
                    chosen, total = [], 0.0
                    for s in by_entropy:
                        total += ent[s]
                        if chosen and total > entropy_budget:
                            break
                        chosen.append(s)
                elif commit_rule == "hierarchical":  # per run of masks its best (> low), plus all > threshold
                    chosen, s = [], 0
                    while s < block:
                        if not masked[s]:
                            s += 1
                            continue
                        run = [s]
                        while s + 1 < block and masked[s + 1]:
                            s += 1
                            run.append(s)
                        s += 1
                        best = max(run, key=lambda q: (float(conf[q]), -q))
                        if float(conf[best]) > low_threshold:
                            chosen.append(best)
                    chosen = sorted(set(chosen) | {q for q in candidates if float(conf[q]) > threshold})
                    chosen = chosen or candidates[:1]
                elif tokens_per_step is not None:
                    chosen = candidates[:tokens_per_step]
                else:
                    chosen = [s for s in candidates if conf[s] >= threshold] or candidates[:1]
                    if candidates[0] not in chosen:
                        chosen.append(candidates[0])
                for s in chosen:
                    tokens[cols[s]] = int(choice[s])
                    rounds[cols[s] - L] = r
                r += 1
                step += 1
                # stop once an EOS is committed with every slot before it committed
                block_now = [tokens[c] for c in cols]
                eos_at = [s for s, t in enumerate(block_now) if t in eos]
                if eos_at and all(t != mask_id for t in block_now[:eos_at[0]]):
                    cut = j * block + eos_at[0] + 1
                    return tokens[L:L + cut], rounds[:cut]
            answer = tokens[L: L + (j + 1) * block]
            if any(t in eos for t in answer[j * block:]):
                cut = next(i for i, t in enumerate(answer) if t in eos) + 1
                return answer[:cut], rounds[:cut]
    return tokens[L:], rounds


def _teacher_greedy(model, prompt, steps, vocab):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            S = len(tokens)
            mask = ~torch.ones(S, S, dtype=torch.bool).tril()[None, None]
            logits = model(torch.tensor([tokens]), torch.arange(S)[None], mask)[0, -1, :vocab]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def _result_rows(result):
    return [(result.answer_ids[i][result.answer_valid[i]].tolist(),
             result.commit_step[i][result.answer_valid[i]].tolist()) for i in range(result.batch_size)]


@pytest.fixture
def student(runtime):
    def make(**overrides):
        config = tiny_config(**overrides)
        torch.manual_seed(11)
        model = build_model(config, "student", init_method_std=0.5)
        model.eval()
        return model, config
    return make


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("shift,rule", [
    (False, dict(threshold=0.9)),
    (True, dict(threshold=0.5)),
    (False, dict(threshold=0.5, confidence="probability")),
    (False, dict(tokens_per_step=2)),
    (True, dict(threshold=0.9, steps_per_block=2)),
    (False, dict(commit_rule="factor", factor=1.0)),
    (True, dict(commit_rule="factor", factor=2.5)),
    (False, dict(commit_rule="entropy_bounded", entropy_budget=2.0)),
    (False, dict(commit_rule="hierarchical", low_threshold=0.0, threshold=0.95)),
    (True, dict(commit_rule="hierarchical", low_threshold=0.05, threshold=0.5)),
])
def test_greedy_matches_naive_reference(student, shift, rule):
    model, config = student(logit_shift=shift)
    decode = DecodeConfig(max_new_tokens=12, block_size=4, **rule)
    result = DiffusionRolloutEngine(model, config).generate(PROMPTS, decode)
    ref_rule = {k: v for k, v in rule.items() if k != "confidence"}
    multi_commits = 0
    for prompt, (answer, steps) in zip(PROMPTS, _result_rows(result)):
        ref_answer, ref_steps = reference_decode(model, config, prompt, block=4, max_new=12, eos=(2,), **ref_rule)
        assert answer == ref_answer
        assert steps == ref_steps
        multi_commits += sum(steps.count(s) > 1 for s in set(steps))
    if (rule.get("threshold", 1) < 0.5 or "tokens_per_step" in rule or "steps_per_block" in rule
            or rule.get("factor", 0) > 2 or rule.get("entropy_budget", 0) > 1 or rule.get("commit_rule") == "hierarchical"):
        assert multi_commits > 0, "the rule under test never committed several tokens in one step"
    # state_before_round rebuilds a partially masked answer from commit_step
    xt = result.state_before_round(torch.full((len(PROMPTS),), 2), config.mask_token_id)
    assert ((xt != config.mask_token_id) == ((result.commit_step < 2) & result.answer_valid)).all()
    # the cache saves work: a forward per round of the slowest row, never more
    assert result.num_forward_passes == int(result.num_rounds.max())


def test_eos_stops_each_sequence(student):
    model, config = student()
    decode = DecodeConfig(max_new_tokens=16, block_size=4, threshold=0.5)
    engine = DiffusionRolloutEngine(model, config)
    first = engine.generate(PROMPTS, decode)
    eos_token = int(first.answer_ids[0, 5])
    stopped = engine.generate(PROMPTS, DecodeConfig(max_new_tokens=16, block_size=4, threshold=0.5,
                                                    eos_token_ids=[eos_token]))
    for prompt, (answer, steps) in zip(PROMPTS, _result_rows(stopped)):
        ref = reference_decode(model, config, prompt, block=4, max_new=16, threshold=0.5, eos=(eos_token,))
        assert (answer, steps) == ref
    assert bool(stopped.finished[0]) and stopped.answer_lengths()[0] <= 6
    assert stopped.answer_ids[0, stopped.answer_lengths()[0] - 1] == eos_token
    assert stopped.num_forward_passes <= first.num_forward_passes


def test_logit_shift_block1_reproduces_causal_teacher(student):
    model, config = student(logit_shift=True, block_size=1)
    teacher = build_model(config, "teacher")
    teacher.load_state_dict(model.state_dict())
    prompts = PROMPTS[:3]
    result = DiffusionRolloutEngine(model, config).generate(prompts, DecodeConfig(max_new_tokens=10, block_size=1))
    for prompt, (answer, steps) in zip(prompts, _result_rows(result)):
        assert answer == _teacher_greedy(teacher, prompt, 10, config.vocab_size)
        assert steps == list(range(10))
    assert result.num_forward_passes == 10


@pytest.mark.parametrize("with_eos", [False, True])
def test_prompt_alone_equals_prompt_in_mixed_batch(student, with_eos):
    # batch invariance: a row's tokens do not depend on the rows beside it, also when rows of
    # different prompt lengths leave the batch (EOS) at different steps and the cache drops them
    model, config = student(logit_shift=True)
    engine = DiffusionRolloutEngine(model, config)
    decode = DecodeConfig(max_new_tokens=12, threshold=0.5)
    if with_eos:
        eos_token = int(engine.generate(PROMPTS[:1], decode).answer_ids[0, 5])
        decode = DecodeConfig(max_new_tokens=12, threshold=0.5, eos_token_ids=[eos_token])
    result = engine.generate(PROMPTS, decode)
    if with_eos:
        lengths = result.answer_lengths().tolist()
        assert bool(result.finished[0]) and len(set(lengths)) > 1, lengths
    batched = _result_rows(result)
    for prompt, expected in zip(PROMPTS, batched):
        assert _result_rows(engine.generate([prompt], decode))[0] == expected


def test_seeded_sampling(student):
    model, config = student()
    engine = DiffusionRolloutEngine(model, config)

    def run(**kw):
        return _result_rows(engine.generate(PROMPTS[:2], DecodeConfig(max_new_tokens=8, **kw)))

    sampled = run(temperature=1.0, seed=5, top_p=0.95)
    assert sampled == run(temperature=1.0, seed=5, top_p=0.95)
    assert sampled != run(temperature=1.0, seed=6, top_p=0.95)
    greedy = run()
    assert run(temperature=1.0, seed=5, top_k=1) == greedy
    assert run(temperature=0.7, seed=5, top_p=1e-6) == greedy


def test_naive_full_recompute_mode_matches_cache(student):
    model, config = student(logit_shift=True)
    engine = DiffusionRolloutEngine(model, config)
    cached = engine.generate(PROMPTS, DecodeConfig(max_new_tokens=8, threshold=0.5))
    naive = engine.generate(PROMPTS, DecodeConfig(max_new_tokens=8, threshold=0.5, use_cache=False))
    assert _result_rows(cached) == _result_rows(naive)


def test_generation_leaves_model_untouched(student):
    model, config = student()
    model.train()
    keys = sorted(model.state_dict())
    DiffusionRolloutEngine(model, config).generate(PROMPTS[:1], DecodeConfig(max_new_tokens=4))
    assert model.training and sorted(model.state_dict()) == keys
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "non-empty list"),
    ([[1] * 120], dict(max_new_tokens=16), "too long"),
    ([[1, 2]], dict(max_new_tokens=10, block_size=4), "does not fit"),
    ([[1, 2]], dict(max_new_tokens=4, block_size=8), "does not fit"),
    ([[1, 999]], {}, "outside"),
    ([[1, 250]], {}, "MASK"),
])
def test_bad_prompts_and_sizes(student, prompts, kwargs, message):
    model, config = student()
    with pytest.raises(ValueError, match=message):
        DiffusionRolloutEngine(model, config).generate(prompts, DecodeConfig(**{"max_new_tokens": 8, **kwargs}))


@pytest.mark.parametrize("kwargs,message", [
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"), (dict(threshold=-0.1), "threshold"),
    (dict(block_size=0), "block_size"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(confidence="vibes"), "confidence"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_decode_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)


# ------------------------------------------------------------------ sampling building blocks
def test_filters_and_confidences_match_dense_reference(runtime):
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    ref_p = torch.softmax(logits.double(), -1)
    kept = sampling.top_k_filter(logits, 5)
    assert torch.equal(torch.isfinite(kept).sum(-1), torch.full((6,), 5))
    assert torch.equal(torch.isfinite(kept), logits >= logits.topk(5, -1).values[:, -1:])
    nucleus = torch.isfinite(sampling.top_p_filter(logits, 0.8))
    sorted_p, order = ref_p.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < 0.8  # smallest prefix reaching 0.8
    expected = torch.zeros_like(nucleus).scatter(1, order, keep_sorted)
    assert torch.equal(nucleus, expected)
    tokens = logits.argmax(-1)
    prob = sampling.confidence(logits, tokens, "probability")
    assert torch.allclose(prob.double(), ref_p.max(-1).values, atol=1e-6)
    top2 = ref_p.topk(2, -1).values
    assert torch.allclose(sampling.confidence(logits, tokens, "margin").double(), top2[:, 0] - top2[:, 1], atol=1e-6)
    entropy = -(ref_p * ref_p.log()).sum(-1)
    assert torch.allclose(sampling.confidence(logits, tokens, "neg_entropy").double(), torch.exp(-entropy), atol=1e-6)


def test_gumbel_sampling_follows_the_softmax(runtime):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).expand(40000, -1)
    keys = sampling.slot_keys(9, torch.arange(40000), torch.zeros(40000, dtype=torch.long))
    tokens, _ = sampling.choose_tokens(logits, DecodeConfig(temperature=1.0), keys)
    freq = torch.bincount(tokens, minlength=5).double() / 40000
    expected = torch.softmax(logits[0].double(), -1)
    assert (freq - expected).abs().max() < 0.01
    assert freq[4] == 0


def test_hash_is_a_bijection_on_a_sample():
    x = torch.arange(0, 2**32, 2**32 // 100000, dtype=torch.long)
    h = sampling.fmix32(x)
    assert h.unique().numel() == x.numel() and int(h.min()) >= 0 and int(h.max()) < 2**32


def test_commit_rules():
    conf = torch.tensor([[0.95, 0.2, 0.91, 0.5], [0.1, 0.3, 0.2, 0.05]])
    masked = torch.tensor([[True, True, True, True], [True, False, True, True]])
    step = torch.tensor([0, 0])
    dyn = DecodeConfig(threshold=0.9).resolved(4, [])
    assert sampling.select_commits(conf, masked, step, dyn).tolist() == [[True, False, True, False],
                                                                           [False, False, True, False]]
    static = DecodeConfig(tokens_per_step=2).resolved(4, [])
    assert sampling.select_commits(conf, masked, step, static).tolist() == [[True, False, True, False],
                                                                              [True, False, True, False]]
    last = DecodeConfig(threshold=0.9, steps_per_block=2).resolved(4, [])
    assert sampling.select_commits(conf, masked, torch.tensor([1, 1]), last).tolist() == masked.tolist()
    # factor f = 1: rank n passes if c >= 1 - 1/(n+1): 0.95 >= 0.5, 0.91 >= 0.667, 0.5 < 0.75 -> top 2
    factor = DecodeConfig(commit_rule="factor", factor=1.0).resolved(4, [])
    assert sampling.select_commits(conf, masked, step, factor).tolist() == [[True, False, True, False],
                                                                              [False, False, True, False]]
    # entropy budget 1.0 with entropies 0.2, 0.9, 0.5, 2.0: 0.2 + 0.5 <= 1, + 0.9 > 1
    ent = torch.tensor([[0.2, 0.9, 0.5, 2.0], [3.0, 0.1, 2.0, 1.0]])
    eb = DecodeConfig(commit_rule="entropy_bounded", entropy_budget=1.0).resolved(4, [])
    assert sampling.select_commits(conf, masked, step, eb, ent).tolist() == [[True, False, True, False],
                                                                               [False, False, False, True]]
    # hierarchical, low 0.15, high 0.9: row 0 is one run of 4 masks -> its best (0.95) + all > 0.9 (0.91);
    # row 1 has runs {0} and {2, 3}: 0.1 is not > 0.15, run {2,3}'s best is 0.2 -> slot 2
    hier = DecodeConfig(commit_rule="hierarchical", low_threshold=0.15, threshold=0.9).resolved(4, [])
    assert sampling.select_commits(conf, masked, step, hier).tolist() == [[True, False, True, False],
                                                                            [False, False, True, False]]
    # two runs each with a head above the low threshold commit together; nothing above it -> the best one
    two_runs = torch.tensor([[True, False, True, True]])
    assert sampling.select_commits(torch.tensor([[0.5, 0.9, 0.3, 0.6]]), two_runs, step[:1], hier).tolist() == \
        [[True, False, False, True]]
    assert sampling.select_commits(torch.tensor([[0.1, 0.9, 0.05, 0.12]]), two_runs, step[:1], hier).tolist() == \
        [[False, False, False, True]]


# ----------------------------------------------------------------------------------- CLI
def test_generate_cli(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opdlm_megatron import generate
    from opdlm_megatron.checkpoint.model import save_model_checkpoint
    from opdlm_megatron.runtime.platform import initialize_runtime

    words = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(247)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    ckpt = tmp_path / "ckpt"
    config = tiny_config()
    with initialize_runtime(device="cpu", seed=3):
        torch.manual_seed(3)
        model = build_model(config, init_method_std=0.5)
        save_model_checkpoint(model, str(ckpt), config)
        prompts = [[fast.convert_tokens_to_ids(w) for w in p.split()] for p in ("w5 w6 w7", "w9 w10 w11 w12 w13")]
        expected = DiffusionRolloutEngine(model, config).generate(prompts, DecodeConfig(max_new_tokens=8))
    fast.save_pretrained(str(ckpt / "tokenizer"))
    (tmp_path / "in.jsonl").write_text('{"prompt": "w5 w6 w7"}\n{"prompt": "w9 w10 w11 w12 w13"}\n')
    out = tmp_path / "out.jsonl"
    generate.main(["--checkpoint", str(ckpt), "--prompts", str(tmp_path / "in.jsonl"), "--out", str(out),
                   "--max-new-tokens", "8", "--device", "cpu"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["completion_ids"] for x in lines] == expected.completions()
    for line, (_, steps) in zip(lines, _result_rows(expected)):
        assert line["commit_step"] == steps and line["num_forward_passes"] == expected.num_forward_passes
        assert line["completion"] == fast.decode(line["completion_ids"], skip_special_tokens=True)


def test_flex_attention_student_decodes_as_dense(student):
    """model.attention_backend=flex (the GPU setting): the KV-cached engine commits the same tokens in
    the same rounds as with the dense mask (FlexAttention runs forward-only on CPU, unfused)."""
    model, config = student()
    flex_config = config.replace(attention_backend="flex")
    flex = build_model(flex_config, "student").eval()
    flex.load_state_dict(model.state_dict(), strict=False)
    decode = DecodeConfig(max_new_tokens=12, block_size=4, threshold=0.5)
    dense_rows = _result_rows(DiffusionRolloutEngine(model, config).generate(PROMPTS, decode))
    flex_rows = _result_rows(DiffusionRolloutEngine(flex, flex_config).generate(PROMPTS, decode))
    assert flex_rows == dense_rows
    assert any(steps.count(s) > 1 for _, steps in dense_rows for s in set(steps)), "no multi-token round"
