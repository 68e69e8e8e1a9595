"""Issue 15: LLaDA-MoE in lm-evaluation-harness (llada_moe_hf.evaluation, `llada-moe eval`).

On the embedded tiny model (sort/reverse digits) with the local tasks in examples/eval_tasks: the Monte-Carlo
likelihood against an exact enumeration of every mask pattern, determinism, is_greedy against the reference
greedy loop, generate_until (stop strings, chat template, block rounding), lm-eval's simple_evaluate and the CLI.
"""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch


pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install -e '.[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402
from llada_moe_hf.demo import chat_prompt, format_digits, held_out_questions, task_answer  # noqa: E402
from llada_moe_hf.evaluation import (  # noqa: E402
    LLaDAMoEEvalLM,
    mc_loglikelihood,
    request_generator,
    sample_mask_patterns,
    stratified_mask_counts,
)


TASKS_DIR = REPO_ROOT / "examples" / "eval_tasks"
GEN_TASK, MC_TASK = "llada_moe_tiny_digits", "llada_moe_tiny_digits_mc"


@pytest.fixture(scope="module")
def lm():
    return LLaDAMoEEvalLM(pretrained="tiny", device="cpu", batch_size=8, mc_num=16)


@pytest.fixture(scope="module")
def question(lm):
    """A held-out question as (context ids, right answer ids, wrong answer ids), chat-formatted."""
    task, digits = held_out_questions(1, seed=3)[0]
    context = lm.tok_encode(chat_prompt(lm.tokenizer, task, digits))
    right = lm.tok_encode(format_digits(task_answer(task, digits)))
    wrong = lm.tok_encode(format_digits(digits[::-1] if task == "sort" else sorted(digits)))
    assert right != wrong
    return context, right, wrong


def ll_instance(context: str, continuation: str, idx=0):
    return Instance("loglikelihood", {}, (context, continuation), idx, ("test", 0, 1))


def gen_instance(context: str, **gen_kwargs):
    return Instance("generate_until", {}, (context, gen_kwargs), 0, ("test", 0, 1))


# ------------------------------------------------------------------------------------------------ the estimator


@pytest.mark.parametrize("length", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("num_samples", [1, 3, 8, 10, 16])
def test_stratified_counts_are_uniform_per_sample(length, num_samples):
    table = torch.stack([stratified_mask_counts(k, length, num_samples) for k in range(1, length + 1)])
    assert int(table.min()) >= 1 and int(table.max()) <= length
    # Over the random start k, every sample's count takes each value 1..length exactly once: unbiased.
    for column in table.T:
        assert sorted(column.tolist()) == list(range(1, length + 1))
    if num_samples % length == 0:  # then every start covers each count equally often
        for row in table:
            assert torch.bincount(row, minlength=length + 1)[1:].tolist() == [num_samples // length] * length


def test_mask_patterns_have_the_stratified_counts():
    generator = torch.Generator().manual_seed(0)
    patterns = sample_mask_patterns(6, 12, generator)
    counts = patterns.sum(-1)
    assert sorted(counts.tolist()) == sorted([1, 2, 3, 4, 5, 6] * 2)
    # Subsets are uniform given the count: each position is masked in n / L of the draws of count n.
    generator = torch.Generator().manual_seed(1)
    draws = torch.cat([sample_mask_patterns(5, 5, generator) for _ in range(2000)])
    for n in range(1, 6):
        rows = draws[draws.sum(-1) == n].float()
        assert torch.allclose(rows.mean(0), torch.full((5,), n / 5), atol=0.06)


def exact_pattern_scores(model, context, continuation, mask_id, cfg=0.0):
    """(L / n) * sum of log p(x_j) over masked j, for every non-empty mask pattern: direct forward passes."""
    length = len(continuation)
    scores = {}
    for pattern in itertools.product([False, True], repeat=length):
        if not any(pattern):
            continue
        tokens = list(context) + [mask_id if m else t for m, t in zip(pattern, continuation)]
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0].double()
            if cfg:
                uncond = torch.tensor([[mask_id] * len(context) + tokens[len(context) :]])
                un = model(uncond).logits[0].double()
                logits = un + (cfg + 1) * (logits - un)
        log_probs = torch.log_softmax(logits[len(context) :], -1)
        total = sum(float(log_probs[j, continuation[j]]) for j in range(length) if pattern[j])
        scores[pattern] = total * length / sum(pattern)
    return scores


def by_count(scores, length):
    return {n: [s for p, s in scores.items() if sum(p) == n] for n in range(1, length + 1)}


def test_estimator_expectation_equals_exact_enumeration_and_converges(lm, question):
    context, _, wrong = question
    continuation = wrong[:4]
    length = len(continuation)
    scores = exact_pattern_scores(lm.model, context, continuation, lm.mask_id)
    groups = by_count(scores, length)
    g = {n: sum(v) / len(v) for n, v in groups.items()}
    exact = sum(g.values()) / length  # the ELBO: n uniform on 1..L, then a uniform subset of size n
    assert exact < -1.0  # a wrong answer: far from 0, so the checks below are not trivially met

    # Expectation of the estimator, exactly: average over the random start k of the stratified counts.
    for mc_num in (1, 3, 8, 16):
        expectation = sum(
            sum(g[int(n)] for n in stratified_mask_counts(k, length, mc_num)) / mc_num for k in range(1, length + 1)
        ) / length
        assert expectation == pytest.approx(exact, rel=1e-12)

    # Its variance when L divides mc_num: the within-count variances only.
    within = sum(sum((s - g[n]) ** 2 for s in v) / len(v) for n, v in groups.items()) / length
    mc_num = 16
    predicted_sd = math.sqrt(within / mc_num)
    estimates = [
        mc_loglikelihood(lm.model, context, continuation, mask_id=lm.mask_id, mc_num=mc_num, batch_size=16, seed=s)
        for s in range(24)
    ]
    mean = sum(estimates) / len(estimates)
    variance = sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1)
    assert abs(mean - exact) < 4 * predicted_sd / math.sqrt(len(estimates))
    assert 0.25 < variance / predicted_sd**2 < 2.5
    # Plain i.i.d. sampling would have the total variance; stratification removes the between-count part.
    total = sum(sum((s - exact) ** 2 for s in v) / len(v) for v in groups.values()) / length
    assert within < total

    # Convergence: many samples (evaluated once per distinct pattern: at most 15 rows here) close in.
    big = mc_loglikelihood(lm.model, context, continuation, mask_id=lm.mask_id, mc_num=4096, batch_size=16, seed=7)
    assert abs(big - exact) < 4 * math.sqrt(within / 4096) < predicted_sd


def test_one_token_continuation_is_exact_also_with_guidance(lm, question):
    context, _, wrong = question
    values = {}
    for cfg in (0.0, 1.5):
        values[cfg] = exact_pattern_scores(lm.model, context, wrong[:1], lm.mask_id, cfg=cfg)[(True,)]
        estimate = mc_loglikelihood(lm.model, context, wrong[:1], mask_id=lm.mask_id, mc_num=16, batch_size=4, cfg=cfg)
        assert estimate == pytest.approx(values[cfg], abs=1e-4)
    assert abs(values[1.5] - values[0.0]) > 0.1  # guidance changes the number: the context matters here


def test_request_generator_depends_on_seed_and_request_only():
    a = torch.rand(4, generator=request_generator(1, [1, 2, 3], 4))
    assert torch.equal(a, torch.rand(4, generator=request_generator(1, [1, 2, 3], 4)))
    assert not torch.equal(a, torch.rand(4, generator=request_generator(2, [1, 2, 3], 4)))
    assert not torch.equal(a, torch.rand(4, generator=request_generator(1, [1, 2, 4], 4)))


# ------------------------------------------------------------------------------------------------ the lm-eval model


def test_registered_and_lm_eval_registry_complete():
    from lm_eval.api.registry import get_model

    assert get_model("llada_moe") is LLaDAMoEEvalLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours did not hide lm-eval's own models


def test_loglikelihood_same_seed_same_numbers_whatever_the_order_or_batching(lm):
    questions = held_out_questions(4, seed=11)
    requests = []
    for task, digits in questions:
        context = chat_prompt(lm.tokenizer, task, digits)
        requests.append(ll_instance(context, format_digits(task_answer(task, digits))))
        requests.append(ll_instance(context, format_digits(digits)))
    first = lm.loglikelihood(requests, disable_tqdm=True)
    again = lm.loglikelihood(list(reversed(requests)), disable_tqdm=True)[::-1]
    assert first == again
    other = LLaDAMoEEvalLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", batch_size=4, mc_num=16)
    rebatched = other.loglikelihood(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(first, rebatched):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6) and greedy_a == greedy_b
    reseeded = LLaDAMoEEvalLM(
        pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", batch_size=8, mc_num=16, seed=5
    )
    assert [v for v, _ in reseeded.loglikelihood(requests, disable_tqdm=True)] != [v for v, _ in first]
    # The model knows the task: the right answer is far likelier, and is the greedy decoding.
    for (right, right_greedy), (wrong, wrong_greedy) in zip(first[::2], first[1::2]):
        assert right > wrong + 5 and right_greedy and not wrong_greedy


def reference_is_greedy(model, context, continuation, mask_id):
    """LLaDA's suffix_greedy_prediction: from an all-masked continuation, commit the single most confident
    position (its argmax token) per step."""
    sequence = torch.tensor([list(context) + [mask_id] * len(continuation)])
    for _ in continuation:
        masked = sequence == mask_id
        with torch.no_grad():
            logits = model(sequence).logits[masked]
        x0 = logits.argmax(-1)
        confidence = torch.softmax(logits.float(), -1).gather(-1, x0[:, None]).squeeze(-1)
        best = int(confidence.argmax())
        positions = masked.nonzero()[best]
        sequence[positions[0], positions[1]] = x0[best]
    return sequence[0, len(context) :].tolist() == list(continuation)


def test_is_greedy_matches_the_reference_greedy_loop(lm):
    pairs = []
    for task, digits in held_out_questions(3, seed=21):
        context = lm.tok_encode(chat_prompt(lm.tokenizer, task, digits))
        answer = lm.tok_encode(format_digits(task_answer(task, digits)))
        pairs += [(context, answer), (context, answer[:3]), (context, answer[::-1]), (context[2:], answer)]
    flags = lm._greedy_flags(pairs, disable_tqdm=True)
    expected = [reference_is_greedy(lm.model, c, x, lm.mask_id) for c, x in pairs]
    assert flags == expected
    assert any(flags) and not all(flags)


def test_bad_arguments_are_refused_clearly(lm):
    with pytest.raises(ValueError, match="not a multiple of batch_size"):
        LLaDAMoEEvalLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", batch_size=6, mc_num=16)
    with pytest.raises(ValueError, match="batch_size='auto' is not supported"):
        LLaDAMoEEvalLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", batch_size="auto")
    with pytest.raises(ValueError, match="Unknown model argument.*'stepz'"):
        LLaDAMoEEvalLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", stepz=3)
    with pytest.raises(ValueError, match="threshold"):
        LLaDAMoEEvalLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", threshold=2.0)
    with pytest.raises(ValueError, match="cfg must be"):
        LLaDAMoEEvalLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", cfg=-1)
    with pytest.raises(ValueError, match="Unknown generation kwarg.*'blocklength'"):
        lm.generate_until([gen_instance("sort 1 2", blocklength=8)], disable_tqdm=True)


def test_every_generation_config_field_passes_through(lm, monkeypatch):
    """Model arguments and generation kwargs take DiffusionGenerationConfig's fields, whatever they are, and
    hand them to generate()."""
    from llada_moe_hf.generation_llada_moe import DiffusionGenerationConfig

    for name in DiffusionGenerationConfig._FIELDS:
        if name not in ("max_length", "output_history", "return_dict_in_generate"):
            assert LLaDAMoEEvalLM._check_generation_kwargs({name: None}, source="model argument") == {}
    custom = LLaDAMoEEvalLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", remasking="margin", top_k=3)
    settings, stops = custom._generation_settings({"until": ["x"], "max_gen_toks": 16, "threshold": 0.9})
    assert settings["remasking"] == "margin" and settings["top_k"] == 3 and settings["threshold"] == 0.9
    assert settings["max_new_tokens"] == 16 and settings["steps"] == 16 and settings["block_length"] == 8
    assert stops == ["x", "<|endoftext|>"]
    seen = []
    original = lm.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", spy)
    custom.generate_until([gen_instance("sort 1 2", max_gen_toks=8, cache_mode="dual", do_sample=False)])
    assert seen[0]["remasking"] == "margin" and seen[0]["top_k"] == 3 and seen[0]["cache_mode"] == "dual"
    assert seen[0]["temperature"] == 0.0 and seen[0]["max_new_tokens"] == 8 and seen[0]["steps"] == 8
    assert seen[0]["eos_token_id"] == lm.stop_ids and seen[0]["mask_token_id"] == lm.mask_id


def test_generate_until_batches_cuts_and_rounds(lm):
    questions = held_out_questions(6, seed=31)
    contexts = [chat_prompt(lm.tokenizer, task, digits) for task, digits in questions]
    answers = [format_digits(task_answer(task, digits)) for task, digits in questions]
    plain = lm.generate_until([gen_instance(c, until=["<|role_end|>"], max_gen_toks=16) for c in contexts])
    assert plain == answers
    # Stop strings cut the answer at their first occurrence.
    cut = lm.generate_until([gen_instance(c, until=[a.split()[2]], max_gen_toks=16) for c, a in zip(contexts, answers)])
    assert cut == [a[: a.index(a.split()[2])] for a in answers]
    # max_gen_toks 12 is rounded up to 16 for the model's block length of 8; the fast decoders agree here.
    rounded = lm.generate_until([gen_instance(c, max_gen_toks=12, threshold=0.9, cache_mode="dual") for c in contexts])
    assert rounded == answers
    # Without the chat template the tiny model (trained on chat prompts only) does not answer.
    raw = lm.generate_until([gen_instance(f"{t} {format_digits(d)}", max_gen_toks=16) for t, d in questions])
    assert raw != answers


def test_loglikelihood_rolling_sums_window_estimates(lm):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = "sort 3 1 4 1 5 9 2 6 5 3 5 8 9 7 9 3 2 3 8 4 6 2 6 4 3 3 8 3 2 7 9 5"
    short = LLaDAMoEEvalLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", batch_size=8, mc_num=8,
                           max_length=12)
    (value,) = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))])
    tokens = lm.tok_encode(text)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, lm.eot_token_id, 11, 1)]
    assert len(windows) == 3 and sum(len(c) for _, c in windows) == len(tokens)
    assert all(len(c) + len(x) <= 12 for c, x in windows)
    expected = sum(mc_loglikelihood(lm.model, c, x, mask_id=lm.mask_id, mc_num=8, batch_size=8) for c, x in windows)
    assert value == pytest.approx(expected, rel=1e-9) and value < 0


# ------------------------------------------------------------------------------------------------ lm-eval end to end


LIMIT, MC_NUM, BATCH = 8, 8, 8


@pytest.fixture(scope="module")
def evaluated():
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="llada_moe",
        model_args=f"pretrained=tiny,mc_num={MC_NUM},device=cpu",
        tasks=[GEN_TASK, MC_TASK],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        limit=LIMIT,
        batch_size=BATCH,
        apply_chat_template=True,
        log_samples=True,
    )


def test_simple_evaluate_on_the_local_tasks(evaluated):
    assert evaluated["results"][GEN_TASK]["exact_match,none"] >= 0.85
    assert evaluated["results"][MC_TASK]["acc,none"] >= 0.85
    sample = evaluated["samples"][GEN_TASK][0]
    assert sample["arguments"][0][0].startswith("<role>SYSTEM</role>")  # lm-eval applied our chat template
    assert sample["filtered_resps"][0] == sample["target"]
    assert evaluated["config"]["llada_moe_mc_num"] == MC_NUM


def responses(samples):
    """doc id -> the model's raw responses with every value as text (lm-eval's samples file stores text)."""

    def text(value):
        return [text(v) for v in value] if isinstance(value, (list, tuple)) else str(value)

    return {s["doc_id"]: text(s["resps"]) for s in samples}


def test_cli_eval_in_two_processes_matches_simple_evaluate(evaluated, tmp_path):
    """`llada-moe eval` under torchrun (2 CPU processes, gloo: lm-eval's data-parallel path) prints lm-eval's
    table, writes its JSON, and gives every request the same numbers as one process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "llada_moe_hf.cli", "eval", "--model-args", f"pretrained=tiny,mc_num={MC_NUM},device=cpu",
        "--include-path", str(TASKS_DIR), "--tasks", f"{GEN_TASK},{MC_TASK}", "--apply-chat-template",
        "--limit", str(LIMIT), "--batch-size", str(BATCH), "--output-path", str(tmp_path), "--log-samples",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("|Version|") == 1  # lm-eval's table, printed by the main process only
    assert f"|{GEN_TASK} " in done.stdout and f"|{MC_TASK}|" in done.stdout and "exact_match" in done.stdout
    (written,) = list(tmp_path.rglob("results_*.json"))
    data = json.loads(written.read_text())
    assert set(data["results"]) == {GEN_TASK, MC_TASK}
    assert "seed=1234" in data["config"]["model_args"]  # --seed's torch seed reaches the estimator
    assert data["config"]["llada_moe_world_size"] == 2  # the requests were shared by two processes
    for task in (GEN_TASK, MC_TASK):
        (path,) = [p for p in tmp_path.rglob(f"samples_{task}_*.jsonl") if p.name[len(task) + 9].isdigit()]
        logged = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(logged) == LIMIT
        assert responses(logged) == responses(evaluated["samples"][task])


def test_cli_eval_refuses_bad_arguments(capsys):
    from llada_moe_hf.cli import main

    assert main(["eval", "--tasks", GEN_TASK, "--include-path", "/no/such/folder"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["eval", "--tasks", GEN_TASK, "--seed", "1,2"]) == 2
    assert "--seed takes one number or four" in capsys.readouterr().err
