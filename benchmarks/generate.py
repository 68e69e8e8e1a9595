"""Diffusion generation speed of LLaDA-MoE through `model.generate()`: the exact reference sampler against the
fast decoders (confidence threshold, prefix cache, dual cache, threshold + dual), side by side in one run.

CPU (a mid-size random model: 4 layers, hidden 512, 64 experts top-8, vocab 4096; about 1-2 minutes):
    python benchmarks/generate.py --out /tmp/generate_cpu.json
GPU, the real LLaDA-MoE-7B-A1B shape (LLaDAMoEConfig defaults: 16 layers, hidden 2048, 64 experts of width 1024,
top-8, vocab 157184) with random bf16 weights built directly on the device:
    python benchmarks/generate.py --device cuda --real-shape --out /tmp/generate_cuda.json
Check the GPU path on a CPU with a shrunken real-shape model:
    python benchmarks/generate.py --real-shape --small

Random weights: the exact and cache modes use a fixed schedule (`steps`, so `max_new_tokens / steps` tokens per
forward whatever the weights predict); their time per denoising step is the figure to compare with the
weight-streaming floor of one forward on an H100 (about 4.7 ms at batch 1, benchmarks' reference notes
perf_anchors.md). Threshold modes commit as many tokens as clear the threshold, which depends on the weights:
the output layer is sharpened (`--sharpen`, default 25x) so that the random model makes confident predictions;
their tokens/forward are illustrative only, their ms per step are real.

Prints a table and writes JSON (machine, versions, shapes, dtype, settings, timings, ratios) to --out (nothing is
written without it: the committed results in benchmarks/results/ change only when named explicitly).
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
import transformers

import llada_moe_hf
from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM


H100_FLOOR_MS = 4.7  # one batch-1 forward of the real shape streams 14.07 GB of weights at 3.0 TB/s

MODES = {
    "exact": dict(cache_mode="none"),
    "threshold": dict(cache_mode="none", threshold=0.9),
    "prefix-cache": dict(cache_mode="prefix"),
    "dual-cache": dict(cache_mode="dual"),
    "threshold+dual": dict(cache_mode="dual", threshold=0.9),
}


def model_config(args) -> LLaDAMoEConfig:
    if args.real_shape and not args.small:
        dims = {}  # LLaDAMoEConfig defaults are the release's shape
    elif args.real_shape:  # the same code path, shrunken so that a CPU can run it
        dims = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=2, expert_intermediate_size=128,
                    vocab_size=8192)
    else:
        dims = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                    expert_intermediate_size=256, num_experts=64, num_experts_per_tok=8)
    if args.layers is not None:
        dims["num_hidden_layers"] = args.layers
    vocab = dims.get("vocab_size", LLaDAMoEConfig.vocab_size)
    layers = dims.get("num_hidden_layers", LLaDAMoEConfig.num_hidden_layers)
    return LLaDAMoEConfig(
        **dims,
        moe_layer_freq=[1] * layers,
        mask_token_id=vocab - 1,
        eos_token_id=vocab - 2,
        pad_token_id=vocab - 2,
        max_position_embeddings=max(8192, args.prompt_length + args.gen_length),
    )


def build_model(config, device: str, dtype: torch.dtype, args) -> LLaDAMoEForDiffusionLM:
    """Random weights created directly on the device in the target dtype (no float32 host copy of 7B params)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LLaDAMoEForDiffusionLM._from_config(
                config, dtype=dtype, attn_implementation=args.attn, experts_implementation=args.experts
            )
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(args.sharpen)
        # A trained model never predicts the mask token; a random one would, and the reference sampler then
        # leaves that position masked.
        model.lm_head.weight[config.mask_token_id].zero_()
    return model.eval()


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mode_kwargs(settings, args) -> dict:
    return dict(
        max_new_tokens=args.gen_length, block_length=args.block_length, steps=args.gen_length // args.tokens_per_step,
        stop_at_eos=False, return_dict_in_generate=True, **settings,
    )


def warm_up(model, prompt, settings, args):
    """One block (allocator, kernels, autotuning) before timing."""
    kwargs = mode_kwargs(settings, args)
    blocks = args.gen_length // args.block_length
    model.generate(prompt, **{**kwargs, "max_new_tokens": args.block_length, "steps": kwargs["steps"] // blocks})


def time_once(model, prompt, settings, args, device):
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(prompt, **mode_kwargs(settings, args))
    synchronize(device)
    return time.perf_counter() - start, out


def summarize(runs, prompt, args) -> dict:
    seconds = statistics.median(r[0] for r in runs)
    out = runs[0][1]
    tokens = prompt.shape[0] * args.gen_length
    return {
        "seconds": seconds,
        "seconds_all_runs": [r[0] for r in runs],
        "tokens_per_s": tokens / seconds,
        "forward_passes": out.nfe,
        "tokens_per_forward": out.tokens_per_forward.mean().item(),
        "ms_per_step": 1000 * seconds / out.nfe,
        "sequences": out.sequences,
    }


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real-shape", action="store_true", help="LLaDAMoEConfig defaults (the 7B release's shape)")
    parser.add_argument("--small", action="store_true", help="with --real-shape: shrink it to test on a CPU")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 with --real-shape, else float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--experts", default=None, help="experts implementation (default: the model's default)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=None, help="default 512 with --real-shape, else 128")
    parser.add_argument("--gen-length", type=int, default=None, help="default 256 with --real-shape, else 64")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--tokens-per-step", type=int, default=1, help="fixed schedule: steps = gen_length / this")
    parser.add_argument("--sharpen", type=float, default=25.0, help="scale of the random output layer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per mode (median); default 3 GPU, 1 CPU")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}")
    parser.add_argument("--out", "--json", dest="out", default=None, help="JSON file for the results (none if unset)")
    args = parser.parse_args(argv)

    big = args.real_shape and not args.small
    args.prompt_length = args.prompt_length or (512 if big else 128)
    args.gen_length = args.gen_length or (256 if big else 64)
    args.repeats = args.repeats or (3 if args.device.startswith("cuda") else 1)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.real_shape else torch.float32)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if args.gen_length % args.block_length or (args.gen_length // args.tokens_per_step) % (args.gen_length // args.block_length):
        parser.error("--gen-length must be a multiple of --block-length, and the steps a multiple of the blocks")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = model_config(args)
    start = time.perf_counter()
    model = build_model(config, args.device, dtype, args)
    build_seconds = time.perf_counter() - start
    prompt = torch.randint(0, config.vocab_size - 2, (args.batch_size, args.prompt_length), device=args.device)

    for name in modes:
        warm_up(model, prompt, MODES[name], args)
    runs = {name: [] for name in modes}
    for _ in range(args.repeats):  # round-robin, so that a busy machine slows every mode alike
        for name in modes:
            runs[name].append(time_once(model, prompt, MODES[name], args, args.device))
    results = {name: summarize(runs[name], prompt, args) for name in modes}
    exact = results.get("exact")

    shapes = {
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
        "experts": config.num_experts, "top_k": config.num_experts_per_tok,
        "expert_width": config.expert_intermediate_size, "vocab": config.vocab_size,
        "batch_size": args.batch_size, "prompt_length": args.prompt_length, "gen_length": args.gen_length,
        "block_length": args.block_length, "steps": args.gen_length // args.tokens_per_step,
    }
    title = f"LLaDA-MoE generate() on {args.device}, {model.dtype}, " + ", ".join(f"{k}={v}" for k, v in shapes.items())
    print(title)
    header = f"{'mode':<16}{'tokens/s':>10}{'fwd passes':>12}{'tok/fwd':>9}{'ms/step':>10}{'speedup':>9}{'same as exact':>15}"
    if args.real_shape or args.device.startswith("cuda"):
        header += f"{'x H100 floor':>14}"
    print(header)
    rows = {}
    for name, r in results.items():
        row = {k: v for k, v in r.items() if k != "sequences"}
        if exact is not None:
            row["speedup_vs_exact"] = r["tokens_per_s"] / exact["tokens_per_s"]
            row["fraction_tokens_equal_to_exact"] = (r["sequences"] == exact["sequences"]).float().mean().item()
        row["ms_per_step_over_h100_floor"] = r["ms_per_step"] / H100_FLOOR_MS
        rows[name] = row
        line = (
            f"{name:<16}{r['tokens_per_s']:>10.1f}{r['forward_passes']:>12d}{r['tokens_per_forward']:>9.2f}"
            f"{r['ms_per_step']:>10.2f}{row.get('speedup_vs_exact', float('nan')):>8.2f}x"
            f"{row.get('fraction_tokens_equal_to_exact', float('nan')):>15.2f}"
        )
        if args.real_shape or args.device.startswith("cuda"):
            line += f"{row['ms_per_step_over_h100_floor']:>13.2f}x"
        print(line)

    report = {
        "benchmark": "generate",
        "command": "python benchmarks/generate.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "machine": machine_info(args.device),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llada_moe_hf": llada_moe_hf.__version__,
        },
        "device": args.device,
        "dtype": str(model.dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": model.config._experts_implementation,
        "shapes": shapes,
        "real_shape": args.real_shape and not args.small,
        "threshold": 0.9,
        "sharpen": args.sharpen,
        "repeats": args.repeats,
        "model_build_seconds": build_seconds,
        "h100_floor_ms_per_forward": H100_FLOOR_MS,
        "results": rows,
    }
    path = args.out
    if not path:
        print("results not written (pass --out PATH to write the JSON)")
        return report
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
