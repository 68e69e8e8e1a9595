# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""lm-evaluation-harness on the embedded tiny model: the local tasks of examples/eval_tasks under several
sampler and Monte-Carlo settings, one `lm_eval.simple_evaluate` each, in one process.

    python benchmarks/eval_tiny.py --out /tmp/eval_tiny.json                # all 200 documents per task
    python benchmarks/eval_tiny.py --out /tmp/eval_tiny.json --limit 20    # a quick look

Prints a markdown table (task, setting, metric, value, stderr, documents, seconds) and writes JSON with the
machine, versions, git commit, settings and lm-eval's results for every row. Needs the eval extra.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from provenance import git_state


REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "examples" / "eval_tasks"
GEN_TASK, MC_TASK = "llada_moe_tiny_digits", "llada_moe_tiny_digits_mc"

# (task, setting, model arguments, generation kwargs, batch size, chat template). The generation rows use the
# tiny model's generation_config (16 new tokens in blocks of 8); the likelihood rows skip the greedy check (the
# multiple-choice metric does not use it). The rows without the chat template show what a missing
# --apply-chat-template does to a chat-tuned model.
SETTINGS = [
    (GEN_TASK, "exact sampler (1 token/step)", "", None, 32, True),
    (GEN_TASK, "threshold 0.9 + dual cache", "", "threshold=0.9,cache_mode=dual", 32, True),
    (GEN_TASK, "exact sampler, no chat template", "", None, 32, False),
    (MC_TASK, "mc_num=1", "mc_num=1,check_greedy=False", None, 1, True),
    (MC_TASK, "mc_num=8", "mc_num=8,check_greedy=False", None, 8, True),
    (MC_TASK, "mc_num=32", "mc_num=32,check_greedy=False", None, 32, True),
    (MC_TASK, "mc_num=8, cfg=0.5", "mc_num=8,cfg=0.5,check_greedy=False", None, 8, True),
    (MC_TASK, "mc_num=8, no chat template", "mc_num=8,check_greedy=False", None, 8, False),
]
METRICS = {GEN_TASK: "exact_match", MC_TASK: "acc"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write (written to a temporary name first)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all 200)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    import llada_moe_hf
    import llada_moe_hf.evaluation  # noqa: F401  (registers "llada_moe")

    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    rows = []
    for task, setting, model_args, gen_kwargs, batch_size, chat in SETTINGS:
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model="llada_moe",
            model_args=",".join(a for a in ("pretrained=tiny,device=cpu", f"seed={args.seed}", model_args) if a),
            tasks=[task],
            task_manager=task_manager,
            limit=args.limit,
            batch_size=batch_size,
            apply_chat_template=chat,
            gen_kwargs=gen_kwargs,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
        seconds = time.perf_counter() - start
        metric = METRICS[task]
        result = results["results"][task]
        rows.append(
            {
                "task": task,
                "setting": setting,
                "model_args": model_args,
                "gen_kwargs": gen_kwargs,
                "batch_size": batch_size,
                "apply_chat_template": chat,
                "metric": metric,
                "value": float(result[f"{metric},none"]),
                "stderr": float(result[f"{metric}_stderr,none"]),
                "documents": int(results["n-samples"][task]["effective"]),
                "seconds": seconds,
            }
        )
        print(f"{task} / {setting}: {rows[-1]['value']:.3f} in {seconds:.1f} s", file=sys.stderr, flush=True)

    print("| task | setting | metric | value | stderr | documents | seconds |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['task']} | {r['setting']} | {r['metric']} | {r['value']:.3f} | {r['stderr']:.3f} | "
            f"{r['documents']} | {r['seconds']:.0f} |"
        )
    report = {
        "benchmark": "eval_tiny",
        "command": "python benchmarks/eval_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git": git_state(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lm_eval": getattr(lm_eval, "__version__", None),
            "llada_moe_hf": llada_moe_hf.__version__,
        },
        "model": "embedded tiny model (llada_moe_hf/assets/tiny), float32, CPU",
        "limit": args.limit,
        "seed": args.seed,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
