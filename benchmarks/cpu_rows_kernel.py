"""A lead for issue 13, not a path the package runs: how fast can a hand-written few-row float32 kernel run one
MoE layer's expert products on this CPU, against the BLAS (MKL) call `cpu_moe` makes per expert?

The CPU experts spend most of a forward in products of a few rows against one expert's weights (the mid model's
first layer: 56 experts of about 14 rows at 96 tokens). MKL runs such a product far below both the core's FMA
speed and its memory bandwidth. This script builds (with torch.utils.cpp_extension, at run time: it needs a C++
compiler, ninja and an AVX-512 CPU) a small kernel, out[m, N] = rows[m, K] @ weight[N, K]^T, in two tilings:

- one_row: one weight row at a time against up to 8 rows of input (the weights read as one sequential stream);
- four_rows: four weight rows at a time against up to 4 rows of input (four streams, fewer input reloads);

and times, per row count m, the gate_up ([512, 512]) and down ([512, 256]) products of 56 experts (the mid model's
first layer), caches flushed before each repetition (as a forward finds them: the other layers' weights evicted
these), one thread. Prints a table (ms and GMAC/s) and writes JSON with --out.

    python benchmarks/cpu_rows_kernel.py --out /tmp/cpu_rows_kernel.json
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from provenance import git_state, write_json


SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>

// acc[i][j] = rows[i] . weight[j] over K, 16 floats at a time (a masked tail); MR x NR outputs per call.
template <int MR, int NR>
static inline void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, float* out,
                        int64_t ldo) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {  // the last K % 16 columns, masked
    const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int NR, int MR>
static void rows_block(const float* x, int64_t m, int64_t ldx, const float* w, int64_t ldw, int64_t K,
                       float* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) tile<MR, NR>(x + i * ldx, ldx, w, ldw, K, out + i * ldo, ldo);
  for (; i + 4 <= m; i += 4) tile<4, NR>(x + i * ldx, ldx, w, ldw, K, out + i * ldo, ldo);
  for (; i < m; ++i) tile<1, NR>(x + i * ldx, ldx, w, ldw, K, out + i * ldo, ldo);
}

template <int NR, int MR>
static void linear(torch::Tensor x, torch::Tensor w, torch::Tensor out) {
  TORCH_CHECK(x.dtype() == torch::kFloat && w.dtype() == torch::kFloat && out.dtype() == torch::kFloat);
  TORCH_CHECK(x.stride(1) == 1 && w.stride(1) == 1 && out.stride(1) == 1 && x.size(1) == w.size(1));
  const int64_t m = x.size(0), K = x.size(1), N = w.size(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t n = 0;
  for (; n + NR <= N; n += NR) rows_block<NR, MR>(xp, m, x.stride(0), wp + n * w.stride(0), w.stride(0), K, op + n, out.stride(0));
  for (; n < N; ++n) rows_block<1, MR>(xp, m, x.stride(0), wp + n * w.stride(0), w.stride(0), K, op + n, out.stride(0));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("one_row", &linear<1, 8>);
  m.def("four_rows", &linear<4, 4>);
}
"""


def build():
    from torch.utils.cpp_extension import load_inline

    directory = tempfile.mkdtemp(prefix="cpu_rows_kernel-")
    return load_inline("cpu_rows_kernel", SOURCE, extra_cflags=["-O3", "-mavx512f", "-mfma"], build_directory=directory)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 14, 24, 48, 96])
    parser.add_argument("--experts", type=int, default=56)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if any(r < 1 for r in args.rows) or args.experts < 1 or args.reps < 1:
        parser.error("--rows, --experts and --reps must be positive")
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512f" not in cpuinfo:
        sys.exit("this lead needs an x86_64 CPU with AVX-512 (no avx512f in /proc/cpuinfo here)")
    try:
        ext = build()
    except Exception as error:  # no compiler, no ninja: say so and stop
        sys.exit(f"could not build the kernel ({type(error).__name__}: {str(error)[:300]}); it needs a C++ compiler "
                 "and ninja (pip install ninja)")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    experts, hidden, width = args.experts, 512, 256
    gate_up = torch.randn(experts, 2 * width, hidden)
    down = torch.randn(experts, hidden, width)
    flush = torch.empty(64 << 20)  # 256 MiB: more than the L3 cache
    weight_bytes = (gate_up.numel() + down.numel()) * 4

    def mkl(x, w, out):
        torch.mm(x, w.t(), out=out)

    kernels = {"mkl": mkl, "one_row": ext.one_row, "four_rows": ext.four_rows}
    results = []
    for m in args.rows:
        x, a = torch.randn(m, hidden), torch.randn(m, width)
        out_gu, out_dn = torch.empty(m, 2 * width), torch.empty(m, hidden)
        for name, kernel in kernels.items():  # every kernel gives the BLAS's numbers
            kernel(x, gate_up[1], out_gu)
            torch.testing.assert_close(out_gu, x @ gate_up[1].t(), rtol=1e-4, atol=1e-3)
        times = {name: [] for name in kernels}
        for _ in range(args.reps):
            for name, kernel in kernels.items():
                flush.fill_(1.0)
                start = time.perf_counter()
                for e in range(experts):
                    kernel(x, gate_up[e], out_gu)
                    kernel(a, down[e], out_dn)
                times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        macs = experts * m * (gate_up[0].numel() + down[0].numel())
        results.append({
            "rows": m, "median_ms": ms, "gmac_per_s": {n: macs / (t / 1e3) / 1e9 for n, t in ms.items()},
            "weights_gb_per_s": {n: weight_bytes / (t / 1e3) / 1e9 for n, t in ms.items()},
        })  # fmt: skip

    print(f"{experts} experts' gate_up [512, 512] + down [512, 256], float32, 1 thread,")
    print("caches flushed: median ms (speed-up over mkl)")
    print(f"{'rows':>4} | {'mkl':>7} | {'one_row':>15} | {'four_rows':>15}")
    for row in results:
        ms = row["median_ms"]
        print(f"{row['rows']:>4} | {ms['mkl']:7.2f} | " + " | ".join(
            f"{ms[n]:7.2f} ({ms['mkl'] / ms[n]:4.2f}x)" for n in ("one_row", "four_rows")))
    report = {
        "benchmark": "cpu_rows_kernel",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "git": git_state(),
        "dtype": "float32", "threads": 1, "experts": experts, "shapes": {"gate_up": [512, 512], "down": [512, 256]},
        "reps": args.reps, "results": results,
    }  # fmt: skip
    write_json(report, args.out)


if __name__ == "__main__":
    main()
