"""Forward time of LLaDA-MoE (experts implementations eager and grouped_mm) against transformers'
OlmoeForCausalLM built with equal dimensions, measured side by side in one run and reported as ratios.

CPU (issue 2's mid-size config: 64 experts, top-8):
    python benchmarks/forward.py --out /tmp/forward_cpu.json
GPU, the real layer shape (hidden 2048, 64 experts of width 1024, top-8, 16 heads):
    python benchmarks/forward.py --device cuda --real-shape --out /tmp/forward_cuda.json

Prints a table and writes JSON (machine, versions, git commit, shapes, dtype, timings, ratios) to --out (nothing is written
without it: the committed results in benchmarks/results/ change only when named explicitly).
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import OlmoeConfig, OlmoeForCausalLM

from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from provenance import git_state, write_json


def shapes(real: bool, layers: int | None) -> dict:
    if real:
        dims = dict(hidden=2048, heads=16, experts=64, top_k=8, expert_width=1024, vocab=157184, layers=layers or 4)
    else:
        dims = dict(hidden=512, heads=8, experts=64, top_k=8, expert_width=256, vocab=4096, layers=layers or 4)
    return dims


def build_models(dims: dict, device: str, dtype: torch.dtype):
    common = dict(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        num_experts=dims["experts"],
        num_experts_per_tok=dims["top_k"],
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
    )
    llada_cfg = LLaDAMoEConfig(**common, expert_intermediate_size=dims["expert_width"], mask_token_id=2)
    olmoe_cfg = OlmoeConfig(**common, intermediate_size=dims["expert_width"])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of a large model
    try:
        with torch.device(device):
            llada = LLaDAMoEForDiffusionLM(llada_cfg).eval()
            olmoe = OlmoeForCausalLM(olmoe_cfg).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    # Comparable routing: random (not zero) router weights spread tokens over experts in both models.
    with torch.no_grad():
        for model in (llada, olmoe):
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0, 0.02)
    return llada, olmoe


def timed(fn, device: str, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--real-shape", action="store_true", help="the released layer shape (GPU)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on GPU by default")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", "--json", dest="out", default=None, help="JSON file for the results (none if unset)")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    reps = args.reps or (30 if args.device == "cuda" else 7)
    dims = shapes(args.real_shape, args.layers)
    torch.manual_seed(0)
    llada, olmoe = build_models(dims, args.device, dtype)

    candidates = {
        "llada_eager": (llada, "eager"),
        "llada_grouped_mm": (llada, "grouped_mm"),
        "olmoe_eager": (olmoe, "eager"),
        "olmoe_grouped_mm": (olmoe, "grouped_mm"),
    }
    rows = []
    for tokens in args.tokens:
        ids = torch.randint(3, dims["vocab"], (1, tokens), device=args.device)
        samples = {name: [] for name in candidates}
        with torch.no_grad():
            for name, (model, impl) in candidates.items():  # warm-up
                model.set_experts_implementation(impl)
                model(ids)
            # Interleave the candidates so that machine noise hits all of them alike.
            for _ in range(reps):
                for name, (model, impl) in candidates.items():
                    model.set_experts_implementation(impl)
                    samples[name] += timed(lambda: model(ids), args.device, 1)
        median_ms = {name: statistics.median(t) * 1e3 for name, t in samples.items()}
        rows.append(
            {
                "tokens": tokens,
                "median_ms": median_ms,
                "ratio_grouped_mm_vs_olmoe_grouped_mm": median_ms["llada_grouped_mm"] / median_ms["olmoe_grouped_mm"],
                "ratio_eager_vs_olmoe_eager": median_ms["llada_eager"] / median_ms["olmoe_eager"],
                "ratio_llada_best_vs_olmoe_best": min(median_ms["llada_eager"], median_ms["llada_grouped_mm"])
                / min(median_ms["olmoe_eager"], median_ms["olmoe_grouped_mm"]),
            }
        )

    result = {
        "benchmark": "forward",
        "command": " ".join(["python", "benchmarks/forward.py", *(argv if argv is not None else sys.argv[1:])]),
        "git": git_state(),
        "machine": machine(args.device),
        "device": args.device,
        "dtype": str(dtype).replace("torch.", ""),
        "shapes": dims,
        "batch": 1,
        "reps": reps,
        "statistic": "median wall time of one full forward (all layers + lm_head), candidates interleaved",
        "rows": rows,
    }
    print(f"# forward: {args.device} {result['dtype']} {dims} reps={reps}")
    print(f"# {result['machine']}")
    header = f"{'tokens':>6} | {'llada eager':>11} | {'llada gmm':>9} | {'olmoe eager':>11} | {'olmoe gmm':>9} | gmm ratio | eager ratio | best ratio"
    print(header)
    print("-" * len(header))
    for row in rows:
        m = row["median_ms"]
        print(
            f"{row['tokens']:>6} | {m['llada_eager']:>8.2f} ms | {m['llada_grouped_mm']:>6.2f} ms | "
            f"{m['olmoe_eager']:>8.2f} ms | {m['olmoe_grouped_mm']:>6.2f} ms | "
            f"{row['ratio_grouped_mm_vs_olmoe_grouped_mm']:>9.3f} | {row['ratio_eager_vs_olmoe_eager']:>11.3f} | "
            f"{row['ratio_llada_best_vs_olmoe_best']:>10.3f}"
        )
    print("ratio = LLaDA-MoE time / OLMoE time (below 1.10 meets the 'within 10%' target)")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
