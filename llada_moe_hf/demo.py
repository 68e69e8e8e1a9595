# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""`llada-moe demo`: the embedded tiny LLaDA-MoE, end to end, with no download.

The tiny model (llada_moe_hf/assets/tiny, trained by examples/train_tiny.py) knows two digit-string tasks whose
answers can be checked exactly: "sort 3 1 4 1 5" -> "1 1 3 4 5" and "reverse 3 1 4 1 5" -> "5 1 4 1 3". The
task definitions below are shared by the training script, the demo and modeling_tests/test_demo_quality.py, so
the held-out split is the same everywhere.
"""

import random
import zlib
from pathlib import Path


TINY_ASSET_DIR = Path(__file__).parent / "assets" / "tiny"
TASKS = ("sort", "reverse")
MIN_DIGITS, MAX_DIGITS = 4, 8
# Answer region: up to 8 digits + <|role_end|>, padded with <|endoftext|> (two blocks of 8 for the samplers).
GEN_LENGTH, BLOCK_LENGTH = 16, 8
HELD_OUT_EVERY = 7  # one question in 7 (by a fixed hash) is never trained on


def task_answer(task: str, digits: list[int]) -> list[int]:
    if task == "sort":
        return sorted(digits)
    if task == "reverse":
        return digits[::-1]
    raise ValueError(f"unknown task {task!r}; the tiny model knows {TASKS}.")


def format_digits(digits: list[int]) -> str:
    return " ".join(str(d) for d in digits)


def is_held_out(task: str, digits: list[int]) -> bool:
    """A fixed hash split: held-out questions are never generated for training."""
    return zlib.crc32(f"{task}:{format_digits(digits)}".encode()) % HELD_OUT_EVERY == 0


def sample_question(rng: random.Random, held_out: bool) -> tuple[str, list[int]]:
    """Draw (task, digits) from the training split (held_out=False) or the held-out split (held_out=True)."""
    while True:
        task = rng.choice(TASKS)
        digits = [rng.randrange(10) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
        if is_held_out(task, digits) == held_out:
            return task, digits


def question_text(task: str, digits: list[int]) -> str:
    return f"{task} {format_digits(digits)}"


def held_out_questions(count: int, seed: int = 1234) -> list[tuple[str, list[int]]]:
    rng = random.Random(seed)
    return [sample_question(rng, held_out=True) for _ in range(count)]


def parse_answer(text: str) -> list[int] | None:
    """Digits of a decoded answer (special tokens already skipped); None when it is not a digit list."""
    words = text.split()
    if not words or not all(w.isdigit() and len(w) == 1 for w in words):
        return None
    return [int(w) for w in words]


# ------------------------------------------------------------------------------------------ evaluation

# The samplers compared: the exact reference loop (one token per step, full forwards) and the fast path
# (confidence-threshold parallel decoding with the dual KV cache), plus each change on its own.
SAMPLERS = {
    "exact": dict(cache_mode="none"),
    "exact + dual cache": dict(cache_mode="dual"),
    "threshold 0.9": dict(threshold=0.9, cache_mode="none"),
    "threshold 0.9 + dual cache": dict(threshold=0.9, cache_mode="dual"),
}


def generation_kwargs(tokenizer, **overrides) -> dict:
    """Settings shared by every sampler: GEN_LENGTH tokens in blocks of BLOCK_LENGTH, one token per step for
    the fixed schedule, temperature 0, low-confidence remasking. The fixed schedule runs every step (the
    reference loop, no early stop); threshold decoding stops a row at <|role_end|> / <|endoftext|>."""
    kwargs = dict(
        max_new_tokens=GEN_LENGTH,
        block_length=BLOCK_LENGTH,
        steps=GEN_LENGTH,
        temperature=0.0,
        remasking="low_confidence",
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|role_end|>")],
        pad_token_id=tokenizer.pad_token_id,
        stop_at_eos="threshold" in overrides,
        return_dict_in_generate=True,
    )
    kwargs.update(overrides)
    return kwargs


def chat_prompt(tokenizer, task: str, digits: list[int]) -> str:
    messages = [{"role": "user", "content": question_text(task, digits)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def evaluate(model, tokenizer, questions, batch_size: int = 64, **sampler) -> dict:
    """Answer `questions` in left-padded batches; return accuracy (exact match), forward passes per batch,
    tokens per forward (mean over answers) and generated tokens per second (eos padding not counted)."""
    import time

    correct, nfe, batches, tokens_per_forward, tokens, seconds = 0, 0, 0, [], 0, 0.0
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        encoded = tokenizer(
            [chat_prompt(tokenizer, *q) for q in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(model.device)
        began = time.perf_counter()
        out = model.generate(**encoded, **generation_kwargs(tokenizer, **sampler))
        seconds += time.perf_counter() - began
        answers = out.sequences[:, encoded.input_ids.shape[1] :].cpu()
        for (task, digits), row in zip(chunk, answers):
            text = tokenizer.decode(row, skip_special_tokens=True)
            correct += parse_answer(text) == task_answer(task, digits)
            tokens += sum(int(t) not in stop_ids for t in row)
        nfe += out.nfe
        batches += 1
        tokens_per_forward.extend(out.tokens_per_forward.tolist())
    return {
        "questions": len(questions),
        "accuracy": correct / len(questions),
        "forwards_per_batch": nfe / batches,
        "tokens_per_forward": sum(tokens_per_forward) / len(tokens_per_forward),
        "tokens_per_second": tokens / seconds,
        "seconds": seconds,
        "batch_size": batch_size,
    }


def evaluate_samplers(model, tokenizer, questions, batch_size: int = 64, samplers=None) -> dict:
    import torch

    with torch.inference_mode():
        return {name: evaluate(model, tokenizer, questions, batch_size, **kw) for name, kw in (samplers or SAMPLERS).items()}


def format_table(results: dict) -> str:
    lines = [
        "| sampler | accuracy | forward passes / batch | tokens / forward | tokens / s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r['accuracy']:.1f}% | {r['forwards_per_batch']:.1f} | {r['tokens_per_forward']:.2f} "
            f"| {r['tokens_per_second']:.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the command


def export_custom_code(asset_dir: Path, out_dir: Path) -> Path:
    """Turn the release-layout checkpoint into a Hub custom-code repo (our .py files + auto_map) in `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    from .modeling_llada_moe import LLaDAMoEForDiffusionLM

    LLaDAMoEForDiffusionLM.from_pretrained(asset_dir).save_pretrained(out_dir)
    PreTrainedTokenizerFast.from_pretrained(asset_dir).save_pretrained(out_dir)
    return out_dir


def add_arguments(parser):
    parser.add_argument(
        "--model", type=Path, default=TINY_ASSET_DIR, help="a checkpoint of the tiny task (default: the embedded one)"
    )
    parser.add_argument("--show", type=int, default=4, help="questions answered one by one, streamed (default 4)")
    parser.add_argument("--eval", type=int, default=128, help="held-out questions for the accuracy table (default 128)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-stream", action="store_true", help="print answers without drawing the drafts")
    parser.add_argument("--sleep", type=float, default=0.05, help="pause between drafts, seconds (default 0.05)")
    # One thread: this model is far too small to gain from more, and on a busy machine several threads per
    # process oversubscribe the cores (measured: 8 s with 1 thread, 238 s with 2, on a loaded 2-core VM).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's choice)")


def run(args) -> int:
    """Export the checkpoint as a custom-code repo, then answer and measure in a fresh Python process.

    A fresh process, because this one has imported llada_moe_hf, whose Auto registration transformers prefers
    over a repo's custom code: only a process without the package shows what a Hub user gets.
    """
    import subprocess
    import sys
    import tempfile

    if not (args.model / "config.json").is_file():
        raise ValueError(f"{args.model} has no config.json: pass --model a checkpoint directory (or leave it out).")
    if args.show < 0 or args.eval < 1 or args.batch_size < 1 or args.threads < 0:
        raise ValueError("--show and --threads must be >= 0, --eval and --batch-size >= 1.")
    with tempfile.TemporaryDirectory(prefix="llada-moe-demo-") as tmp:
        repo = export_custom_code(args.model, Path(tmp))
        print(f"Converted {args.model} into a custom-code repo ({', '.join(sorted(p.name for p in repo.glob('*.py')))})")
        worker = [sys.executable, str(Path(__file__).resolve()), str(repo), str(args.show), str(args.eval)]
        worker += [str(args.batch_size), str(int(args.no_stream)), str(args.sleep), str(args.threads)]
        return subprocess.run(worker, check=False).returncode


def load_terminal_module():
    """llada_moe_hf/terminal.py loaded by path: the worker must not import the llada_moe_hf package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llada_moe_demo_terminal", Path(__file__).parent / "terminal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(repo, show, eval_count, batch_size, no_stream, sleep, threads) -> int:
    """The demo proper, run where llada_moe_hf is not imported: plain transformers + the repo's code."""
    import sys

    import torch
    from transformers import AutoModel, AutoTokenizer

    DiffusionStreamer = load_terminal_module().DiffusionStreamer

    if threads:
        torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(
        f"Loaded {type(model).__name__} from {type(model).__module__} with AutoModel.from_pretrained(repo, "
        f"trust_remote_code=True) (llada_moe_hf imported: {'llada_moe_hf' in sys.modules}): "
        f"{n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, {cfg.num_experts} experts "
        f"(top-{cfg.num_experts_per_tok}) per layer."
    )

    stop_ids = generation_kwargs(tokenizer)["eos_token_id"]
    for task, digits in held_out_questions(show, seed=7):
        print(f"\nQ: {question_text(task, digits)}    (expected: {format_digits(task_answer(task, digits))})\nA: ", end="")
        ids = tokenizer(chat_prompt(tokenizer, task, digits), return_tensors="pt", add_special_tokens=False)
        streamer = None
        if not no_stream:
            # Drafts (terminals only) show the end tokens forming and each <|mask|> as "_"; the confirmed text
            # stops at the end of the answer.
            streamer = DiffusionStreamer(tokenizer, skip_prompt=True, sleep_time=sleep, start_column=len("A: "),
                                         stop_ids=stop_ids, skip_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, streamer=streamer, **generation_kwargs(tokenizer))
        answer = tokenizer.decode(out.sequences[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
        verdict = "correct" if parse_answer(answer) == task_answer(task, digits) else "WRONG"
        if no_stream:
            print(answer)
        print(f"   -> {answer!r}: {verdict}, {out.nfe} forward passes (exact sampler)")

    print(
        f"\nHeld-out questions (never seen in training): {eval_count}, batches of {batch_size}, "
        f"CPU threads: {torch.get_num_threads()}"
    )
    results = evaluate_samplers(model, tokenizer, held_out_questions(eval_count), batch_size)
    print(format_table(results))
    exact, fast = results["exact"], results["threshold 0.9 + dual cache"]
    print(
        f"threshold 0.9 + dual cache vs exact: {exact['forwards_per_batch'] / fast['forwards_per_batch']:.1f}x fewer "
        f"forward passes, {fast['tokens_per_second'] / max(exact['tokens_per_second'], 1e-9):.1f}x the tokens/s, "
        f"accuracy {100 * (fast['accuracy'] - exact['accuracy']):+.1f} points."
    )
    return 0


if __name__ == "__main__":
    # Run as a script by `run` (never imported as part of the package here). Drop this file's folder from the
    # import path so that its sibling modules cannot shadow anything.
    import sys

    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    repo_arg, show_arg, eval_arg, batch_arg, no_stream_arg, sleep_arg, threads_arg = sys.argv[1:]
    sys.exit(
        worker(
            repo_arg, int(show_arg), int(eval_arg), int(batch_arg), bool(int(no_stream_arg)), float(sleep_arg), int(threads_arg)
        )
    )
