"""The CPU experts kernel (llada_moe_hf/cpu_kernel_llada_moe.py) against torch's product, per rows an expert
(issue 13): what sets `cpu_moe`'s KERNEL_MAX_ROWS.

For each row count m and dtype, one MoE layer's expert products of the mid model (56 experts: gate_up [512, 512]
and down [512, 256], the experts its first layer touches at 96 tokens), each expert's out = rows @ weight.T,
timed as torch.mm (MKL in float32, oneDNN in bfloat16: what grouped_mm and cpu_moe without the kernel call) and as
the kernel, in turn, caches flushed before each repetition (as a forward finds the weights: the other layers'
evicted them), one thread. bfloat16 only where the kernel has it (AVX512_BF16). Prints a table (median ms and
the speed-up over torch) and writes JSON with --out.

    python benchmarks/cpu_rows_kernel.py --out /tmp/cpu_rows_kernel.json
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from llada_moe_hf import cpu_kernel_llada_moe as kernel_lib
from provenance import git_state, write_json


def time_products(product, x, a, gate_up, down, out_gu, out_dn, flush) -> float:
    flush.fill_(1.0)
    start = time.perf_counter()
    for e in range(gate_up.shape[0]):
        product(x, gate_up[e], out_gu)
        product(a, down[e], out_dn)
    return time.perf_counter() - start


def measure(kernel, dtype, rows_list, experts, reps, flush) -> list[dict]:
    hidden, width = 512, 256
    gate_up = torch.randn(experts, 2 * width, hidden).to(dtype)
    down = torch.randn(experts, hidden, width).to(dtype)
    products = {
        "torch": lambda x, w, out: torch.mm(x, w.t(), out=out),
        "kernel": lambda x, w, out: kernel_lib.rows_linear(kernel, x, w, out),
    }
    results = []
    for m in rows_list:
        x, a = torch.randn(m, hidden).to(dtype), torch.randn(m, width).to(dtype)
        out_gu, out_dn = torch.empty(m, 2 * width, dtype=dtype), torch.empty(m, hidden, dtype=dtype)
        products["kernel"](x, gate_up[1], out_gu)  # the kernel gives torch's numbers (to rounding)
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
        torch.testing.assert_close(out_gu, x @ gate_up[1].t(), **tol)
        times = {name: [] for name in products}
        for _ in range(reps):
            for name, product in products.items():
                times[name].append(time_products(product, x, a, gate_up, down, out_gu, out_dn, flush))
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        macs = experts * m * (gate_up[0].numel() + down[0].numel())
        results.append({
            "dtype": str(dtype).removeprefix("torch."), "rows": m, "median_ms": ms,
            "speedup_vs_torch": ms["torch"] / ms["kernel"],
            "gmac_per_s": {n: macs / (t / 1e3) / 1e9 for n, t in ms.items()},
        })  # fmt: skip
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 14, 24, 32, 48, 64, 96, 128, 256, 512, 1024])
    parser.add_argument("--experts", type=int, default=56)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if any(r < 1 for r in args.rows) or args.experts < 1 or args.reps < 1:
        parser.error("--rows, --experts and --reps must be positive")
    compiler = kernel_lib._compiler()
    if compiler is None:
        sys.exit("no C++ compiler here (c++, g++, clang++ or $CXX): the CPU experts kernel cannot be built")
    with tempfile.TemporaryDirectory() as cache:  # a build from nothing, timed (load() would reuse the cache)
        os.environ[kernel_lib.ENV_CACHE] = cache
        start = time.perf_counter()
        kernel = kernel_lib.build_and_bind(compiler)
        build_s = time.perf_counter() - start
    print(f"kernel built in {build_s:.2f} s with {' '.join(compiler)} {' '.join(kernel.flags)} "
          f"(AVX-512: {kernel.wide_vectors})")  # fmt: skip

    torch.set_num_threads(1)
    torch.manual_seed(0)
    flush = torch.empty(64 << 20)  # 256 MiB: more than the L3 cache
    results = []
    for dtype in kernel.dtypes:
        results += measure(kernel, dtype, args.rows, args.experts, args.reps, flush)

    print(f"{args.experts} experts' gate_up [512, 512] + down [512, 256], 1 thread, caches flushed:")
    print("median ms; speed-up = torch ms / kernel ms")
    print(f"{'dtype':<9} {'rows':>4} | {'torch':>7} | {'kernel':>7} | {'speed-up':>8}")
    for row in results:
        ms = row["median_ms"]
        print(f"{row['dtype']:<9} {row['rows']:>4} | {ms['torch']:7.2f} | {ms['kernel']:7.2f} | "
              f"{row['speedup_vs_torch']:7.2f}x")  # fmt: skip
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    report = {
        "benchmark": "cpu_rows_kernel",
        "command": "python benchmarks/cpu_rows_kernel.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in cpuinfo, "load_average": os.getloadavg(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "git": git_state(),
        "kernel": {"library": os.path.basename(kernel.path), "flags": kernel.flags, "wide_vectors": kernel.wide_vectors,
                   "dtypes": [str(d).removeprefix("torch.") for d in kernel.dtypes], "build_s": build_s,
                   "compiler": subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
                   .splitlines()[0]},
        "threads": 1, "experts": args.experts, "shapes": {"gate_up": [512, 512], "down": [512, 256]},
        "reps": args.reps, "statistic": "median wall time; torch and the kernel in turn, caches flushed",
        "results": results,
    }  # fmt: skip
    write_json(report, args.out)


if __name__ == "__main__":
    main()
