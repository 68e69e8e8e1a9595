# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""A product kernel for the CPU experts (float32; bfloat16 where the CPU has AVX512_BF16), built on the user's
machine at first use.

`rows_linear(x, weight, out)` computes out = x @ weight.T for the few to few hundred rows an expert gets in a
forward.
MKL runs such a product far below the core's speed: before each call it repacks the whole weight (an expert's
weight is read twice and written once for a dozen rows of work). This kernel reads the weight where it lies, once:

- up to DOT_MAX_ROWS rows: each weight row streamed against every input row (dot products, summed across the
  vector at the end): a memory-bound product at the speed of the weight stream;
- more rows: the input transposed into a small buffer whose columns are the rows (padded to the vector width), and
  each weight element broadcast against a whole column of rows (outer products): no packing, no sums across the
  vector, and every multiply-add on a full vector but for the padding.

It is plain C++ with GCC/Clang vector types, so one source runs on AVX-512, AVX2 or NEON as the compiler chooses
(`-march=native`; the bfloat16 part uses AVX512_BF16 intrinsics, compiled only where the target has them), no
torch headers (a second to build), called through ctypes (which releases the GIL: the
`cpu_moe` lanes run it on several threads at once). The shared library is cached by a hash of the source, the
compiler and the CPU's flags, and written to a temporary name then moved in, so that processes building at once or
a build cut off never leave a broken library. Without a compiler, or with LLADA_MOE_CPU_KERNEL=0, `load()` returns
None and `cpu_moe` uses MKL (benchmarks/cpu_experts.py; README, "CPU experts").
"""

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time

import torch


logger = logging.getLogger(__name__)

ENV_SWITCH = "LLADA_MOE_CPU_KERNEL"
ENV_CACHE = "LLADA_MOE_KERNEL_CACHE"
# Rows up to which the dot-product form is used: at 4 rows it read the weights about 2x faster than the outer
# form, which would fill 4 of its 16 lanes (measured while building it; benchmarks/cpu_rows_kernel.py times the result).
DOT_MAX_ROWS = 4

SOURCE = r"""
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// 16 floats: one AVX-512 register, two AVX2 or four NEON ones; the compiler splits as the target needs.
typedef float vec __attribute__((vector_size(64)));
typedef float uvec __attribute__((vector_size(64), aligned(4)));  // an unaligned load or store
constexpr int64_t W = 16;

static inline float lanes_sum(vec v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// out[i, n] = x[i, :] . w[n, :] for i < m <= 4 (MR = m): each weight row streamed once against the m rows.
template <int MR>
static void dot_rows(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t n_rows, int64_t k_len,
                     float* out, int64_t ldo) {
  const int64_t k_vec = k_len - k_len % W;
  for (int64_t n = 0; n < n_rows; ++n) {
    const float* wn = w + n * ldw;
    vec acc[MR] = {};
    for (int64_t k = 0; k < k_vec; k += W) {
      const vec wv = *(const uvec*)(wn + k);
      __builtin_prefetch(wn + 4 * ldw + k);  // a few weight rows ahead: the stream comes from DRAM
      for (int i = 0; i < MR; ++i) acc[i] += wv * *(const uvec*)(x + i * ldx + k);
    }
    for (int i = 0; i < MR; ++i) {
      float s = lanes_sum(acc[i]);
      for (int64_t k = k_vec; k < k_len; ++k) s += wn[k] * x[i * ldx + k];
      out[i * ldo + n] = s;
    }
  }
}

// Outer products: xt holds the rows as columns (k_len x MV*W, zero-padded); NR weight rows at a time, each
// element broadcast against MV vectors of rows. Writes out[i, n] for i < m.
template <int NR, int MV>
static void outer_block(const float* xt, int64_t m, const float* w, int64_t ldw, int64_t n0, int64_t k_len,
                        float* out, int64_t ldo) {
  vec acc[NR][MV] = {};
  const float* wn = w + n0 * ldw;
  for (int64_t k = 0; k < k_len; ++k) {
    const vec* xk = (const vec*)(xt + k * MV * W);
    if (k % W == 0)  // the next block's weights, a line per row: DRAM latency hidden behind this block's work
      for (int j = 0; j < NR; ++j) __builtin_prefetch(wn + (NR + j) * ldw + k);
    for (int j = 0; j < NR; ++j) {
      const float s = wn[j * ldw + k];
      for (int v = 0; v < MV; ++v) acc[j][v] += s * xk[v];
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v)
      for (int i = 0; i < W && v * W + i < m; ++i) out[(v * W + i) * ldo + n0 + j] = acc[j][v][i];
}

// A buffer per thread for the transposed rows, grown as needed (the lanes call from several threads) and freed
// when its thread ends.
struct Scratch {
  float* buffer = nullptr;
  int64_t size = 0;
  ~Scratch() { std::free(buffer); }
};

static float* scratch(int64_t floats) {
  static thread_local Scratch held;
  if (floats < 1) floats = 1;
  if (floats > held.size) {
    std::free(held.buffer);
    held.size = (floats + 4095) & ~int64_t(4095);
    held.buffer = (float*)std::aligned_alloc(64, held.size * sizeof(float));
    if (!held.buffer) held.size = 0;
  }
  return held.buffer;
}

// Rows per outer-product pass: 2 vectors of rows. The pass streams its transposed rows (k_len x CHUNK floats)
// once for every few weight rows; at 2 vectors that stream stays near the core (64 KB for k_len 512), and the
// float32 products ran at about 170 GFLOP/s with hot weights from 16 to 256 rows here, where 4 vectors (128 KB
// from L2) fell to 100 from 48 rows (an ad-hoc run; benchmarks/results/cpu_rows_kernel.json has the
// committed products, caches flushed).
constexpr int64_t CHUNK = 2 * W;

// Register tiles (weight rows x vectors of input rows) of the outer form for 1 and 2 vectors of rows. With
// AVX-512 (32 registers of 16 floats) 8 or 16 accumulators; elsewhere a vector of 16 floats takes 2 (AVX2) or 4
// (NEON) registers, and 16 or 32 of them hold at most 8 accumulators without spilling to the stack.
#if defined(__AVX512F__)
#define LLADA_TILES(span, ...)                                    \
  switch ((rows + W - 1) / W) {                                   \
    case 1: span<8, 1>(__VA_ARGS__); break;                       \
    default: span<8, 2>(__VA_ARGS__); break;                      \
  }
extern "C" int llada_wide_vectors() { return 1; }
#else
#define LLADA_TILES(span, ...)                                    \
  switch ((rows + W - 1) / W) {                                   \
    case 1: span<4, 1>(__VA_ARGS__); break;                       \
    default: span<2, 2>(__VA_ARGS__); break;                      \
  }
extern "C" int llada_wide_vectors() { return 0; }
#endif
static_assert(CHUNK == 2 * W, "LLADA_TILES has tiles for 1 and 2 vectors of rows");

constexpr int64_t SUPER = 48;     // weight rows per super-block: reused from L1/L2 by every chunk of rows

template <int NR, int MV>
static void outer_span(const float* xt, int64_t m, const float* w, int64_t ldw, int64_t n0, int64_t n1,
                       int64_t k_len, float* out, int64_t ldo) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) outer_block<NR, MV>(xt, m, w, ldw, n, k_len, out, ldo);
  for (; n < n1; ++n) outer_block<1, MV>(xt, m, w, ldw, n, k_len, out, ldo);
}

// out[i, n] = x[i, :] . w[n, :] for i < m, n < n_rows.
static int linear_rows(const float* x, int64_t m, int64_t ldx, const float* w, int64_t ldw, int64_t n_rows,
                       int64_t k_len, float* out, int64_t ldo, int64_t dot_max_rows) {
  if (m <= 0) return 0;
  if (k_len <= 0) {  // an empty sum
    for (int64_t i = 0; i < m; ++i) std::memset(out + i * ldo, 0, n_rows * sizeof(float));
    return 0;
  }
  if (m <= dot_max_rows && m <= 4) {
    switch (m) {
      case 1: dot_rows<1>(x, ldx, w, ldw, n_rows, k_len, out, ldo); return 0;
      case 2: dot_rows<2>(x, ldx, w, ldw, n_rows, k_len, out, ldo); return 0;
      case 3: dot_rows<3>(x, ldx, w, ldw, n_rows, k_len, out, ldo); return 0;
      default: dot_rows<4>(x, ldx, w, ldw, n_rows, k_len, out, ldo); return 0;
    }
  }
  // The rows as columns, a chunk of CHUNK rows after another (the last padded to whole vectors with zeros).
  const int64_t chunks = (m + CHUNK - 1) / CHUNK;
  float* xt = scratch(chunks * k_len * CHUNK);
  if (!xt) return 1;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t i0 = c * CHUNK, rows = m - i0 < CHUNK ? m - i0 : CHUNK, width = (rows + W - 1) / W * W;
    float* xc = xt + c * k_len * CHUNK;
    if (rows < width) std::memset(xc, 0, k_len * width * sizeof(float));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t k = 0; k < k_len; ++k) xc[k * width + i] = x[(i0 + i) * ldx + k];
  }
  for (int64_t n0 = 0; n0 < n_rows; n0 += SUPER) {
    const int64_t n1 = n0 + SUPER < n_rows ? n0 + SUPER : n_rows;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t i0 = c * CHUNK, rows = m - i0 < CHUNK ? m - i0 : CHUNK;
      const float* xc = xt + c * k_len * CHUNK;
      float* oc = out + i0 * ldo;
      LLADA_TILES(outer_span, xc, rows, w, ldw, n0, n1, k_len, oc, ldo)
    }
  }
  return 0;
}

extern "C" int llada_rows_linear(const float* x, int64_t m, int64_t ldx, const float* w, int64_t ldw,
                                 int64_t n_rows, int64_t k_len, float* out, int64_t ldo, int64_t dot_max_rows) {
  return linear_rows(x, m, ldx, w, ldw, n_rows, k_len, out, ldo, dot_max_rows);
}

// One projection of a block of experts (a grouped GEMM): the rows sorted by expert, expert e's at
// offsets[e]..offsets[e + 1] - 1; for each expert, its rows within [row_start, row_end), if at most max_rows of
// them (the caller runs busier experts), out[rows] = x[rows] @ w[e].T. One call a lane and projection: no
// Python between the experts.
template <typename T>
struct Grouped {
  const T* x; int64_t ldx; const T* w; int64_t w_expert_stride, ldw, n_rows, k_len; const int64_t* offsets;
  int64_t n_experts, max_rows; T* out; int64_t ldo, dot_max_rows;
};

template <typename T, int (*LINEAR)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, T*, int64_t,
                                    int64_t)>
static int grouped_range(const void* args, int64_t row_start, int64_t row_end) {
  const Grouped<T>& g = *(const Grouped<T>*)args;
  for (int64_t e = 0; e < g.n_experts; ++e) {
    const int64_t lo = g.offsets[e] > row_start ? g.offsets[e] : row_start;
    const int64_t hi = g.offsets[e + 1] < row_end ? g.offsets[e + 1] : row_end;
    if (hi <= lo || hi - lo > g.max_rows) continue;
    const int status = LINEAR(g.x + lo * g.ldx, hi - lo, g.ldx, g.w + e * g.w_expert_stride, g.ldw, g.n_rows,
                              g.k_len, g.out + lo * g.ldo, g.ldo, g.dot_max_rows);
    if (status) return status;
  }
  return 0;
}

// The lanes of a projection (lane i: rows bounds[i]..bounds[i + 1] - 1) on the process's OpenMP team, the one
// torch's own parallel regions use: its threads are still spinning from torch's last region, so a lane starts at
// once (a Python worker woken through a futex on an idle core took milliseconds on a VM). The runtime's entry
// points come from the caller (llada_set_openmp): the kernel links no OpenMP of its own, which would start a
// second team of threads beside torch's. Without them the lanes run one after another. A team of
// min(lanes, threads) threads; lane i runs on thread i modulo the team, recorded in lane_thread (if not null).
typedef void (*parallel_fn)(void (*)(void*), void*, unsigned, unsigned);  // GOMP_parallel (GNU and LLVM)
typedef int (*int_fn)(void);
static parallel_fn omp_parallel = nullptr;
static int_fn omp_thread = nullptr, omp_threads = nullptr;

extern "C" void llada_set_openmp(void* parallel, void* thread_num, void* num_threads) {
  omp_parallel = (parallel_fn)parallel;
  omp_thread = (int_fn)thread_num;
  omp_threads = (int_fn)num_threads;
}

struct Lanes {
  int (*lane)(const void*, int64_t, int64_t);
  const void* args;
  const int64_t* bounds;
  int64_t lanes;
  int64_t* lane_thread;
  std::atomic<int> status;
};

static void run_lanes_on(Lanes* job, int64_t thread, int64_t threads) {
  for (int64_t lane = thread; lane < job->lanes; lane += threads) {
    if (job->lane_thread) job->lane_thread[lane] = thread;
    const int status = job->lane(job->args, job->bounds[lane], job->bounds[lane + 1]);
    if (status) job->status.store(status);
  }
}

static void lanes_region(void* job) { run_lanes_on((Lanes*)job, omp_thread(), omp_threads()); }

static int run_lanes(int (*lane)(const void*, int64_t, int64_t), const void* args, const int64_t* bounds,
                     int64_t lanes, int64_t threads, int64_t* lane_thread) {
  Lanes job{lane, args, bounds, lanes, lane_thread, {0}};
  if (threads > lanes) threads = lanes;
  if (threads > 1 && omp_parallel)
    omp_parallel(lanes_region, &job, (unsigned)threads, 0);
  else
    run_lanes_on(&job, 0, 1);
  return job.status.load();
}

extern "C" int llada_grouped_linear(const float* x, int64_t ldx, const float* w, int64_t w_expert_stride,
                                    int64_t ldw, int64_t n_rows, int64_t k_len, const int64_t* offsets,
                                    int64_t n_experts, int64_t row_start, int64_t row_end, int64_t max_rows,
                                    float* out, int64_t ldo, int64_t dot_max_rows) {
  const Grouped<float> g{x, ldx, w, w_expert_stride, ldw, n_rows, k_len, offsets, n_experts, max_rows, out, ldo,
                         dot_max_rows};
  return grouped_range<float, linear_rows>(&g, row_start, row_end);
}

extern "C" int llada_grouped_linear_lanes(const float* x, int64_t ldx, const float* w, int64_t w_expert_stride,
                                          int64_t ldw, int64_t n_rows, int64_t k_len, const int64_t* offsets,
                                          int64_t n_experts, const int64_t* bounds, int64_t lanes, int64_t threads,
                                          int64_t max_rows, float* out, int64_t ldo, int64_t dot_max_rows,
                                          int64_t* lane_thread) {
  const Grouped<float> g{x, ldx, w, w_expert_stride, ldw, n_rows, k_len, offsets, n_experts, max_rows, out, ldo,
                         dot_max_rows};
  return run_lanes(grouped_range<float, linear_rows>, &g, bounds, lanes, threads, lane_thread);
}

// One product out = x @ w.T with the weight's rows (the output columns) split into parts on the OpenMP team: a
// dense projection (attention, lm_head) of a few rows. Each output element is summed the same way whatever the
// split, so the threads change no number.
template <typename T>
struct Rows {
  const T* x; int64_t m, ldx; const T* w; int64_t ldw, k_len; T* out; int64_t ldo, dot_max_rows;
};

template <typename T, int (*LINEAR)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, T*, int64_t,
                                    int64_t)>
static int rows_range(const void* args, int64_t n0, int64_t n1) {
  const Rows<T>& r = *(const Rows<T>*)args;
  return LINEAR(r.x, r.m, r.ldx, r.w + n0 * r.ldw, r.ldw, n1 - n0, r.k_len, r.out + n0, r.ldo, r.dot_max_rows);
}

constexpr int64_t PART_MIN_ROWS = 64;  // weight rows a part has at least: below, a thread's start costs more

template <typename T>
static int split_rows(int (*part)(const void*, int64_t, int64_t), const Rows<T>& r, int64_t n_rows,
                      int64_t threads) {
  int64_t parts = n_rows / PART_MIN_ROWS < threads ? n_rows / PART_MIN_ROWS : threads;
  if (parts < 1) parts = 1;
  if (parts > 256) parts = 256;
  int64_t bounds[257];
  for (int64_t i = 0; i <= parts; ++i) bounds[i] = i == parts ? n_rows : n_rows * i / parts / W * W;
  return run_lanes(part, &r, bounds, parts, parts, nullptr);
}

extern "C" int llada_rows_linear_parts(const float* x, int64_t m, int64_t ldx, const float* w, int64_t ldw,
                                       int64_t n_rows, int64_t k_len, float* out, int64_t ldo, int64_t dot_max_rows,
                                       int64_t threads) {
  const Rows<float> r{x, m, ldx, w, ldw, k_len, out, ldo, dot_max_rows};
  return split_rows(rows_range<float, linear_rows>, r, n_rows, threads);
}

// ---------------------------------------------------------------------------------------------------- bfloat16
// Only where the compiler targets AVX512_BF16 (Zen 4, Sapphire Rapids and later): vdpbf16ps multiplies pairs of
// bfloat16 and adds them into float32, 32 multiply-adds an instruction. Elsewhere llada_has_bf16() is 0 and the
// bfloat16 experts keep their torch path. The products accumulate in float32 and round to bfloat16 once, as a
// bfloat16 GEMM does.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

extern "C" int llada_has_bf16() { return 1; }

static inline uint16_t to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline uint32_t pair_at(const uint16_t* p, int64_t k, int64_t k_len) {  // (p[k], p[k + 1]), 0 past the end
  uint32_t lo = p[k], hi = k + 1 < k_len ? p[k + 1] : 0;
  return lo | (hi << 16);
}

template <int MR>
static void dot_rows_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t ldw, int64_t n_rows,
                          int64_t k_len, uint16_t* out, int64_t ldo) {
  for (int64_t n = 0; n < n_rows; ++n) {
    const uint16_t* wn = w + n * ldw;
    __m512 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_len; k += 32) {
      const __mmask32 mask = k + 32 <= k_len ? ~__mmask32(0) : (__mmask32)((1u << (k_len - k)) - 1);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wn + k);
      __builtin_prefetch(wn + 4 * ldw + k);  // as dot_rows: 3 and 4 rows ran 3x slower from DRAM without it
      for (int i = 0; i < MR; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * ldx + k));
    }
    for (int i = 0; i < MR; ++i) out[i * ldo + n] = to_bf16(_mm512_reduce_add_ps(acc[i]));
  }
}

// xt: for each pair of k, the rows' (x[i, k], x[i, k + 1]) as 32 bits, MV vectors of W rows.
template <int NR, int MV>
static void outer_block_bf16(const uint32_t* xt, int64_t m, const uint16_t* w, int64_t ldw, int64_t n0,
                             int64_t k_len, uint16_t* out, int64_t ldo) {
  __m512 acc[NR][MV];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_setzero_ps();
  const uint16_t* wn = w + n0 * ldw;
  const int64_t full = k_len / 2;
  for (int64_t p = 0; p < full; ++p) {
    const __m512i* xk = (const __m512i*)(xt + p * MV * W);
    if (p % W == 0)  // a line of each of the next block's rows
      for (int j = 0; j < NR; ++j) __builtin_prefetch(wn + (NR + j) * ldw + 2 * p);
    for (int j = 0; j < NR; ++j) {
      int32_t pair;
      std::memcpy(&pair, wn + j * ldw + 2 * p, 4);
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], b, (__m512bh)xk[v]);
    }
  }
  if (k_len % 2) {  // the last k alone, paired with zeros
    const __m512i* xk = (const __m512i*)(xt + full * MV * W);
    for (int j = 0; j < NR; ++j) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32((int)pair_at(wn + j * ldw, 2 * full, k_len));
      for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], b, (__m512bh)xk[v]);
    }
  }
  alignas(64) float lanes[W];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v) {
      _mm512_store_ps(lanes, acc[j][v]);
      for (int i = 0; i < W && v * W + i < m; ++i) out[(v * W + i) * ldo + n0 + j] = to_bf16(lanes[i]);
    }
}

template <int NR, int MV>
static void outer_span_bf16(const uint32_t* xt, int64_t m, const uint16_t* w, int64_t ldw, int64_t n0, int64_t n1,
                            int64_t k_len, uint16_t* out, int64_t ldo) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) outer_block_bf16<NR, MV>(xt, m, w, ldw, n, k_len, out, ldo);
  for (; n < n1; ++n) outer_block_bf16<1, MV>(xt, m, w, ldw, n, k_len, out, ldo);
}

static int linear_rows_bf16(const uint16_t* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t ldw,
                            int64_t n_rows, int64_t k_len, uint16_t* out, int64_t ldo, int64_t dot_max_rows) {
  if (m <= 0) return 0;
  if (k_len <= 0) {  // an empty sum: +0.0 in bfloat16
    for (int64_t i = 0; i < m; ++i) std::memset(out + i * ldo, 0, n_rows * sizeof(uint16_t));
    return 0;
  }
  if (m <= dot_max_rows && m <= 4) {
    switch (m) {
      case 1: dot_rows_bf16<1>(x, ldx, w, ldw, n_rows, k_len, out, ldo); return 0;
      case 2: dot_rows_bf16<2>(x, ldx, w, ldw, n_rows, k_len, out, ldo); return 0;
      case 3: dot_rows_bf16<3>(x, ldx, w, ldw, n_rows, k_len, out, ldo); return 0;
      default: dot_rows_bf16<4>(x, ldx, w, ldw, n_rows, k_len, out, ldo); return 0;
    }
  }
  const int64_t chunks = (m + CHUNK - 1) / CHUNK, pairs = (k_len + 1) / 2;
  uint32_t* xt = (uint32_t*)scratch(chunks * pairs * CHUNK);  // 32 bits a pair: the float buffer's size
  if (!xt) return 1;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t i0 = c * CHUNK, rows = m - i0 < CHUNK ? m - i0 : CHUNK, width = (rows + W - 1) / W * W;
    uint32_t* xc = xt + c * pairs * CHUNK;
    if (rows < width) std::memset(xc, 0, pairs * width * sizeof(uint32_t));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t p = 0; p < pairs; ++p) xc[p * width + i] = pair_at(x + (i0 + i) * ldx, 2 * p, k_len);
  }
  for (int64_t n0 = 0; n0 < n_rows; n0 += SUPER) {
    const int64_t n1 = n0 + SUPER < n_rows ? n0 + SUPER : n_rows;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t i0 = c * CHUNK, rows = m - i0 < CHUNK ? m - i0 : CHUNK;
      const uint32_t* xc = xt + c * pairs * CHUNK;
      uint16_t* oc = out + i0 * ldo;
      LLADA_TILES(outer_span_bf16, xc, rows, w, ldw, n0, n1, k_len, oc, ldo)
    }
  }
  return 0;
}

extern "C" int llada_rows_linear_bf16(const uint16_t* x, int64_t m, int64_t ldx, const uint16_t* w, int64_t ldw,
                                      int64_t n_rows, int64_t k_len, uint16_t* out, int64_t ldo,
                                      int64_t dot_max_rows) {
  return linear_rows_bf16(x, m, ldx, w, ldw, n_rows, k_len, out, ldo, dot_max_rows);
}

extern "C" int llada_grouped_linear_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w,
                                         int64_t w_expert_stride, int64_t ldw, int64_t n_rows, int64_t k_len,
                                         const int64_t* offsets, int64_t n_experts, int64_t row_start,
                                         int64_t row_end, int64_t max_rows, uint16_t* out, int64_t ldo,
                                         int64_t dot_max_rows) {
  const Grouped<uint16_t> g{x, ldx, w, w_expert_stride, ldw, n_rows, k_len, offsets, n_experts, max_rows, out,
                            ldo, dot_max_rows};
  return grouped_range<uint16_t, linear_rows_bf16>(&g, row_start, row_end);
}

extern "C" int llada_grouped_linear_lanes_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w,
                                               int64_t w_expert_stride, int64_t ldw, int64_t n_rows, int64_t k_len,
                                               const int64_t* offsets, int64_t n_experts, const int64_t* bounds,
                                               int64_t lanes, int64_t threads, int64_t max_rows, uint16_t* out,
                                               int64_t ldo, int64_t dot_max_rows, int64_t* lane_thread) {
  const Grouped<uint16_t> g{x, ldx, w, w_expert_stride, ldw, n_rows, k_len, offsets, n_experts, max_rows, out,
                            ldo, dot_max_rows};
  return run_lanes(grouped_range<uint16_t, linear_rows_bf16>, &g, bounds, lanes, threads, lane_thread);
}

extern "C" int llada_rows_linear_parts_bf16(const uint16_t* x, int64_t m, int64_t ldx, const uint16_t* w,
                                            int64_t ldw, int64_t n_rows, int64_t k_len, uint16_t* out, int64_t ldo,
                                            int64_t dot_max_rows, int64_t threads) {
  const Rows<uint16_t> r{x, m, ldx, w, ldw, k_len, out, ldo, dot_max_rows};
  return split_rows(rows_range<uint16_t, linear_rows_bf16>, r, n_rows, threads);
}
#else
extern "C" int llada_has_bf16() { return 0; }
#endif
"""


_lock = threading.Lock()
_state = {}  # "function": the loaded entry point or None once load() has run


def _cpu_signature() -> str:
    """What the compiled code depends on besides the source: the CPU's instruction sets (-march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler() -> list[str] | None:
    """The C++ compiler's command: $CXX (split as a shell would: "ccache g++"), else the first of c++, g++,
    clang++ on the PATH."""
    if os.environ.get("CXX", "").strip():
        return shlex.split(os.environ["CXX"])
    found = next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)
    return [found] if found else None


def _cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "llada_moe_hf", "kernels")
    return os.environ.get(ENV_CACHE) or default


# Target flags, tried in turn while the compiler rejects the flag itself: -march=native (GCC, Clang on x86),
# -mcpu=native (Clang on Arm), none (the compiler's default target: slower, but built).
TARGETS = (["-march=native"], ["-mcpu=native"], [])
LEFTOVER_AGE_S = 3600  # temporary files of builds killed outright (SIGKILL) are removed after an hour


def _rejects_flag(stderr: str, flags: list[str]) -> bool:
    text = stderr.lower()
    return bool(flags) and any(flag.split("=")[0].lower() in text for flag in flags) and any(
        word in text for word in ("unrecognized", "unknown", "unsupported", "not supported", "invalid", "bad value")
    )


def _clean_leftovers(directory: str) -> None:
    """Remove the temporary files of builds that were killed before they could (older than LEFTOVER_AGE_S: a
    build running now in another process is left alone)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith((".cpp", ".so.partial")):
            try:
                if time.time() - os.path.getmtime(path) > LEFTOVER_AGE_S:
                    os.remove(path)
            except OSError:
                pass


def _build(compiler: list[str], flags: list[str], library: str) -> subprocess.CompletedProcess:
    """Compile SOURCE into `library` through temporary files in the same folder, the library moved in only once
    built: a build cut off (or racing another process) never leaves a partial library under the final name.
    Returns the compiler's run (returncode 0: built)."""
    directory = os.path.dirname(library)
    os.makedirs(directory, exist_ok=True)
    fd, source = tempfile.mkstemp(suffix=".cpp", dir=directory)
    partial = source[: -len(".cpp")] + ".so.partial"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(SOURCE)
        command = [*compiler, *flags, "-O3", "-std=c++17", "-shared", "-fPIC", source, "-o", partial]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            os.replace(partial, library)
        return done
    finally:
        for leftover in (source, partial):
            if os.path.exists(leftover):
                os.remove(leftover)


def _library_path(compiler: list[str], version: str, flags: list[str]) -> str:
    """The cached library for this source, compiler, target flags and CPU (a home folder shared between machines
    holds one library each)."""
    parts = (SOURCE, " ".join(compiler), version, " ".join(flags), _cpu_signature())
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return os.path.join(_cache_dir(), f"llada_rows_linear-{key}.so")


def build_and_bind(compiler: list[str], targets=TARGETS) -> "Kernel":
    """The kernel for the first target flags the compiler accepts, from the cache or built now. A cached library
    that does not load (corrupt, truncated) is rebuilt once. Raises RuntimeError with the compiler's message."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    _clean_leftovers(_cache_dir())
    for flags in targets:
        library = _library_path(compiler, version, flags)
        if os.path.exists(library):
            try:
                return _bind(library, flags)
            except (OSError, AttributeError) as error:
                logger.warning("llada-moe-hf: the cached CPU experts kernel %s does not load (%s); rebuilding it",
                               library, error)  # fmt: skip
                os.remove(library)
        done = _build(compiler, flags, library)
        if done.returncode == 0:
            return _bind(library, flags)
        if not _rejects_flag(done.stderr, flags):
            break  # a real error (not the flag): no point in a slower target
    message = done.stderr.strip()[-800:] or f"exited with {done.returncode}"
    raise RuntimeError(f"{' '.join(compiler)} {' '.join(flags)}: {message}")


def find_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs its parallel regions on (GNU libgomp in Linux wheels; LLVM's libomp also has
    the GNU entry points), found among the libraries this process has loaded; None where there is none to find
    (not Linux, or torch built without OpenMP)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if any(n in line for n in ("libgomp", "libomp", "libiomp"))}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):  # torch's own first
        try:
            library = ctypes.CDLL(path)
            library.GOMP_parallel, library.omp_get_thread_num, library.omp_get_num_threads
        except (OSError, AttributeError):
            continue
        return library
    return None


def _bind(library: str, flags: list[str]) -> "Kernel":
    lib = ctypes.CDLL(library)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    functions = {}
    for dtype, suffix in ((torch.float32, ""), (torch.bfloat16, "_bf16")):
        if dtype == torch.bfloat16 and not lib.llada_has_bf16():
            continue
        linear, grouped = getattr(lib, "llada_rows_linear" + suffix), getattr(lib, "llada_grouped_linear" + suffix)
        lanes = getattr(lib, "llada_grouped_linear_lanes" + suffix)
        parts = getattr(lib, "llada_rows_linear_parts" + suffix)
        linear.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64]
        parts.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64]
        grouped.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, i64, i64, i64, ptr, i64, i64]
        lanes.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, i64, ptr]
        linear.restype = grouped.restype = lanes.restype = parts.restype = ctypes.c_int
        functions[dtype] = (linear, grouped, lanes, parts)
    openmp = find_openmp()
    if openmp is not None:
        address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
        lib.llada_set_openmp.argtypes = [ptr, ptr, ptr]
        lib.llada_set_openmp(address(openmp.GOMP_parallel), address(openmp.omp_get_thread_num),
                             address(openmp.omp_get_num_threads))  # fmt: skip
    return Kernel(library, functions, flags, bool(lib.llada_wide_vectors()), openmp is not None)


class Kernel:
    """The built library's entry points per dtype (see SOURCE): one product, one projection of a block of experts,
    and that projection split into lanes. float32 always; bfloat16 where the CPU has AVX512_BF16. `wide_vectors`:
    built for AVX-512, where its speed was measured (benchmarks/cpu_rows_kernel.py). `parallel`: the lanes run on
    torch's OpenMP team (else one after another)."""

    def __init__(self, path: str, functions: dict, flags: list[str], wide_vectors: bool, parallel: bool = False):
        self.path, self.functions, self.flags, self.wide_vectors = path, functions, flags, wide_vectors
        self.parallel = parallel

    @property
    def dtypes(self) -> tuple:
        return tuple(self.functions)

    def __repr__(self):
        dtypes = [str(d).removeprefix("torch.") for d in self.dtypes]
        return (f"Kernel({self.path!r}, dtypes={dtypes}, flags={self.flags}, wide_vectors={self.wide_vectors}, "
                f"parallel={self.parallel})")  # fmt: skip


def load() -> Kernel | None:
    """The kernel, built on first use and cached; None where the experts use torch's products instead: switched
    off (LLADA_MOE_CPU_KERNEL=0), no compiler or a failed build (a warning, once), or a CPU without AVX-512 where
    it was not measured (LLADA_MOE_CPU_KERNEL=1 uses it there anyway)."""
    with _lock:
        if "function" not in _state:  # not recorded when interrupted (Ctrl-C): the next call tries again
            _state["function"] = _load()
        return _state["function"]


def _load() -> Kernel | None:
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning(
            "llada-moe-hf: no C++ compiler found (c++, g++, clang++ or $CXX), so the CPU experts use MKL's GEMM, up "
            "to 2x slower at a few rows an expert. Install one (e.g. apt install g++) to build the faster kernel, "
            "or set %s=0 to silence this.", ENV_SWITCH)  # fmt: skip
        return None
    try:
        kernel = build_and_bind(compiler)
    except Exception as error:  # any failure: say why once, then run MKL
        logger.warning(
            "llada-moe-hf: could not build the CPU experts kernel (%s: %s); the experts use MKL's GEMM instead. Set "
            "%s=0 to silence this.", type(error).__name__, str(error)[:800], ENV_SWITCH)  # fmt: skip
        return None
    if not kernel.wide_vectors and switch not in ("1", "true", "yes", "on"):
        logger.info(
            "llada-moe-hf: this CPU has no AVX-512, where the CPU experts kernel was not measured; the experts use "
            "torch's products. %s=1 uses the kernel anyway.", ENV_SWITCH)  # fmt: skip
        return None
    return kernel


def reset() -> None:
    """Forget the loaded kernel, so that the next load() reads LLADA_MOE_CPU_KERNEL and the cache again."""
    with _lock:
        _state.clear()


def usable(kernel: Kernel, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether rows_linear can take these: CPU tensors of one dtype the kernel has, rows contiguous, shapes that
    match."""
    return (
        x.dtype == weight.dtype == out.dtype and x.dtype in kernel.functions
        and x.device.type == weight.device.type == out.device.type == "cpu"
        and x.dim() == weight.dim() == out.dim() == 2
        and x.stride(1) == weight.stride(1) == out.stride(1) == 1
        and x.shape[1] == weight.shape[1] and out.shape == (x.shape[0], weight.shape[0])
    )  # fmt: skip


def _check(status: int, rows: int, width: int) -> None:
    if status:
        raise MemoryError(f"the CPU experts kernel could not allocate a buffer for {rows} x {width} floats")


def rows_linear(kernel: Kernel, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, threads: int = 1) -> None:
    """out = x @ weight.T (see usable()). threads > 1: the weight's rows split into up to that many parts (of at
    least 64 rows) on torch's OpenMP team (kernel.parallel); the same numbers as one thread."""
    functions = kernel.functions[x.dtype]
    args = (
        x.data_ptr(), x.shape[0], x.stride(0), weight.data_ptr(), weight.stride(0), weight.shape[0], weight.shape[1],
        out.data_ptr(), out.stride(0), DOT_MAX_ROWS,
    )  # fmt: skip
    status = functions[3](*args, threads) if threads > 1 else functions[0](*args)
    _check(status, x.shape[0], x.shape[1])


def grouped_usable(kernel: Kernel, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether grouped_linear can take these: CPU tensors of one dtype the kernel has, x and out [rows, *] with
    contiguous rows, weights [experts, N, K] with contiguous rows."""
    return (
        x.dtype == weights.dtype == out.dtype and x.dtype in kernel.functions
        and x.device.type == weights.device.type == out.device.type == "cpu"
        and x.dim() == out.dim() == 2 and weights.dim() == 3
        and x.stride(1) == weights.stride(2) == out.stride(1) == 1
        and x.shape[1] == weights.shape[2] and out.shape == (x.shape[0], weights.shape[1])
    )  # fmt: skip


def _check_offsets(x, weights, offsets, out, row_start, row_end) -> None:
    if not (offsets.dtype == torch.int64 and offsets.is_contiguous() and offsets.dim() == 1
            and len(offsets) == weights.shape[0] + 1):  # fmt: skip
        raise ValueError(f"offsets must be a contiguous int64 tensor of {weights.shape[0] + 1} entries (experts + 1)")
    rows = min(x.shape[0], out.shape[0])
    if not 0 <= row_start <= row_end <= rows or int(offsets[0]) < 0 or int(offsets[-1]) > rows:
        raise ValueError(f"rows {row_start}..{row_end} and offsets {int(offsets[0])}..{int(offsets[-1])} must lie "
                         f"within the {rows} rows of x and out")  # fmt: skip


def grouped_linear(kernel: Kernel, x, weights, offsets: torch.Tensor, row_start: int, row_end: int, max_rows: int,
                   out) -> None:  # fmt: skip
    """For each expert e with at most max_rows rows in [row_start, row_end) (rows sorted by expert, expert e's at
    offsets[e]..offsets[e + 1] - 1; offsets an int64 tensor of experts + 1 entries): out[rows] = x[rows] @
    weights[e].T. Busier experts are left alone (see grouped_usable())."""
    _check_offsets(x, weights, offsets, out, row_start, row_end)
    grouped = kernel.functions[x.dtype][1]
    status = grouped(
        x.data_ptr(), x.stride(0), weights.data_ptr(), weights.stride(0), weights.stride(1), weights.shape[1],
        weights.shape[2], offsets.data_ptr(), weights.shape[0], row_start, row_end, max_rows, out.data_ptr(),
        out.stride(0), DOT_MAX_ROWS,
    )  # fmt: skip
    _check(status, row_end - row_start, x.shape[1])


def grouped_linear_lanes(kernel: Kernel, x, weights, offsets: torch.Tensor, bounds: list[int], max_rows: int, out,
                         lane_thread: torch.Tensor | None = None) -> None:  # fmt: skip
    """grouped_linear over the lanes bounds[i]..bounds[i + 1] - 1 at once, on a team of min(lanes, torch's
    threads) of torch's OpenMP threads, lane i on thread i modulo the team (kernel.parallel; else one after
    another). A lane's experts are cut at its bounds: an expert split
    between lanes counts its rows in each lane against max_rows. `lane_thread` (int64, one entry a lane), if
    given, receives the OpenMP thread that ran each lane."""
    if len(bounds) < 2 or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"bounds must be at least 2 nondecreasing row numbers, got {bounds}")
    _check_offsets(x, weights, offsets, out, bounds[0], bounds[-1])
    lanes = len(bounds) - 1
    if lane_thread is not None and not (
        lane_thread.dtype == torch.int64 and lane_thread.is_contiguous() and lane_thread.numel() == lanes
    ):
        raise ValueError(f"lane_thread must be a contiguous int64 tensor of {lanes} entries (one a lane)")
    bounds_t = torch.tensor(bounds, dtype=torch.int64)
    run = kernel.functions[x.dtype][2]
    status = run(
        x.data_ptr(), x.stride(0), weights.data_ptr(), weights.stride(0), weights.stride(1), weights.shape[1],
        weights.shape[2], offsets.data_ptr(), weights.shape[0], bounds_t.data_ptr(), lanes, torch.get_num_threads(),
        max_rows, out.data_ptr(), out.stride(0), DOT_MAX_ROWS, None if lane_thread is None else lane_thread.data_ptr(),
    )  # fmt: skip
    _check(status, bounds[-1] - bounds[0], x.shape[1])
