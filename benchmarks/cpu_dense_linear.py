"""The dense projections (attention q/k/v/o, lm_head) on the CPU: torch's F.linear against the CPU kernel
(llada_moe_hf/cpu_kernel_llada_moe.py, the weight's rows split over torch's threads), per rows (issue 13):
what sets `cpu_moe`'s DENSE_KERNEL_MAX_ROWS.

Weights of the mid model ([512, 512] attention, [4096, 512] lm_head) and of the release's attention
([2048, 2048]); 1 and 2 threads; float32, and bfloat16 where the kernel has it. The two products in turn,
median of --reps. Prints a table and writes JSON with --out.

    python benchmarks/cpu_dense_linear.py --out /tmp/cpu_dense_linear.json
"""

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from llada_moe_hf import cpu_kernel_llada_moe as kernel_lib
from provenance import git_state, write_json


SHAPES = [(512, 512), (4096, 512), (2048, 2048)]  # (out, in)


def median_us(function, reps):
    for _ in range(5):
        function()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16, 32, 96, 256, 512])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--out", help="JSON file for the results (none if unset)")
    args = parser.parse_args(argv)
    if min(args.rows) < 1 or args.reps < 1:
        parser.error("--rows and --reps must be at least 1")
    kernel = kernel_lib.load()
    if kernel is None:
        parser.exit(1, "the CPU kernel is not built here (no C++ compiler, or LLADA_MOE_CPU_KERNEL=0)\n")
    results = []
    print(f"{'thr':>3} {'dtype':<8} {'rows':>4} {'weight':>11} | {'torch us':>9} {'kernel us':>9} | {'kernel':>6}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in [d for d in (torch.float32, torch.bfloat16) if d in kernel.dtypes]:
            for rows in args.rows:
                for n, k in SHAPES:
                    x, w = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
                    out = torch.empty(rows, n, dtype=dtype)
                    kernel_lib.rows_linear(kernel, x, w, out, threads)
                    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
                    torch.testing.assert_close(out, F.linear(x, w), **tol)
                    us = {"torch": median_us(lambda: F.linear(x, w), args.reps),
                          "kernel": median_us(lambda: kernel_lib.rows_linear(kernel, x, w, out, threads), args.reps)}
                    row = {"threads": threads, "dtype": str(dtype).removeprefix("torch."), "rows": rows,
                           "weight": [n, k], "median_us": us, "kernel_speedup": us["torch"] / us["kernel"]}
                    results.append(row)
                    print(f"{threads:>3} {row['dtype']:<8} {rows:>4} {f'{n}x{k}':>11} | {us['torch']:>9.1f} "
                          f"{us['kernel']:>9.1f} | {row['kernel_speedup']:>5.2f}x", flush=True)
    report = {
        "benchmark": "cpu_dense_linear",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git": git_state(),
        "kernel": repr(kernel),
        "reps": args.reps,
        "results": results,
    }
    write_json(report, args.out)


if __name__ == "__main__":
    main()
