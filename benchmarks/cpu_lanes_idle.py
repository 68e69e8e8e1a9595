"""Does a pause between forwards slow the CPU experts' lanes? (issue 13: the 2-thread rows of
llama_cpp_forward.json where `auto` ran 2x-3x slower than on its own.)

One forward of the mid-size random model (benchmarks/forward.py's), 2 threads, batch 1, with no pause and with
a pause of --pause-ms before each forward:
- `auto`: the default, whose kernel runs its lanes on torch's OpenMP team (one parallel region a projection);
- `python workers`: the lanes as they ran before that, each on a single-threaded Python worker that blocks on a
  futex between layers (what `auto` still runs where the kernel finds no OpenMP runtime), with LANE_MIN_WORK
  lowered so that they run two lanes at every size measured here;
- grouped_mm: torch's OpenMP team inside each product.
The pauses run in turn, several rounds, so that a slow state that outlasts a pause shows in its own column.

    python benchmarks/cpu_lanes_idle.py --out /tmp/cpu_lanes_idle.json

Prints a table (median ms) and writes JSON (machine, versions, git commit, shapes, every sample) to --out.
"""

import argparse
import os
import platform
import statistics
import time

import torch
import transformers

import llada_moe_hf.cpu_moe_llada_moe as cpu_moe
from cpu_experts import model_shape
from forward import build_models
from provenance import git_state, write_json


IMPLEMENTATIONS = ("auto", "python workers", "grouped_mm")


def timed(model, ids, pause_s):
    time.sleep(pause_s)
    start = time.perf_counter()
    model(ids)
    return time.perf_counter() - start


def measure(dtype, tokens, implementation, pauses, rounds, reps):
    torch.manual_seed(0)
    dims = model_shape("mid")
    model, _ = build_models(dims, "cpu", dtype)
    ids = torch.randint(3, dims["vocab"], (1, tokens))
    lane_min_work = cpu_moe.LANE_MIN_WORK
    kernel = cpu_moe.load_kernel()
    on_team = kernel is not None and kernel.parallel
    if implementation == "python workers":
        if kernel is not None:
            kernel.parallel = False
        cpu_moe.LANE_MIN_WORK = 1 << 20
    model.set_experts_implementation("grouped_mm" if implementation == "grouped_mm" else "auto")
    samples = {pause: [] for pause in pauses}
    try:
        with torch.no_grad():
            model(ids)  # warm-up: the lanes' workers, buffers
            for _ in range(rounds):
                for pause in pauses:
                    samples[pause] += [timed(model, ids, pause / 1e3) for _ in range(reps)]
    finally:
        cpu_moe.LANE_MIN_WORK = lane_min_work
        if kernel is not None:
            kernel.parallel = on_team
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pause-ms", type=float, default=20.0)
    parser.add_argument("--tokens", nargs="+", type=int, default=[32, 96])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--out", help="JSON file for the results (none if unset)")
    args = parser.parse_args(argv)
    if min(args.tokens) < 1 or args.rounds < 1 or args.reps < 1 or args.pause_ms <= 0:
        parser.error("--tokens, --rounds and --reps must be at least 1 and --pause-ms above 0")
    torch.set_num_threads(2)
    pauses = (0.0, args.pause_ms)
    rows = []
    print(f"one forward, mid shape, 2 threads: median ms with no pause / with {args.pause_ms:g} ms before each")
    print(f"{'dtype':<9} {'tok':>4} {'implementation':<14} | {'no pause':>8} {'pause':>8} | {'ratio':>5}")
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in args.tokens:
            for implementation in IMPLEMENTATIONS:
                samples = measure(dtype, tokens, implementation, pauses, args.rounds, args.reps)
                ms = {str(pause): 1e3 * statistics.median(s) for pause, s in samples.items()}
                row = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "implementation": implementation,
                       "median_ms": ms, "pause_over_no_pause": ms[str(pauses[1])] / ms[str(pauses[0])],
                       "samples_ms": {str(p): [round(1e3 * x, 2) for x in s] for p, s in samples.items()}}  # fmt: skip
                rows.append(row)
                print(f"{row['dtype']:<9} {tokens:>4} {implementation:<14} | {ms[str(pauses[0])]:>8.1f} "
                      f"{ms[str(pauses[1])]:>8.1f} | {row['pause_over_no_pause']:>5.2f}", flush=True)  # fmt: skip
    report = {
        "benchmark": "cpu_lanes_idle",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},  # fmt: skip
        "git": git_state(),
        "threads": 2,
        "kernel": repr(cpu_moe.load_kernel()),
        "pause_ms": args.pause_ms,
        "rounds": args.rounds,
        "reps": args.reps,
        "shape": model_shape("mid"),
        "rows": rows,
    }
    write_json(report, args.out)


if __name__ == "__main__":
    main()
