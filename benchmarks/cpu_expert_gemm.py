"""Where the CPU experts lose their time (issue 13): one MoE projection of the mid-size model, timed several ways.

The experts are most of a CPU forward, and at decode sizes each expert's GEMM has few rows (96 tokens x top-8 over
64 experts: about 12). This times the gate_up projection of one layer (64 experts of [2I, H] = [512, 512], float32)
on the rows routed to each expert:

- grouped_mm: `torch._grouped_mm`, what transformers' grouped_mm experts run in eager mode;
- loop: one `F.linear` per expert (the per-expert GEMMs, as the eager experts and grouped_mm's fallback do);
- loop, weights read first: the same, each expert's weights read once (a sum) just before its GEMM, so that the
  GEMM finds them in the cache instead of in DRAM;
- loop, W @ rows^T: the per-expert product the other way round (weights as the left operand);
- stream: one read of all 64 experts' weights (the memory floor of the projection);
- dense: one GEMM of all the rows against one expert's weights (the BLAS's speed on a large GEMM).

GFLOP/s are 2 x rows x H x 2I over the time. Interleaved, median of --reps runs.

    python benchmarks/cpu_expert_gemm.py --out /tmp/cpu_expert_gemm.json
"""

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

from provenance import git_state, write_json


def candidates(weights, rows, counts):
    """name -> function that computes the projection of `rows` (sorted by expert, `counts` per expert)."""
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)

    def grouped_mm():
        return torch._grouped_mm(rows, weights.transpose(-2, -1), offs=offsets)

    def loop(touch=False):
        start = 0
        for expert, count in enumerate(counts):
            if count:
                if touch:
                    weights[expert].sum()
                F.linear(rows[start : start + count], weights[expert])
                start += count

    def loop_weights_left():
        start = 0
        for expert, count in enumerate(counts):
            if count:
                torch.mm(weights[expert], rows[start : start + count].t())
                start += count

    def stream():
        return weights.sum()

    def dense():
        return F.linear(rows, weights[0])

    return {
        "grouped_mm": grouped_mm,
        "loop": loop,
        "loop, weights read first": lambda: loop(touch=True),
        "loop, W @ rows^T": loop_weights_left,
        "stream": stream,
        "dense": dense,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 96, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=None, help="JSON file for the results (none if unset)")
    args = parser.parse_args(argv)

    experts, hidden, width, top_k = 64, 512, 256, 8
    torch.manual_seed(0)
    weights = torch.randn(experts, 2 * width, hidden)
    load_before = os.getloadavg()
    rows_out = []
    for tokens in args.tokens:
        ids = torch.randint(0, experts, (tokens * top_k,))
        counts = torch.bincount(ids, minlength=experts).tolist()
        rows = torch.randn(tokens * top_k, hidden)
        flops = 2 * rows.shape[0] * hidden * 2 * width
        for threads in args.threads:
            torch.set_num_threads(threads)
            functions = candidates(weights, rows, counts)
            times = {name: [] for name in functions}
            for function in functions.values():
                function()
            for _ in range(args.reps):
                for name, function in functions.items():
                    start = time.perf_counter()
                    function()
                    times[name].append(time.perf_counter() - start)
            ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
            rows_out.append({
                "tokens": tokens, "rows": rows.shape[0], "threads": threads, "median_ms": ms,
                "gflops": {name: flops / (ms[name] / 1000) / 1e9 for name in ms if name != "stream"},
                "stream_gb_per_s": weights.numel() * weights.element_size() / (ms["stream"] / 1000) / 1e9,
            })  # fmt: skip

    names = list(rows_out[0]["median_ms"])
    print("gate_up of one mid-size MoE layer (64 experts x [512, 512], float32): ms (GFLOP/s)")
    print(f"{'tokens':>6} {'thr':>3} | " + " | ".join(f"{n:>24}" for n in names))
    for row in rows_out:
        cells = []
        for name in names:
            rate = row["gflops"].get(name)
            cell = f"{row['median_ms'][name]:.2f} ms" + (f" ({rate:.0f})" if rate else f" ({row['stream_gb_per_s']:.0f} GB/s)")
            cells.append(f"{cell:>24}")
        print(f"{row['tokens']:>6} {row['threads']:>3} | " + " | ".join(cells))

    result = {
        "benchmark": "cpu_expert_gemm",
        "command": "python benchmarks/cpu_expert_gemm.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "git": git_state(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "shapes": {"experts": experts, "hidden": hidden, "expert_width": width, "top_k": top_k,
                   "weights": [experts, 2 * width, hidden]},
        "dtype": "float32",
        "reps": args.reps,
        "rows": rows_out,
    }  # fmt: skip
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
