"""CPU forward of LLaDA-MoE with the default experts (`auto`: cpu_moe on the CPU) against grouped_mm and eager
(issue 13), and the CPU experts strategies measured one against another.

Forward: the whole model (all layers + lm_head, batch 1), for each shape, dtype, token count and torch thread
count, the implementations interleaved in a new random order each repetition: auto (the default; with the CPU
experts kernel, llada_moe_hf/cpu_kernel_llada_moe.py, built at first use), auto without the kernel (a machine
without a C++ compiler, or LLADA_MOE_CPU_KERNEL=0), grouped_mm and eager; the median, and the ratio grouped_mm time
/ implementation time (above 1 is faster than grouped_mm). Shapes: "mid" (4 layers, hidden 512,
64 experts of width 256, top-8, vocab 4096: benchmarks/forward.py's CPU model) and "release" (the release's
widths, hidden 2048, 16 heads, 64 experts of width 1024, 2 of its 16 layers, vocab 4096). The models have random
weights (forward.py's recipe), so their routing is their own: in the mid model most layers send most tokens to a
dozen experts. Each row also records max |logits(cpu_moe) - logits(eager)|.

Candidates (--candidates): one MoE layer of the mid shape alone, routed uniformly at random (as a trained,
load-balanced router does), timed as each strategy of `llada_moe_hf/cpu_moe_llada_moe.py` and the alternatives
it was chosen over: sorted_lanes (the default for this size), the same without the kernel, the same on one lane (all threads inside each
BLAS call, as grouped_mm), padded (one bmm per projection over all experts), grouped_mm, eager, and - where
torch has the op - the sorted rows with oneDNN weights packed ahead of time (a second copy of every expert's
weights: measured, not used).

    python benchmarks/cpu_experts.py --out /tmp/cpu_experts.json               # the issue's table (~15 min)
    python benchmarks/cpu_experts.py --quick                                     # 96 tokens, mid, ~1 min
    python benchmarks/cpu_experts.py --candidates --shapes --out /tmp/cand.json  # strategies only

Prints tables and writes JSON (machine, versions, git commit, shapes, dtypes, timings) to --out; nothing is
written without it.
"""

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import transformers

from forward import build_models, shapes
from llada_moe_hf import cpu_moe_llada_moe as cpu_moe
from llada_moe_hf.modeling_llada_moe import LLaDAMoEExperts
from provenance import git_state, write_json


# "auto (no kernel)": auto where the kernel is not built (no compiler, LLADA_MOE_CPU_KERNEL=0): MKL and oneDNN.
NO_KERNEL = "auto (no kernel)"
IMPLEMENTATIONS = ("auto", NO_KERNEL, "grouped_mm", "eager")


class _KernelOff:
    """Within it, cpu_moe runs as if the kernel did not build."""

    def __enter__(self):
        self.load = cpu_moe.load_kernel
        cpu_moe.load_kernel = lambda: None

    def __exit__(self, *exc):
        cpu_moe.load_kernel = self.load


def run_forward(model, ids, impl):
    if impl == NO_KERNEL:
        model.set_experts_implementation("auto")
        with _KernelOff():
            return model(ids)
    model.set_experts_implementation(impl)
    return model(ids)


def model_shape(name: str) -> dict:
    if name == "mid":
        return shapes(False, None)
    dims = shapes(True, 2)
    dims["vocab"] = 4096  # the layers are measured, not the release's 157k-row lm_head
    return dims


def median_ms(samples):
    return 1e3 * statistics.median(samples)


def time_forward(model, ids, implementations, reps):
    samples = {impl: [] for impl in implementations}
    with torch.no_grad():
        for impl in implementations:  # warm-up (and the lanes' worker threads start)
            run_forward(model, ids, impl)
        for _ in range(reps):
            order = list(implementations)
            random.shuffle(order)
            for impl in order:
                start = time.perf_counter()
                run_forward(model, ids, impl)
                samples[impl].append(time.perf_counter() - start)
    return {impl: median_ms(t) for impl, t in samples.items()}


def logits_error(model, ids):
    with torch.no_grad():
        model.set_experts_implementation("eager")
        eager = model(ids).logits.float()
        model.set_experts_implementation("cpu_moe")
        return (model(ids).logits.float() - eager).abs().max().item()


def forward_rows(shape_names, dtypes, token_counts, thread_counts, reps):
    rows = []
    for shape_name in shape_names:
        dims = model_shape(shape_name)
        for dtype_name in dtypes:
            torch.manual_seed(0)
            model, olmoe = build_models(dims, "cpu", getattr(torch, dtype_name))
            del olmoe
            for tokens in token_counts:
                ids = torch.randint(3, dims["vocab"], (1, tokens))
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    ms = time_forward(model, ids, IMPLEMENTATIONS, reps)
                    row = {
                        "shape": shape_name, "dtype": dtype_name, "tokens": tokens, "threads": threads,
                        "median_ms": ms,
                        "speedup_vs_grouped_mm": {impl: ms["grouped_mm"] / ms[impl] for impl in ms},
                        "max_abs_logits_cpu_moe_vs_eager": logits_error(model, ids),
                    }  # fmt: skip
                    rows.append(row)
                    print_forward_row(row, flush=True)
            del model
    return rows


def print_forward_header():
    print("forward, batch 1: median ms; speedup = grouped_mm time / time")
    print(f"{'shape':<7} {'dtype':<8} {'tok':>4} {'thr':>3} | {'auto':>7} {'no kern':>7} {'gmm':>7} "
          f"{'eager':>7} | {'auto x':>6} {'no k x':>6}")  # fmt: skip


def print_forward_row(row, flush=False):
    ms, speed = row["median_ms"], row["speedup_vs_grouped_mm"]
    print(f"{row['shape']:<7} {row['dtype']:<8} {row['tokens']:>4} {row['threads']:>3} | {ms['auto']:>7.1f} "
          f"{ms[NO_KERNEL]:>7.1f} {ms['grouped_mm']:>7.1f} {ms['eager']:>7.1f} | {speed['auto']:>6.2f} "
          f"{speed[NO_KERNEL]:>6.2f}", flush=flush)  # fmt: skip


# ----------------------------------------------------------------------------------------------- candidates


def _packed_candidate(module):
    """sorted_lanes' one-lane loop with each expert's weights packed by oneDNN ahead of time (torch's internal
    ops that inductor uses on the CPU), or None where torch lacks them."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        reorder, linear = ops._reorder_linear_weight, ops._linear_pointwise
        packed = {
            name: [reorder(weight[e].contiguous(), 16) for e in range(weight.shape[0])]
            for name, weight in (("gate_up", module.gate_up_proj.detach()), ("down", module.down_proj.detach()))
        }
    except (AttributeError, RuntimeError):
        return None

    def forward(self, hidden_states, top_k_index, top_k_weights):
        order, token_of_row, _, counts = cpu_moe._route(top_k_index, self.num_experts)
        rows = hidden_states.index_select(0, token_of_row)
        out = rows.new_empty(rows.shape)
        intermediate = self.intermediate_dim
        start = 0
        for expert, count in enumerate(counts):
            if count:
                x = rows[start : start + count]
                gate_up = linear(x, packed["gate_up"][expert], None, "none", [], "")
                act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
                out[start : start + count] = linear(act, packed["down"][expert], None, "none", [], "")
                start += count
        return cpu_moe._combine(hidden_states, out, order, token_of_row, top_k_weights)

    return forward


def candidate_functions(module):
    def one_lane(self, hidden_states, top_k_index, top_k_weights):
        work, team_work = cpu_moe.LANE_MIN_WORK, cpu_moe.TEAM_LANE_MIN_WORK
        cpu_moe.LANE_MIN_WORK = cpu_moe.TEAM_LANE_MIN_WORK = 1 << 62
        try:
            return cpu_moe.sorted_lanes_forward(self, hidden_states, top_k_index, top_k_weights)
        finally:
            cpu_moe.LANE_MIN_WORK, cpu_moe.TEAM_LANE_MIN_WORK = work, team_work

    def no_kernel(self, hidden_states, top_k_index, top_k_weights):
        with _KernelOff():
            return cpu_moe.sorted_lanes_forward(self, hidden_states, top_k_index, top_k_weights)

    functions = {
        "sorted_lanes": cpu_moe.sorted_lanes_forward,
        "sorted_lanes, no kernel": no_kernel,
        "sorted, one lane": one_lane,
        "padded": cpu_moe.padded_forward,
        "grouped_mm": cpu_moe.STRATEGIES["grouped_mm"],
        "eager": LLaDAMoEExperts.forward.__wrapped__,
    }
    packed = _packed_candidate(module)
    if packed is not None:
        functions["oneDNN packed (2x memory)"] = packed
    return functions


def candidate_rows(dtypes, token_counts, thread_counts, reps):
    dims = model_shape("mid")
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        model, olmoe = build_models(dims, "cpu", dtype)
        del olmoe
        module = model.model.layers[0].mlp.experts
        functions = candidate_functions(module)
        for tokens in token_counts:
            hidden = torch.randn(tokens, dims["hidden"], dtype=dtype)
            index = torch.stack([torch.randperm(dims["experts"])[: dims["top_k"]] for _ in range(tokens)])
            weights = torch.rand(tokens, dims["top_k"]).to(dtype)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                samples = {name: [] for name in functions}
                with torch.no_grad():
                    want = functions["eager"](module, hidden, index, weights).float()
                    error = {n: (f(module, hidden, index, weights).float() - want).abs().max().item()
                             for n, f in functions.items()}  # fmt: skip
                    for _ in range(reps):
                        order = list(functions)
                        random.shuffle(order)
                        for name in order:
                            start = time.perf_counter()
                            functions[name](module, hidden, index, weights)
                            samples[name].append(time.perf_counter() - start)
                ms = {name: median_ms(t) for name, t in samples.items()}
                row = {"dtype": dtype_name, "tokens": tokens, "threads": threads, "median_ms": ms,
                       "speedup_vs_grouped_mm": {n: ms["grouped_mm"] / ms[n] for n in ms},
                       "max_abs_error_vs_eager": error}  # fmt: skip
                rows.append(row)
                print(f"{dtype_name:<8} {tokens:>4} {threads:>3} | "
                      + " ".join(f"{n}={ms[n]:.2f}" for n in ms), flush=True)  # fmt: skip
        del model
    return rows


def summary(rows):
    """The issue's targets: at 96 tokens on the mid shape, auto >= 1.25x grouped_mm on 1 thread, >= 1.7x on 2."""
    found = {}
    for row in rows:
        if row["shape"] == "mid" and row["tokens"] == 96:
            found[(row["dtype"], row["threads"])] = row["speedup_vs_grouped_mm"]["auto"]
    return [
        {"dtype": dtype, "threads": threads, "speedup": speed, "target": {1: 1.25, 2: 1.7}.get(threads),
         "met": speed >= {1: 1.25, 2: 1.7}.get(threads, float("inf"))}
        for (dtype, threads), speed in sorted(found.items())
    ]  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=None, choices=["mid", "release"],
                        help="forward shapes (default: mid release; none: skip the forward table)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="default: 16 32 96 256 512")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=None, help="default: 7 (3 with --quick)")
    parser.add_argument("--candidates", action="store_true", help="also time the strategies on one mid layer")
    parser.add_argument("--quick", action="store_true",
                        help="96 tokens, the mid shape, 3 repetitions (where --tokens, --shapes, --reps are not given)")
    parser.add_argument("--out", default=None, help="JSON file for the results (none if unset)")
    args = parser.parse_args(argv)
    # --quick sets what was not given explicitly: `--quick --reps 15` runs 15 repetitions
    quick = args.quick
    args.shapes = args.shapes if args.shapes is not None else ["mid"] if quick else ["mid", "release"]
    args.tokens = args.tokens or ([96] if quick else [16, 32, 96, 256, 512])
    args.reps = args.reps if args.reps is not None else 3 if quick else 7
    if min(args.threads) < 1 or min(args.tokens) < 1 or args.reps < 1:
        parser.error("--threads, --tokens and --reps take positive numbers")

    random.seed(0)
    kernel = cpu_moe.load_kernel()
    if kernel is None:
        print("the CPU experts kernel did not build here: auto and auto (no kernel) run the same code")
    load_before = os.getloadavg()
    rows = []
    if args.shapes:
        print_forward_header()
        rows = forward_rows(args.shapes, args.dtypes, args.tokens, args.threads, args.reps)
    candidates = []
    if args.candidates:
        print("\none mid MoE layer, uniform random routing: median ms")
        candidates = candidate_rows(args.dtypes, args.tokens, args.threads, args.reps)
    targets = summary(rows)
    for target in targets:
        print(f"target at 96 tokens, mid, {target['dtype']}, {target['threads']} thread(s): "
              f"{target['speedup']:.2f}x grouped_mm (target {target['target']}x: "
              f"{'met' if target['met'] else 'NOT met'})")  # fmt: skip

    result = {
        "benchmark": "cpu_experts",
        "command": "python benchmarks/cpu_experts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git": git_state(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "kernel": {"library": os.path.basename(kernel.path), "dtypes": [str(d).removeprefix("torch.")
                                                                          for d in kernel.dtypes]} if kernel else None,
        "shapes": {name: model_shape(name) for name in set(args.shapes) | ({"mid"} if args.candidates else set())},
        "batch": 1,
        "reps": args.reps,
        "statistic": "median wall time; implementations interleaved in a random order each repetition",
        "forward": rows,
        "candidates": candidates,
        "targets": targets,
    }  # fmt: skip
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
