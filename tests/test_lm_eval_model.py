"""The likelihoods and the lm-eval model ``opdlm``: the AR log-likelihood against HF transformers,
the student's block-diffusion bound against a brute-force enumeration, and lm-eval on local task
YAMLs (no hub): generate_until gives opdlm-eval's accuracy on the same data, multiple choice runs."""

import itertools
import json
import math
import os

import pytest
import torch

from opdlm_megatron.checkpoint.model import build_from_checkpoint
from opdlm_megatron.eval.likelihood import ar_loglikelihood, block_diffusion_loglikelihood
from opdlm_megatron.model.masks import opd_training_batch
from opdlm_megatron.model.build import attention_mask, build_model, mask_unused_vocab
from opdlm_megatron.runtime.platform import initialize_runtime
from tests.conftest import run_torchrun
from tests.helpers import save_tiny_student, tiny_config


def test_ar_loglikelihood_matches_hf(tmp_path, runtime):
    from opdlm_megatron.tools.convert_hf_to_megatron import convert
    from tests.distributed.convert_common import make_tiny_hf

    hf = make_tiny_hf("llama_gqa_untied_llama3rope", str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    model, config = build_from_checkpoint(str(tmp_path / "ckpt"), "teacher")
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 2, 7)]
    continuations = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (3, 6, 1)]
    # one continuation that is the HF model's own greedy continuation
    with torch.no_grad():
        ids = torch.tensor([contexts[0]])
        greedy = []
        for _ in range(3):
            nxt = int(hf(input_ids=ids).logits[0, -1].argmax())
            greedy.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    continuations[0] = greedy
    got = ar_loglikelihood(model, config, contexts, continuations, micro_batch_size=2)
    for (logp, is_greedy), ctx, cont in zip(got, contexts, continuations):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
        positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        expected = sum(float(logits[p, t]) for p, t in zip(positions, cont))
        assert logp == pytest.approx(expected, abs=1e-4)
        assert is_greedy == all(int(logits[p].argmax()) == t for p, t in zip(positions, cont))
    assert got[0][1] is True


def test_block_diffusion_bound_matches_brute_force(runtime):
    """The exact expectation of the estimator: per block, sum over masks M of
    B(|M|, n - |M| + 1) * sum_{i in M} log p(x_i | clean earlier blocks, block masked at M)."""
    config = tiny_config(block_size=4)
    model = build_model(config, "student").eval()
    context, continuation = [5, 6, 7], [11, 12, 13, 14, 15]  # blocks of 4 + 1
    exact = 0.0
    for block in ([0, 1, 2, 3], [4]):
        n = len(block)
        for size in range(1, n + 1):
            beta = math.factorial(size - 1) * math.factorial(n - size) / math.factorial(n)
            for masked in itertools.combinations(block, size):
                xt = torch.tensor([continuation])
                xt[0, list(masked)] = config.mask_token_id
                batch = opd_training_batch(torch.tensor([context]), torch.ones(1, 3, dtype=torch.bool),
                                           torch.tensor([continuation]), xt, torch.ones(1, 5, dtype=torch.bool),
                                           4, config.logit_shift)
                with torch.no_grad():
                    logits = model(batch.input_ids, batch.position_ids, attention_mask(config, batch.layout))
                logp = mask_unused_vocab(logits[0].double(), config).log_softmax(-1)
                exact += beta * sum(float(logp[batch.prediction_columns[0, i], continuation[i]]) for i in masked)
    draws = [block_diffusion_loglikelihood(model, config, [context], [continuation], 1, seed)[0] for seed in range(400)]
    mean = sum(draws) / len(draws)
    se = (sum((d - mean) ** 2 for d in draws) / (len(draws) - 1) / len(draws)) ** 0.5
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # several samples in one call: their average, deterministic in the seed
    many = block_diffusion_loglikelihood(model, config, [context, context[:2]], [continuation, [9]], 8, seed=3)
    assert many == block_diffusion_loglikelihood(model, config, [context, context[:2]], [continuation, [9]], 8, seed=3)


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = root / "ckpt"
    save_tiny_student(ckpt, seed=11, max_sequence_length=128)
    return dict(root=root, ckpt=str(ckpt))


def _write_task(root, name: str, data_file: str, body: str) -> str:
    directory = root / f"tasks_{name}"
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {data_file}\ntest_split: test\n{body}")
    return str(directory)


QUESTIONS = [f"what is {a} + {b} ?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


def _opdlm_eval_then_lm_eval(ckpt: str, tmp_path, task: str, before_scoring=None):
    """opdlm-eval's completions of QUESTIONS (``before_scoring(data, completions)`` may check them), then the
    same questions with every other completion as its reference: opdlm-eval scores 0.5, and lm-eval's
    generate_until through the OPDLM model scores the same. Returns (include path, the lm-eval model, score)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from opdlm_megatron.eval.lm_eval_model import OPDLMEvalModel
    from opdlm_megatron.evaluate import main as opdlm_eval

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "reference": "x"}) + "\n" for q in QUESTIONS))
    common = ["--student", ckpt, "--task", "jsonl", "--max-new-tokens", "8", "--no-chat-template", "--match", "exact",
              "--no-teacher", "--no-progress"]
    assert opdlm_eval([*common, "--data", str(data), "--out", str(tmp_path / "probe")]) == 0
    answers = [json.loads(line)["completion"] for line in open(tmp_path / "probe" / "samples.jsonl")]
    if before_scoring is not None:
        before_scoring(data, answers)
    data.write_text("".join(json.dumps({"prompt": q, "reference": answers[i] if i % 2 == 0 else "w7"}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    assert opdlm_eval([*common, "--data", str(data), "--out", str(tmp_path / "eval")]) == 0
    ours = json.load(open(tmp_path / "eval" / "summary.json"))["results"]["student tau=0.9"]["accuracy"]
    assert ours == 0.5
    include = _write_task(tmp_path, task, str(data), (
        "output_type: generate_until\ndoc_to_text: \"Question: {{prompt}}\\nAnswer:\"\ndoc_to_target: \"{{reference}}\"\n"
        "generation_kwargs:\n  until: [\"</s>\"]\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n"))
    with initialize_runtime(device="cpu", seed=0):
        model = OPDLMEvalModel(ckpt, kind="student", max_gen_toks=8)
        results = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=TaskManager(include_path=include))
    assert results["results"][task]["exact_match,none"] == ours
    return include, model, ours


def test_generate_until_matches_opdlm_eval(tiny_task, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    include, model, ours = _opdlm_eval_then_lm_eval(tiny_task["ckpt"], tmp_path, "tiny_qa")
    assert model.forwards > 0 and model.generated_tokens > 0

    # the same under torchrun at TP=2: rank 0 drives lm-eval, rank 1 follows
    out = tmp_path / "tp2.json"
    run_torchrun("lm_eval_cli.py", "--checkpoint", tiny_task["ckpt"], "--tasks", "tiny_qa", "--include-path", include,
                 "--model-args", "max_gen_toks=8", "--tp", "2", "--output", str(out))
    assert json.load(open(out))["results"]["tiny_qa"]["exact_match,none"] == ours


def test_moe_checkpoints_run_through_opdlm_eval_generate_and_lm_eval(tmp_path, monkeypatch):
    """A mixture-of-experts student (4 experts, top 2) through the three front ends: ``opdlm-generate``'s tokens
    equal each prompt decoded alone by the engine (it batches them: dropless routing keeps rows apart), and
    opdlm-eval and lm-eval's generate_until score it alike."""
    from transformers import AutoTokenizer

    from opdlm_megatron.commands import generate
    from opdlm_megatron.rollout import DecodeConfig, DiffusionRolloutEngine

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ckpt = save_tiny_student(tmp_path / "moe", seed=3, num_layers=2, num_experts=4, moe_router_topk=2,
                             moe_ffn_hidden_size=48)

    def generate_alone_and_batched(data, answers):
        assert generate.main(["--checkpoint", ckpt, "--prompts", str(data), "--out", str(tmp_path / "gen.jsonl"),
                              "--max-new-tokens", "8", "--device", "cpu"]) in (None, 0)
        generated = [json.loads(line)["completion_ids"] for line in open(tmp_path / "gen.jsonl")]
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(ckpt, "tokenizer"))
        with initialize_runtime(device="cpu", seed=0):
            model, config = build_from_checkpoint(ckpt, "student")
            engine = DiffusionRolloutEngine(model, config)
            for question, ids in zip(QUESTIONS, generated, strict=True):
                alone = engine.generate([generate.encode_prompt(tokenizer, {"prompt": question}, False)],
                                        DecodeConfig(max_new_tokens=8, threshold=0.9))
                assert alone.answer_ids[0][alone.answer_valid[0]].tolist() == ids, question

    _opdlm_eval_then_lm_eval(ckpt, tmp_path, "moe_qa", generate_alone_and_batched)


@pytest.mark.parametrize("kind", ["student", "ar"])
def test_multiple_choice_runs_through_loglikelihood(tiny_task, tmp_path, monkeypatch, kind):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from opdlm_megatron.eval.lm_eval_model import OPDLMEvalModel

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    rows = [{"question": f"what is {a} + {b} ?", "choices": [str(a + b), str(a + b + 1), "w5"], "label": 0}
            for a, b in [(1, 2), (3, 4), (2, 2)]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    include = _write_task(tmp_path, "tiny_mc", str(data), (
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n"))
    with initialize_runtime(device="cpu", seed=0):
        model = OPDLMEvalModel(tiny_task["ckpt"], kind=kind, mc_num=2)
        results = lm_eval.simple_evaluate(model=model, tasks=["tiny_mc"], task_manager=TaskManager(include_path=include))
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and len(results["samples"]["tiny_mc"]) == 3 if "samples" in results else True
