# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""The CPU experts implementation, registered with transformers as `experts_implementation="cpu_moe"`, and the
default `"auto"` (cpu_moe on the CPU, grouped_mm elsewhere).

Why not transformers' grouped_mm on the CPU: `torch._grouped_mm` there is a loop of one BLAS GEMM per expert, run
with all the BLAS's threads. At the sizes a forward gives (a dozen to a hundred rows per expert against weights that
come from DRAM) each GEMM is short, so the threads hardly help (issue 13 measured 1.0x-1.2x from a second core),
and a GEMM of a few rows runs at a fraction of the memory bandwidth. This path, measured against the alternatives
in `benchmarks/cpu_experts.py` (README, "CPU experts"):

1. sorts the (token, expert) pairs by expert once, and chooses a strategy from the dtype and the rows per expert;
2. experts of a useful size run `sorted_lanes` (float32, and bfloat16 where the built kernel has it): the sorted
   rows split into as many *lanes* as torch has threads, balanced by rows and experts touched, so that every
   core streams its own experts' weights and runs whole products instead of all cores sharing each small GEMM.
   Each projection is one call of the CPU experts kernel (cpu_kernel_llada_moe.py: it reads each weight once
   where MKL repacks it per call) that runs the lanes on torch's own OpenMP team, SiLU(gate) * up one torch call
   between them. Without the kernel (no compiler), each lane runs on a single-threaded Python worker with per
   expert BLAS calls into preallocated buffers, the product's orientation chosen by the number of rows;
3. bfloat16 without the kernel (and small float32 experts) run `padded`: every expert's rows padded to the
   busiest expert's count, one batched GEMM per projection over all experts, unless the padding would cost too
   much (then grouped_mm);
4. scales by the routing weights and adds each pair into its token in expert order, as the eager loop does.

It is a forward for inference. When autograd needs the experts' graph (training, LoRA training) it runs
grouped_mm, whose backward is a grouped GEMM; under torch.compile it runs grouped_mm too (a loop whose trip count
depends on the routing cannot be one graph). On another device it raises a clear error; "auto" picks grouped_mm
there. The weights are read once per call through the module's attributes: PEFT's LoRA on experts reparametrises
them.
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import nn

# `from .x import`, not `from . import x`: transformers copies a Hub repo's custom code by that pattern
from .cpu_kernel_llada_moe import find_openmp, grouped_linear, grouped_linear_lanes, grouped_usable, rows_linear
from .cpu_kernel_llada_moe import load as load_kernel


CPU_MOE_NAME = "cpu_moe"
AUTO_NAME = "auto"

# The thresholds below were measured on a 2-core AMD EPYC (Zen 4) VM with torch 2.13's MKL and oneDNN, float32 and
# bfloat16 (benchmarks/cpu_experts.py; README, "CPU experts"). They only choose between exact alternatives.

# float32 experts with hidden x intermediate at least this large run `sorted_lanes` (the mid-size model's 512 x 256
# and up): MKL runs a product of a few rows far below its speed, and the lanes keep every core on whole products.
# Smaller ones run `padded` batched GEMMs (up to PADDED_MAX_PAIRS pairs), else grouped_mm's loop.
LARGE_EXPERT = 1 << 16
PADDED_MAX_PAIRS = 512
# bfloat16 (and float16) products go to oneDNN, whose batched kernel over all experts was the fastest strategy in 8
# of 10 sizes of a mid-size layer routed evenly (0.95x-1.71x grouped_mm), as long as padding every expert to the
# busiest one at most triples the rows: a router that sends most tokens to a few experts runs grouped_mm.
PADDED_MAX_WASTE = 3
# Rows per expert up to which the built kernel (cpu_kernel_llada_moe.py) runs an expert's products instead of
# torch's (MKL, oneDNN): it reads the weights where they lie instead of repacking them per call.
# (benchmarks/results/cpu_rows_kernel.json: in float32 the kernel is faster at every count measured, up to 1024
# rows; beyond that, unmeasured, torch's product. In bfloat16 oneDNN is as fast from about 64 rows.)
KERNEL_MAX_ROWS = {torch.float32: 1024, torch.bfloat16: 64}
# Without the kernel (no compiler, LLADA_MOE_CPU_KERNEL=0): rows per expert up to which `weights @ rows.T` beats `rows @ weights.T` in float32: MKL streams the weights once
# as the left operand instead of packing them for a few rows. (bfloat16 products go to oneDNN: no gain.)
WEIGHTS_LEFT_MAX_ROWS = {torch.float32: 4}
# Rows per expert up to which reading an expert's weights once (a sum) before its GEMM pays in float32: the GEMM
# then finds them in the cache instead of waiting on DRAM for each panel. Only for weights that fit a core's L2
# cache (the mid-size model's 1 MiB): the release's 16 MiB would be read from DRAM twice.
TOUCH_MAX_ROWS = {torch.float32: 24}
TOUCH_MAX_BYTES = 2 << 20
# Rows a lane takes through gate_up, the activation and down at a time: the intermediates of 128 rows stay in the
# L2/L3 cache (all the pairs' at once would not, at 512 tokens).
BLOCK_ROWS = 128
# Multiply-adds a lane must have to be worth a Python worker's wake-up and the OpenMP team's restart (on the
# mid-size model: two lanes from about 40 tokens). Only without the kernel's lanes on torch's OpenMP team (no
# compiler, or no OpenMP runtime found).
LANE_MIN_WORK = 64 << 20
# The same for the kernel's lanes on torch's OpenMP team, whose threads are already running: on the mid-size
# model (3M multiply-adds a token) two lanes are 1.07x-1.28x one lane from a single token on 2 threads
# (benchmarks/results/cpu_lanes_small.json). Below 1M (the tiny test models) is not measured: one lane there.
TEAM_LANE_MIN_WORK = 1 << 20


def _grouped_mm_forward(module, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def _needs_graph(module, hidden_states, top_k_weights) -> bool:
    """True where this call must be autograd- or compile-friendly (then grouped_mm runs)."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return hidden_states.requires_grad or top_k_weights.requires_grad or any(
        p.requires_grad for p in module.parameters(recurse=True)
    )


def _find_pause():
    """`omp_pause_resource_all` of torch's OpenMP runtime (OpenMP 5.0), or None."""
    openmp = find_openmp()
    pause = getattr(openmp, "omp_pause_resource_all", None) if openmp is not None else None
    if pause is not None:
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


class _Lanes:
    """Worker threads that each run torch with one intra-op thread, created on first use (and again after a fork):
    the lanes where the kernel cannot run them on torch's OpenMP team. A worker sleeps on a futex between
    layers; waking it on a core that has gone idle can take milliseconds (benchmarks/cpu_lanes_idle.py), hence
    LANE_MIN_WORK.

    `torch.set_num_threads(1)` in a worker sets that thread's OpenMP and MKL thread counts; it also sets two
    process-wide values (the count new threads start with, the pthreadpool's size), which are put back at once.

    Before the lanes start, the calling thread's idle OpenMP team is released (`omp_pause_resource_all`, OpenMP
    5.0). GNU OpenMP keeps a finished team's threads spinning for some milliseconds; each spinner would take half
    of a core that a lane runs on (lanes started right after a 2-thread GEMM took about twice as long as alone).
    The next parallel region starts its threads again."""

    def __init__(self):
        self._pool = None
        self._size = 0
        self._pid = None
        self._lock = threading.Lock()
        self._pause = _find_pause()

    def pool(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._size < workers or self._pid != os.getpid():
                if self._pool is not None and self._pid == os.getpid():
                    self._pool.shutdown(wait=False)
                threads = torch.get_num_threads()
                # Renew torch's thread pool on this thread before the workers start. In a forked process torch
                # replaces the parent's pool at its next use, and workers asking at once would race that
                # replacement (one gets no pool: "Invalid thread pool!").
                torch.set_num_threads(threads)
                ready = threading.Barrier(workers + 1, timeout=120)  # a worker that cannot start raises, not hangs

                def single_threaded():
                    torch.set_num_threads(1)
                    ready.wait()

                pool = ThreadPoolExecutor(workers, thread_name_prefix="llada-cpu-moe", initializer=single_threaded)
                for _ in range(workers):  # start every worker now, so that each runs its initializer
                    pool.submit(int)
                ready.wait()
                torch.set_num_threads(threads)  # the process-wide values, as they were
                self._pool, self._size, self._pid = pool, workers, os.getpid()
            return self._pool

    def run(self, function, args, ranges):
        """function(*args, *bounds) for each range: the first on this thread, the others on workers."""
        pool = self.pool(len(ranges) - 1)
        threads = torch.get_num_threads()
        if self._pause is not None:
            self._pause(1)  # omp_pause_soft
        torch.set_num_threads(1)
        futures = []
        try:
            futures = [pool.submit(function, *args, *bounds) for bounds in ranges[1:]]
            function(*args, *ranges[0])
        finally:
            wait(futures)  # no worker still writes into the buffers once this returns or raises
            torch.set_num_threads(threads)
        for future in futures:
            future.result()


_LANES = _Lanes()


# An expert's fixed cost in rows of GEMM work: streaming its weights and setting up two GEMMs (estimated from the
# mid-size model's per-layer times while building this: about 0.17 ms an expert plus 0.014 ms a row, float32).
EXPERT_COST_ROWS = 12


def split_lanes(counts: list[int], lanes: int) -> list[tuple[int, int]]:
    """Split the rows (sorted by expert) into at most `lanes` contiguous ranges of about equal cost: a row costs 1,
    each expert a range touches EXPERT_COST_ROWS more. A range may end inside an expert: the next lane then runs
    the rest of its rows (and pays its fixed cost again)."""
    pieces, rows = [], 0  # (first row, rows) of each expert with rows
    for count in counts:
        if count:
            pieces.append((rows, count))
        rows += count
    if not rows:
        return []
    total = sum(EXPERT_COST_ROWS + count for _, count in pieces)
    target = (total + EXPERT_COST_ROWS * (lanes - 1)) / lanes  # as if every cut fell inside an expert
    bounds, cost = [0], 0.0
    for first, count in pieces:
        row, end = first, first + count
        cost += EXPERT_COST_ROWS
        while len(bounds) < lanes and cost + (end - row) > target:
            cut = max(row + max(0, round(target - cost)), bounds[-1] + 1)
            if cut >= end:
                break
            bounds.append(cut)
            row, cost = cut, EXPERT_COST_ROWS
        cost += end - row
    bounds.append(rows)
    return list(zip(bounds[:-1], bounds[1:]))


def _project(rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, weights_left: bool) -> None:
    """out = rows @ weight.T, with the orientation that suits the number of rows."""
    if weights_left:
        out.copy_(torch.mm(weight, rows.t()).t())
    else:
        torch.mm(rows, weight.t(), out=out)


def _kernel_takes(kernel, rows, gate_up, down, gate_up_out, act_out, out) -> bool:
    return (
        kernel is not None
        and grouped_usable(kernel, rows, gate_up, gate_up_out)
        and grouped_usable(kernel, act_out, down, out)
    )


def _busy_pieces(offsets, ranges, max_rows):
    """(expert, lo, hi) of each expert's rows within each range where they are more than max_rows: the kernel
    leaves these to MKL's product."""
    busy = []
    for row_start, row_end in ranges:
        for expert in range(len(offsets) - 1):
            lo, hi = max(offsets[expert], row_start), min(offsets[expert + 1], row_end)
            if hi - lo > max_rows:
                busy.append((expert, lo, hi))
    return busy


def _run_experts_kernel(kernel, act_fn, gate_up, down, rows, gate_up_out, act_out, out, offsets, ranges):
    """run_experts with the built kernel over one or more lanes (contiguous `ranges` of rows): each projection
    one kernel call over every lane's experts (lanes on torch's OpenMP team: grouped_linear_lanes), the
    activation one torch call over the rows; experts with more than KERNEL_MAX_ROWS rows in a lane (where MKL is
    as fast) run MKL's product with all its threads."""
    offsets_t = torch.tensor(offsets, dtype=torch.int64)
    max_rows = KERNEL_MAX_ROWS[rows.dtype]
    busy = _busy_pieces(offsets, ranges, max_rows)
    bounds = [start for start, _ in ranges] + [ranges[-1][1]]
    first, last = bounds[0], bounds[-1]
    grouped_linear_lanes(kernel, rows, gate_up, offsets_t, bounds, max_rows, gate_up_out)
    for expert, lo, hi in busy:
        torch.mm(rows[lo:hi], gate_up[expert].t(), out=gate_up_out[lo:hi])
    intermediate = down.shape[-1]
    lane = gate_up_out[first:last]
    torch.mul(act_fn(lane[:, :intermediate]), lane[:, intermediate:], out=act_out[first:last])
    grouped_linear_lanes(kernel, act_out, down, offsets_t, bounds, max_rows, out)
    for expert, lo, hi in busy:
        torch.mm(act_out[lo:hi], down[expert].t(), out=out[lo:hi])


@torch.no_grad()  # grad mode is per thread: a worker must not record the out= products either
def run_experts(act_fn, gate_up, down, rows, gate_up_out, act_out, out, offsets, kernel, row_start, row_end):
    """gate_up, SiLU(gate) * up and down for the rows row_start..row_end-1 (sorted by expert, expert e's rows at
    offsets[e]..offsets[e + 1] - 1). `kernel`: the built kernel (cpu_kernel_llada_moe.load()), or None
    for MKL alone: then a block of experts at a time, so that the intermediates stay in the cache."""
    if _kernel_takes(kernel, rows, gate_up, down, gate_up_out, act_out, out):
        return _run_experts_kernel(
            kernel, act_fn, gate_up, down, rows, gate_up_out, act_out, out, offsets, [(row_start, row_end)]
        )
    small = WEIGHTS_LEFT_MAX_ROWS.get(rows.dtype, 0)
    fits = gate_up[0].numel() * gate_up.element_size() <= TOUCH_MAX_BYTES
    touch = TOUCH_MAX_ROWS.get(rows.dtype, 0) if fits else 0
    intermediate = down.shape[-1]
    block = []  # (expert, first row, rows) of the experts in this block
    for expert in range(len(offsets) - 1):
        lo, hi = max(offsets[expert], row_start), min(offsets[expert + 1], row_end)
        if hi > lo:
            block.append((expert, lo, hi - lo))
        if block and (hi >= row_end or block[-1][1] + block[-1][2] - block[0][1] >= BLOCK_ROWS):
            for expert_, lo_, count in block:
                if count <= touch:
                    gate_up[expert_].sum()
                _project(rows[lo_ : lo_ + count], gate_up[expert_], gate_up_out[lo_ : lo_ + count], count <= small)
            first, last = block[0][1], block[-1][1] + block[-1][2]
            gate, up = gate_up_out[first:last, :intermediate], gate_up_out[first:last, intermediate:]
            torch.mul(act_fn(gate), up, out=act_out[first:last])
            for expert_, lo_, count in block:
                if count <= touch:
                    down[expert_].sum()
                _project(act_out[lo_ : lo_ + count], down[expert_], out[lo_ : lo_ + count], count <= small)
            block = []
        if hi >= row_end:
            break


@torch.no_grad()
def run_kernel_lanes(act_fn, gate_up, down, rows, gate_up_out, act_out, out, offsets, kernel, ranges):
    """run_experts for several lanes at once, on torch's own OpenMP team (kernel.parallel): no worker thread to
    wake and no team to pause, so lanes pay from far fewer rows than the Python workers' (LANE_MIN_WORK)."""
    _run_experts_kernel(kernel, act_fn, gate_up, down, rows, gate_up_out, act_out, out, offsets, ranges)


def _route(top_k_index: torch.Tensor, num_experts: int):
    """Sort the (token, expert) pairs by expert (stable: each token's experts stay in slot order within an expert,
    and the experts in index order). Returns the pair order, each row's token and expert, and the rows per expert.
    Expert-parallel sentinels (id num_experts: experts held by another rank) sort last and are dropped."""
    pair_expert = top_k_index.reshape(-1)
    sorted_expert, order = torch.sort(pair_expert, stable=True)
    counts = torch.bincount(pair_expert, minlength=num_experts + 1).tolist()[:num_experts]
    pairs = sum(counts)
    order, sorted_expert = order[:pairs], sorted_expert[:pairs]
    return order, order // top_k_index.shape[-1], sorted_expert, counts


def _combine(hidden_states, rows_out, order, token_of_row, top_k_weights):
    """Scale each pair's output by its routing weight and add it into its token. The rows are in expert order, so
    each token sums its experts in the order of the eager loop."""
    rows_out.mul_(top_k_weights.reshape(-1)[order].unsqueeze(-1).to(rows_out.dtype))
    final = torch.zeros_like(hidden_states)
    final.index_add_(0, token_of_row, rows_out.to(final.dtype))
    return final


def sorted_lanes_forward(self, hidden_states, top_k_index, top_k_weights, route=None):
    """Strategy for float32 experts of a useful size: the rows gathered in expert order, one BLAS call per expert
    and projection, the experts split over lanes (one single-threaded worker per torch thread). `route`: what
    `_route` returned for top_k_index, if the caller has it."""
    gate_up, down = self.gate_up_proj, self.down_proj  # read once: a LoRA parametrisation computes them per read
    dtype = gate_up.dtype
    order, token_of_row, _, counts = route or _route(top_k_index, self.num_experts)
    pairs = len(order)
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    rows = hidden_states.index_select(0, token_of_row).to(dtype)
    gate_up_out = rows.new_empty(pairs, gate_up.shape[1])
    act_out = rows.new_empty(pairs, down.shape[-1])
    out = rows.new_empty(pairs, down.shape[1])
    kernel = load_kernel()
    args = (self.act_fn, gate_up, down, rows, gate_up_out, act_out, out, offsets, kernel)

    on_team = kernel is not None and kernel.parallel and _kernel_takes(kernel, rows, gate_up, down, gate_up_out,
                                                                         act_out, out)  # fmt: skip
    work = pairs * down.shape[1] * down.shape[2] * 3  # multiply-adds of both projections
    lanes = min(torch.get_num_threads(), work // (TEAM_LANE_MIN_WORK if on_team else LANE_MIN_WORK))
    ranges = split_lanes(counts, lanes) if lanes > 1 else [(0, pairs)]
    if len(ranges) > 1 and on_team:
        run_kernel_lanes(*args, ranges)
    elif len(ranges) > 1:
        _LANES.run(run_experts, args, ranges)
    elif ranges:
        run_experts(*args, *ranges[0])
    return _combine(hidden_states, out, order, token_of_row, top_k_weights)


def padded_forward(self, hidden_states, top_k_index, top_k_weights, route=None):
    """Strategy for bfloat16, and for small experts: every expert's rows padded to the busiest expert's count,
    and each projection one batched GEMM over all experts (torch's bmm spreads the experts over its threads; in
    bfloat16 it is one oneDNN batched call). Fewer, larger calls win where a per-expert GEMM is too small or too
    fast to pay for its own call; the padding is bounded by PADDED_MAX_WASTE."""
    gate_up, down = self.gate_up_proj, self.down_proj
    dtype = gate_up.dtype
    order, token_of_row, sorted_expert, counts = route or _route(top_k_index, self.num_experts)
    if not len(order):
        return torch.zeros_like(hidden_states)
    counts_t = torch.tensor(counts)
    first_row = (counts_t.cumsum(0) - counts_t)[sorted_expert]
    slot = torch.arange(len(order)) - first_row  # each row's place among its expert's rows
    padded = hidden_states.new_zeros(self.num_experts, max(counts), hidden_states.shape[-1], dtype=dtype)
    padded[sorted_expert, slot] = hidden_states.index_select(0, token_of_row).to(dtype)
    gate_up_out = torch.bmm(padded, gate_up.transpose(1, 2))
    intermediate = down.shape[-1]
    act_out = self.act_fn(gate_up_out[..., :intermediate]) * gate_up_out[..., intermediate:]
    out = torch.bmm(act_out, down.transpose(1, 2))
    return _combine(hidden_states, out[sorted_expert, slot], order, token_of_row, top_k_weights)


def choose_strategy(
    counts: list[int], hidden: int, intermediate: int, dtype: torch.dtype, kernel_dtypes: tuple = ()
) -> str:
    """Which CPU strategy a forward runs, from the rows per expert and the dtypes the built kernel has
    (benchmarks/cpu_experts.py measures each; README, "CPU experts")."""
    pairs = sum(counts)
    padding_pays = pairs and max(counts) * len(counts) <= PADDED_MAX_WASTE * pairs
    if dtype in kernel_dtypes and hidden * intermediate >= LARGE_EXPERT:
        return "sorted_lanes"
    if dtype != torch.float32:
        return "padded" if padding_pays else "grouped_mm"
    if hidden * intermediate >= LARGE_EXPERT:
        return "sorted_lanes"
    return "padded" if padding_pays and pairs <= PADDED_MAX_PAIRS else "grouped_mm"


STRATEGIES = {
    "sorted_lanes": sorted_lanes_forward,
    "padded": padded_forward,
    "grouped_mm": _grouped_mm_forward,
}


def cpu_moe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts of one layer on the CPU (see the module docstring). Same signature as transformers' experts
    implementations: hidden_states [T, H], top_k_index and top_k_weights [T, k]; returns [T, H]."""
    if _needs_graph(self, hidden_states, top_k_weights):
        return _grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights)
    if hidden_states.device.type != "cpu":
        raise RuntimeError(
            f'experts_implementation="{CPU_MOE_NAME}" runs on the CPU, but the model is on '
            f'{hidden_states.device.type}. Use "{AUTO_NAME}" (the default: {CPU_MOE_NAME} on the CPU, grouped_mm '
            'elsewhere), "grouped_mm" or "fused_moe" (CUDA): model.set_experts_implementation("auto").'
        )
    dtype, small = self.gate_up_proj.dtype, self.hidden_dim * self.intermediate_dim < LARGE_EXPERT
    if dtype == torch.float32 and small and top_k_index.numel() > PADDED_MAX_PAIRS:  # decided without routing
        return _grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights)
    route = _route(top_k_index, self.num_experts)
    kernel = load_kernel()
    strategy = choose_strategy(route[3], self.hidden_dim, self.intermediate_dim, dtype, kernel.dtypes if kernel else ())
    if strategy == "grouped_mm":
        return _grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights)
    return STRATEGIES[strategy](self, hidden_states, top_k_index, top_k_weights, route=route)


def auto_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The default: cpu_moe for a CPU forward, grouped_mm for training, under torch.compile and on other devices."""
    if hidden_states.device.type == "cpu" and not _needs_graph(self, hidden_states, top_k_weights):
        return cpu_moe_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return _grouped_mm_forward(self, hidden_states, top_k_index, top_k_weights)


# float32 dense projections (attention, lm_head) of up to this many rows run the kernel: MKL repacks the weight
# for each call, and at a few dozen rows that is most of its time; the kernel was as fast or faster at every count
# measured, up to 512 rows (benchmarks/results/cpu_dense_linear.json). bfloat16 products go to oneDNN: there the
# kernel led only up to 4 rows, was mixed at 16 and 32 and slower from 256.
DENSE_KERNEL_MAX_ROWS = {torch.float32: 512}


def _dense_kernel_takes(module, x: torch.Tensor, implementation) -> bool:
    """Whether linear() may run `module` on the kernel: a plain nn.Linear (no hooks, no forward replaced on the
    instance as accelerate's offload hooks do, no tensor subclass, no autograd graph to record), float32 weights
    in CPU memory, few rows, the experts on `auto`/`cpu_moe`."""
    weight = getattr(module, "weight", None)
    return (
        not torch.compiler.is_compiling()  # first: under torch.compile nothing below is traced
        and implementation in (AUTO_NAME, CPU_MOE_NAME)
        and type(module) is nn.Linear and type(weight) in (nn.Parameter, torch.Tensor)
        and "forward" not in vars(module) and "_hf_hook" not in vars(module)  # accelerate sets both on the instance
        and x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype and x.dim() >= 2
        and 0 < x.numel() // x.shape[-1] <= DENSE_KERNEL_MAX_ROWS.get(x.dtype, 0)
        and not (module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                 or nn.modules.module._global_forward_pre_hooks)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )  # fmt: skip


def linear(module, x: torch.Tensor, implementation=AUTO_NAME) -> torch.Tensor:
    """module(x), where the module is a dense projection; float32 inference on the CPU with few rows runs the
    kernel instead of MKL (same numbers within float rounding; _dense_kernel_takes). `implementation`: the
    model's experts implementation: `eager` and `grouped_mm` keep torch's products throughout."""
    if not _dense_kernel_takes(module, x, implementation):
        return module(x)
    kernel, weight = load_kernel(), module.weight
    if kernel is None or x.dtype not in kernel.dtypes or weight.stride(1) != 1:
        return module(x)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    rows_linear(kernel, rows, weight, out, torch.get_num_threads() if kernel.parallel else 1)
    if module.bias is not None:
        out += module.bias
    return out.view(*x.shape[:-1], weight.shape[0])


def register_cpu_moe_experts():
    """Register `cpu_moe` and `auto` with transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(CPU_MOE_NAME, cpu_moe_experts_forward)
    ExpertsInterface.register(AUTO_NAME, auto_experts_forward)


register_cpu_moe_experts()
