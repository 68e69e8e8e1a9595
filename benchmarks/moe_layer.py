"""Benchmark of one LLaDA-MoE experts layer (E=64, top-8, H=2048, I=1024): eager vs grouped_mm vs fused_moe.

One run measures, side by side on the same device:
  * the device-to-device copy bandwidth (bytes read + written), the memory ceiling;
  * bf16 / fp16 / fp32 accuracy of fused_moe at the real shape against a float32 eager reference (fwd and grads);
  * (--tune) a sweep of tile configurations per token count, used for the rest of the run and written out so it
    can be copied into llada_moe_hf/fused_moe_configs_llada_moe.py;
  * time per layer, forward and forward+backward, for 8..4096 tokens, with effective bandwidth, TFLOP/s and the
    ratios fused_moe / grouped_mm; the grouped_mm and fused forwards also replayed from CUDA graphs (GPU time
    against GPU time), and the host time per call of each (where it exceeds the GPU time, eager timings
    measure Python and launches, not the kernels);
  * the routing step alone in one launch and in three (`align_routing(single_launch=...)`), eager, host and graph;
  * (--full) a full-size forward (16 layers, real dims, random bf16 weights) in ms per step at 64/256/1024 tokens
    against the weight-streaming floor, and whether the step captures into a CUDA graph.

    PYTHONPATH=. python benchmarks/moe_layer.py --tune --full --out benchmarks/results/moe_layer_h100.json

`--smoke` runs every code path at tiny sizes on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time


if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import transformers  # noqa: E402
from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM  # noqa: E402
from llada_moe_hf import fused_moe_llada_moe as fused  # noqa: E402
from llada_moe_hf.modeling_llada_moe import LLaDAMoEExperts  # noqa: E402
from provenance import git_state  # noqa: E402


try:
    import triton
except ImportError:
    triton = None


IMPLS = ("eager", "grouped_mm", "fused_moe")


# ----------------------------------------------------------------------------------------------- timing


def bench(fn, device, warmup_ms=25, rep_ms=100):
    """Median milliseconds per call (CUDA events through triton.testing.do_bench on GPU)."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def host_ms(fn, device, calls=20):
    """Milliseconds of host (Python + launch) time per call: calls are queued back to back without a sync, so the
    GPU never holds the host back. Where this is above the GPU time, eager timings measure the host."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) * 1e3 / calls)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return statistics.median(times)


def copy_bandwidth(device, nbytes):
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------- layer set-up


def make_layer(dims, dtype, device, seed=0):
    config = LLaDAMoEConfig(
        hidden_size=dims["H"], expert_intermediate_size=dims["I"], num_experts=dims["E"],
        num_experts_per_tok=dims["k"], num_attention_heads=16, num_key_value_heads=16,
    )  # fmt: skip
    config._experts_implementation = "eager"
    with torch.device(device):
        experts = LLaDAMoEExperts(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=gen).mul_(dims["H"] ** -0.5)
        experts.down_proj.normal_(generator=gen).mul_(dims["I"] ** -0.5)
    return experts.to(dtype)


def make_inputs(num_tokens, dims, dtype, device, seed=1):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, dims["H"], device=device, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, dims["E"], device=device, generator=gen)
    weights, index = torch.topk(torch.softmax(logits, -1), dims["k"], dim=-1)
    return x, index, weights.to(dtype)


def run_layer(experts, impl, x, index, weights):
    experts.config._experts_implementation = impl
    return experts(x, index, weights)


def fwd_bwd(experts, impl, x, index, weights, grad_out):
    x = x.detach().requires_grad_(True)
    weights = weights.detach().requires_grad_(True)
    out = run_layer(experts, impl, x, index, weights)
    params = [x, weights, experts.gate_up_proj, experts.down_proj]
    return out, torch.autograd.grad(out, params, grad_out)


def norm_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


# ----------------------------------------------------------------------------------------------- accuracy


def accuracy(dims, device, num_tokens):
    """fused_moe (and grouped_mm) in each dtype against eager in float32 on the same rounded inputs."""
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        experts = make_layer(dims, dtype, device)
        x, index, weights = make_inputs(num_tokens, dims, dtype, device)
        grad_out = torch.randn_like(x)
        ref_layer = make_layer(dims, dtype, device).float()
        ref_out, ref_grads = fwd_bwd(ref_layer, "eager", x.float(), index, weights.float(), grad_out.float())
        del ref_layer
        for impl in ("grouped_mm", "fused_moe"):
            if impl == "grouped_mm" and dtype != torch.bfloat16 and device.type == "cuda":
                continue  # torch's CUDA grouped GEMM is bf16-only
            out, grads = fwd_bwd(experts, impl, x, index, weights, grad_out)
            names = ("x", "routing_weights", "gate_up_proj", "down_proj")
            row = {"dtype": str(dtype).split(".")[-1], "impl": impl, "tokens": num_tokens}
            row["out"] = norm_err(out, ref_out)
            row.update({f"grad_{n}": norm_err(g, r) for n, g, r in zip(names, grads, ref_grads)})
            rows.append(row)
            errors = ", ".join(f"{k}={v:.2e}" for k, v in row.items() if k not in ("dtype", "impl", "tokens"))
            print(f"  accuracy {row['dtype']:>8} {impl:>10}: {errors}")
        del experts
    return rows


# ----------------------------------------------------------------------------------------------- tuning


def tune_candidates(num_tokens):
    if num_tokens <= 64:
        block_ms = (16,)
    elif num_tokens <= 256:
        block_ms = (16, 32)
    elif num_tokens <= 1024:
        block_ms = (32, 64)
    else:
        block_ms = (64, 128)
    gemms = [
        {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
        for bn in (64, 128)
        for bk in (64, 128, 256)
        for (w, s) in ((4, 3), (4, 5), (8, 4))
    ]
    return block_ms, gemms


def tune(dims, device, token_counts, smoke=False):
    """Per token count: the fastest gate_up and down tiles for each BLOCK_M, then the BLOCK_M with the least sum."""
    experts = make_layer(dims, torch.bfloat16, device)
    table, sweep = {}, []
    for num_tokens in token_counts:
        x, index, weights = make_inputs(num_tokens, dims, torch.bfloat16, device)
        block_ms, gemms = tune_candidates(num_tokens)
        if smoke:
            block_ms, gemms = block_ms[:1], [{"BLOCK_N": 32, "BLOCK_K": 32}]
        best = None
        for block_m in block_ms:
            sorted_ids, block_expert, _, _ = fused.align_routing(index, dims["E"], block_m)
            routing = weights.reshape(-1).contiguous()
            h = torch.randn(sorted_ids.numel(), dims["I"], device=device).to(torch.bfloat16)
            chosen = {}
            for kernel in ("gate_up", "down"):
                timings = []
                for gemm in gemms:
                    config = {"BLOCK_M": block_m, "gate_up": gemm, "down": gemm}
                    if kernel == "gate_up":
                        args = (x, experts.gate_up_proj, sorted_ids, block_expert, dims["k"], config, False)
                        launch = fused._launch_gate_up
                    else:
                        args = (h, experts.down_proj, routing, sorted_ids, block_expert, index.numel(), config)
                        launch = fused._launch_down
                    fn = lambda: launch(*args)  # noqa: E731
                    try:
                        ms = bench(fn, device, warmup_ms=5, rep_ms=25)
                    except Exception as err:  # e.g. a tile needing more shared memory than the GPU has
                        print(f"  skip {kernel} BM={block_m} {gemm}: {type(err).__name__}")
                        continue
                    timings.append((ms, gemm))
                    sweep.append({"tokens": num_tokens, "kernel": kernel, "BLOCK_M": block_m, **gemm, "ms": ms})
                chosen[kernel] = min(timings, key=lambda t: t[0])
            total = chosen["gate_up"][0] + chosen["down"][0]
            if best is None or total < best[0]:
                best = (total, {"BLOCK_M": block_m, "gate_up": chosen["gate_up"][1], "down": chosen["down"][1]})
        table[num_tokens] = best[1]
        print(f"  tuned T={num_tokens}: {best[1]} ({best[0]:.3f} ms for both GEMMs)")
    return table, sweep


# ----------------------------------------------------------------------------------------------- layer benchmark


def layer_bytes_flops(dims, index, num_tokens):
    touched = torch.unique(index).numel()
    weight_bytes = touched * 3 * dims["H"] * dims["I"] * 2
    act_bytes = 2 * num_tokens * dims["H"] * 2
    flops = 2 * index.numel() * 3 * dims["H"] * dims["I"]
    return weight_bytes + act_bytes, flops, touched


def layer_benchmark(dims, device, token_counts, copy_gbs, with_backward=True):
    experts = make_layer(dims, torch.bfloat16, device)
    rows = []
    for num_tokens in token_counts:
        x, index, weights = make_inputs(num_tokens, dims, torch.bfloat16, device)
        grad_out = torch.randn_like(x)
        nbytes, flops, touched = layer_bytes_flops(dims, index, num_tokens)
        row = {"tokens": num_tokens, "experts_touched": touched, "bytes": nbytes, "flops_fwd": flops}
        with torch.no_grad():
            ref = run_layer(experts, "eager", x, index, weights)
            for impl in IMPLS:
                out = run_layer(experts, impl, x, index, weights)
                row[f"{impl}_err_vs_eager"] = norm_err(out, ref)
                row[f"{impl}_fwd_ms"] = bench(lambda: run_layer(experts, impl, x, index, weights), device)
            for impl in ("grouped_mm", "fused_moe"):
                row[f"{impl}_host_ms"] = host_ms(lambda: run_layer(experts, impl, x, index, weights), device)
            if device.type == "cuda":
                for impl in ("grouped_mm", "fused_moe"):
                    row[f"{impl}_graph_fwd_ms"] = graph_forward_ms(experts, impl, x, index, weights, ref)
            block_m = fused.get_config(num_tokens, dims["E"], dims["H"], dims["I"], dims["k"], device)["BLOCK_M"]
            row.update(align_timings(index, dims["E"], block_m, device))
        if with_backward:
            for impl in IMPLS:
                row[f"{impl}_fwdbwd_ms"] = bench(lambda: fwd_bwd(experts, impl, x, index, weights, grad_out), device)
        fwd = row["fused_moe_fwd_ms"]
        row["fused_moe_fwd_GBps"] = nbytes / (fwd * 1e-3) / 1e9
        row["fused_moe_fwd_frac_copy_bw"] = row["fused_moe_fwd_GBps"] / copy_gbs
        row["fused_moe_fwd_TFLOPs"] = flops / (fwd * 1e-3) / 1e12
        row["fwd_speedup_vs_grouped_mm"] = row["grouped_mm_fwd_ms"] / fwd
        if row.get("fused_moe_graph_fwd_ms"):
            row["fused_moe_graph_frac_copy_bw"] = nbytes / (row["fused_moe_graph_fwd_ms"] * 1e-3) / 1e9 / copy_gbs
            if row.get("grouped_mm_graph_fwd_ms"):  # both replayed from CUDA graphs: GPU time against GPU time
                gmm_graph, fused_graph = row["grouped_mm_graph_fwd_ms"], row["fused_moe_graph_fwd_ms"]
                row["graph_speedup_vs_grouped_mm_graph"] = gmm_graph / fused_graph
        if with_backward:
            row["fwdbwd_speedup_vs_grouped_mm"] = row["grouped_mm_fwdbwd_ms"] / row["fused_moe_fwdbwd_ms"]
            row["fused_moe_fwdbwd_TFLOPs"] = 3 * flops / (row["fused_moe_fwdbwd_ms"] * 1e-3) / 1e12
        rows.append(row)
        print_layer_row(row)
    experts.config._experts_implementation = "eager"
    return rows


def graph_forward_ms(experts, impl, x, index, weights, ref):
    """The forward of `impl` captured in a CUDA graph (checks it is capturable and gives the same output)."""
    experts.config._experts_implementation = impl
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            experts(x, index, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = experts(x, index, weights)
    except Exception as err:
        print(f"  CUDA graph capture of {impl} failed: {type(err).__name__}: {err}")
        return None
    graph.replay()
    torch.cuda.synchronize()
    assert norm_err(out, ref) < 1e-2
    return bench(graph.replay, x.device)


def align_timings(index, num_experts, block_m, device):
    """The routing step alone, in one launch and in three: eager-launch time, host time, and (CUDA) graph time."""
    row = {}
    for name, single in (("align_one_launch", True), ("align_three_launches", False)):
        fn = lambda: fused.align_routing(index, num_experts, block_m, single_launch=single)  # noqa: E731
        row[f"{name}_ms"] = bench(fn, device)
        row[f"{name}_host_ms"] = host_ms(fn, device)
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                fn()
            row[f"{name}_graph_ms"] = bench(graph.replay, device)
    row["align_one_launch_default"] = index.numel() <= fused.SINGLE_LAUNCH_MAX_PAIRS
    return row


def print_layer_row(row):
    cols = [f"T={row['tokens']:>5}"]
    for impl in IMPLS:
        cols.append(f"{impl} {row[f'{impl}_fwd_ms']:.3f}")
    if row.get("fused_moe_graph_fwd_ms"):
        cols.append(f"graph {row['fused_moe_graph_fwd_ms']:.3f}")
    if row.get("graph_speedup_vs_grouped_mm_graph"):
        cols.append(f"graph vs gmm graph x{row['graph_speedup_vs_grouped_mm_graph']:.2f}")
    cols.append(f"host gmm/fused {row['grouped_mm_host_ms']:.3f}/{row['fused_moe_host_ms']:.3f}")
    cols.append(
        f"x{row['fwd_speedup_vs_grouped_mm']:.2f} vs gmm, {100 * row['fused_moe_fwd_frac_copy_bw']:.0f}% copy bw, "
        f"{row['fused_moe_fwd_TFLOPs']:.0f} TF/s"
    )
    if "fused_moe_fwdbwd_ms" in row:
        times = " / ".join(f"{row[f'{impl}_fwdbwd_ms']:.3f}" for impl in IMPLS)
        cols.append(f"fwd+bwd {times} x{row['fwdbwd_speedup_vs_grouped_mm']:.2f}")
    print("  " + " | ".join(cols), flush=True)


# ----------------------------------------------------------------------------------------------- full forward


def full_forward(device, token_counts, copy_gbs, smoke=False):
    if smoke:
        config = LLaDAMoEConfig(
            vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, moe_layer_freq=[1, 1],
            pad_token_id=90, eos_token_id=90, mask_token_id=95,
        )  # fmt: skip
    else:
        config = LLaDAMoEConfig()  # the release's dimensions
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LLaDAMoEForDiffusionLM(config).eval()
    torch.set_default_dtype(previous)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_bytes = model.model.embed_tokens.weight.numel() * 2  # a row gather, not streamed
    expert_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if ".experts." in n)
    rows = []
    for num_tokens in token_counts:
        ids = torch.randint(0, config.vocab_size - 8, (1, num_tokens), device=device)
        routed = min(1.0, 1 - (1 - config.num_experts_per_tok / config.num_experts) ** num_tokens)
        floor_bytes = param_bytes - embed_bytes - expert_bytes * (1 - routed)
        row = {"tokens": num_tokens, "floor_ms": floor_bytes / (copy_gbs * 1e9) * 1e3, "floor_bytes": floor_bytes}
        with torch.no_grad():
            for impl in ("grouped_mm", "fused_moe"):
                model.set_experts_implementation(impl)
                row[f"{impl}_ms"] = bench(lambda: model(ids), device, warmup_ms=50, rep_ms=300)
            if device.type == "cuda":
                row.update(full_forward_graph(model, ids))
        row["fused_over_floor"] = row["fused_moe_ms"] / row["floor_ms"]  # eager launches (Python-bound)
        if row.get("fused_moe_graph_ms"):
            row["fused_graph_over_floor"] = row["fused_moe_graph_ms"] / row["floor_ms"]
        rows.append(row)
        shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"  full forward T={num_tokens}: {shown}", flush=True)
    del model
    return rows


def full_forward_graph(model, ids):
    model.set_experts_implementation("fused_moe")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            ref = model(ids).logits
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad(), torch.cuda.graph(graph):
            out = model(ids).logits
    except Exception as err:
        return {"cuda_graph": False, "cuda_graph_error": f"{type(err).__name__}: {str(err)[:300]}"}
    graph.replay()
    torch.cuda.synchronize()
    return {
        "cuda_graph": True,
        "cuda_graph_max_abs_diff": (out.float() - ref.float()).abs().max().item(),
        "fused_moe_graph_ms": bench(graph.replay, ids.device, warmup_ms=50, rep_ms=300),
    }


# ----------------------------------------------------------------------------------------------- main


def environment(device):
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": getattr(triton, "__version__", None),
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), sms=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["device"] = "cpu (Triton interpreter)"
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="sweep tile configurations first and use the winners")
    parser.add_argument("--full", action="store_true", help="also time a full-size 16-layer forward")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--tokens", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--tune-tokens", type=int, nargs="*", default=[16, 64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    device = torch.device("cpu" if args.smoke else "cuda")
    dims = {"E": 8, "k": 2, "H": 64, "I": 32} if args.smoke else {"E": 64, "k": 8, "H": 2048, "I": 1024}
    tokens = [4, 16] if args.smoke else args.tokens
    results = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "git": git_state()}
    results["environment"] = environment(device)
    results["shape"] = {**dims, "dtype": "bfloat16 (timings)"}
    print(json.dumps(results["environment"]), flush=True)

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, args.out)

    def section(name, fn):
        """Run one part; a failure is recorded and the other parts still run."""
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - report and go on, the JSON says what failed
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
        save()

    results["copy_GBps"] = copy_gbs = copy_bandwidth(device, 1 << 20 if args.smoke else 2 << 30)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    print("accuracy (norm-wise relative error vs float32 eager):", flush=True)
    section("accuracy", lambda: accuracy(dims, device, 16 if args.smoke else 256))

    if args.tune:
        print("tuning:", flush=True)

        def run_tune():
            table, sweep = tune(dims, device, [4] if args.smoke else args.tune_tokens, smoke=args.smoke)
            results["tune_sweep"] = sweep
            if device.type == "cuda":  # use the winners for the rest of this run
                name = torch.cuda.get_device_name(device)
                shape_key = f"E={dims['E']},H={dims['H']},I={dims['I']}"
                fused.FUSED_MOE_CONFIGS.setdefault(name, {})[shape_key] = table
            return {str(k): v for k, v in table.items()}

        section("tuned_configs", run_tune)

    print("layer (ms per call, bf16):", flush=True)
    section("layer", lambda: layer_benchmark(dims, device, tokens, copy_gbs, with_backward=not args.no_backward))
    if args.full:
        print("full forward (ms per step, batch 1, bf16):", flush=True)
        full_tokens = [16, 32] if args.smoke else [64, 256, 1024]
        section("full_forward", lambda: full_forward(device, full_tokens, copy_gbs, args.smoke))
    print("done", flush=True)


if __name__ == "__main__":
    main()
