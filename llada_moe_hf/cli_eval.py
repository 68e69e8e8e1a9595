# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""`llada-moe eval`: lm-evaluation-harness on LLaDA-MoE (model type "llada_moe", see llada_moe_hf.evaluation).

    llada-moe eval --model-args pretrained=inclusionAI/LLaDA-MoE-7B-A1B-Instruct,dtype=bfloat16 \\
        --tasks gsm8k --apply-chat-template --batch-size 8 --output-path results/

lm-eval's main flags (either spelling: --model-args or --model_args). Prints lm-eval's results table and, with
--output-path, writes lm-eval's results JSON (a new time-stamped file; nothing is overwritten).
Several processes (data parallel): `accelerate launch -m llada_moe_hf.cli eval ...` on GPUs,
`torchrun --nproc_per_node N -m llada_moe_hf.cli eval ...` on CPUs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--model-args", "--model_args", default="pretrained=tiny",
        help="llada_moe model arguments, k=v,k=v (default: pretrained=tiny, the embedded tiny model): pretrained, "
        "dtype, device, batch_size, mc_num, cfg, seed, check_greedy, max_length, and any generate() parameter "
        "(max_new_tokens, steps, block_length, threshold, cache_mode, ...)",
    )
    parser.add_argument("--tasks", "-t", required=True, help="comma-separated task, group or tag names")
    parser.add_argument("--include-path", "--include_path", default=None, help="extra folder of task YAML files")
    parser.add_argument("--num-fewshot", "--num_fewshot", "-f", type=int, default=None)
    parser.add_argument(
        "--batch-size", "--batch_size", "-b", type=int, default=None,
        help="prompts per generate() call and rows per likelihood forward pass (mc_num must be a multiple)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument(
        "--limit", "-L", type=float, default=None,
        help="documents per task (a number < 1 is a fraction); for testing only",
    )
    parser.add_argument(
        "--gen-kwargs", "--gen_kwargs", default=None,
        help="generation kwargs for generate_until tasks, k=v,k=v (e.g. threshold=0.9,cache_mode=dual); they "
        "override the task's and the model arguments'",
    )
    parser.add_argument(
        "--apply-chat-template", "--apply_chat_template", nargs="?", const=True, default=False,
        help="format prompts with the tokenizer's chat template (Instruct models)",
    )
    parser.add_argument(
        "--fewshot-as-multiturn", "--fewshot_as_multiturn", action="store_true", default=None,
        help="few-shot examples as a multi-turn conversation (with --apply-chat-template)",
    )
    parser.add_argument("--system-instruction", "--system_instruction", default=None)
    parser.add_argument("--output-path", "--output_path", "-o", default=None, help="folder (or .json path) for results")
    parser.add_argument("--log-samples", "--log_samples", "-s", action="store_true", help="also write every sample")
    parser.add_argument(
        "--seed", default="0,1234,1234,1234",
        help="python,numpy,torch,fewshot seeds as lm-eval takes them (one number sets all four; 'None' leaves "
        "one unset). The torch seed also seeds llada_moe's likelihood estimate unless --model-args sets seed.",
    )
    parser.add_argument(
        "--confirm-run-unsafe-code", "--confirm_run_unsafe_code", action="store_true",
        help="allow tasks that execute model-written code (humaneval, mbpp)",
    )
    parser.add_argument("--predict-only", "--predict_only", "-x", action="store_true", help="outputs only, no metrics")
    parser.add_argument("--bootstrap-iters", "--bootstrap_iters", type=int, default=100000)


def parse_seeds(text: str) -> list[int | None]:
    """lm-eval's --seed: one number for all four seeds, or four comma-separated values (None to skip one)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == 1:
        parts = parts * 4
    if len(parts) != 4:
        raise ValueError(f"--seed takes one number or four comma-separated values, got {text!r}.")
    seeds = []
    for part in parts:
        if part.lower() == "none":
            seeds.append(None)
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"--seed values must be non-negative integers or None, got {part!r} in {text!r}.")
    return seeds


def parse_limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    if value <= 0:
        raise ValueError(f"--limit must be positive, got {value}.")
    return int(value) if value >= 1 and value == int(value) else value


def task_manager_for(names: list[str], include_path: str | None):
    """lm-eval's TaskManager. When every requested name is a task defined under --include-path, lm-eval's
    thousands of built-in task files are not indexed (seconds saved); otherwise they are."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ValueError(f"--include-path {include_path!r} is not a directory of task YAML files.")
        try:
            local = TaskManager(include_path=include_path, include_defaults=False)
        except TypeError:  # an lm-eval without include_defaults
            local = None
        if local is not None and all(name in local.all_subtasks for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    missing = [name for name in names if not manager.match_tasks([name])]
    if missing:
        raise ValueError(
            f"Unknown task(s) {missing}: check the names (`lm-eval ls tasks` lists lm-eval's tasks) or pass "
            "--include-path with the folder of your task YAML files."
        )
    return manager


def model_args_with_seed(model_args: str, torch_seed: int | None) -> str:
    """Add seed=<torch seed> unless the model arguments set a seed."""
    from lm_eval.utils import simple_parse_args_string

    if torch_seed is None or "seed" in simple_parse_args_string(model_args):
        return model_args
    return f"{model_args},seed={torch_seed}" if model_args.strip() else f"seed={torch_seed}"


def run(args) -> int:
    code = _run(args)
    _leave_process_group()  # not after an exception: the other processes may never reach the barrier
    return code


def _leave_process_group():
    """In a data-parallel run, wait until every process is done, then leave the process group. Without this a
    process other than 0 exits while process 0 still writes the results, and gloo's threads can abort it at
    interpreter exit ("terminate called without an active exception", SIGABRT: the run then fails). Every exit
    code of `_run` is reached by all processes alike (argument errors, lm-eval's ValueErrors, success)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _run(args) -> int:
    try:
        from . import evaluation  # registers "llada_moe"; says how to install lm-eval if it is missing

        import lm_eval
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.utils import make_table
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    try:
        seeds = parse_seeds(args.seed)
        limit = parse_limit(args.limit)
        names = [name.strip() for name in args.tasks.split(",") if name.strip()]
        if not names:
            raise ValueError("--tasks is empty: pass one or more comma-separated task names.")
        task_manager = task_manager_for(names, args.include_path)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    log_samples = args.log_samples or args.predict_only  # predictions are the samples
    tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
    options = {}
    if args.fewshot_as_multiturn is not None:
        options["fewshot_as_multiturn"] = args.fewshot_as_multiturn
    started = time.time()
    try:
        results = lm_eval.simple_evaluate(
            model=evaluation.MODEL_NAME,
            model_args=model_args_with_seed(args.model_args, seeds[2]),
            tasks=names,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            device=args.device,
            limit=limit,
            bootstrap_iters=args.bootstrap_iters,
            log_samples=log_samples,
            evaluation_tracker=tracker,
            system_instruction=args.system_instruction,
            apply_chat_template=args.apply_chat_template,
            gen_kwargs=args.gen_kwargs,
            task_manager=task_manager,
            predict_only=args.predict_only,
            random_seed=seeds[0],
            numpy_random_seed=seeds[1],
            torch_random_seed=seeds[2],
            fewshot_random_seed=seeds[3],
            confirm_run_unsafe_code=args.confirm_run_unsafe_code,
            **options,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if results is None:  # not the main process of a data-parallel run
        return 0

    samples = results.pop("samples", None) if log_samples else None
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        written = _files_written(Path(args.output_path), started)
        for path in written:
            print(f"wrote {path}", file=sys.stderr)

    print(
        f"llada_moe ({args.model_args}), gen_kwargs: ({args.gen_kwargs}), limit: {limit}, "
        f"num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}"
    )
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return 0


def _files_written(output_path: Path, since: float) -> list[Path]:
    """The JSON files lm-eval's tracker wrote for this run (it adds a date to every name)."""
    if output_path.suffix == ".json":
        candidates = output_path.parent.glob(f"{output_path.stem}_*.json")
    else:
        candidates = output_path.rglob("*.json*") if output_path.is_dir() else []
    return sorted(p for p in candidates if p.stat().st_mtime >= since - 1)


__all__ = ["add_arguments", "run"]
