"""Diffusion generation speed of LLaDA-MoE through `model.generate()`: the sampler's modes (exact reference
schedule, confidence threshold, prefix / dual KV cache), each on the plain (eager) path and on the static,
compiled path (`cache_implementation="static"`), side by side in one run.

Models (`--model`):
  * tiny: the embedded trained model (llada_moe_hf/assets/tiny) answering held-out questions of its task, so
    that threshold decoding commits what a trained model is sure of;
  * mid: a random mid-size model (4 layers, hidden 512, 64 experts of width 256, top-8, vocab 4096);
  * real: the LLaDA-MoE-7B-A1B shape (16 layers, hidden 2048, 64 experts of width 1024, top-8, vocab 157184)
    with random bf16 weights built on the device; `real-small` shrinks it to check the code path on a CPU.

Commands (each prints a table and writes JSON to --out; without --out nothing is written):
    python benchmarks/generate.py --model tiny --batch-sizes 1,64 --out /tmp/generate_tiny.json
    python benchmarks/generate.py --model mid --out /tmp/generate_mid.json
    python benchmarks/generate.py --device cuda --model real --prompt-length 512 --gen-length 1024 \\
        --block-lengths 32,64 --tokens-per-step 4 --modes exact,dual-cache --experts grouped_mm,fused_moe \\
        --batch-sizes 1,8,32 --out $OUT/generate_cuda_h100.json

Random weights: the fixed-schedule modes commit `--tokens-per-step` tokens per forward whatever the weights
predict, so their time per step is the figure to compare with the weight-streaming floor of one forward (about
4.7 ms on an H100 at batch 1, shared/reference/perf_anchors.md). Threshold modes commit what clears the threshold,
which depends on the weights: a random model's output layer is sharpened (`--sharpen`) so that it makes confident
predictions; their tokens per forward then only illustrate the mechanism (their ms per step are real).
"Same tokens as eager" compares the static path with the eager path of the same mode: it must be 1.00. The cache
modes are approximations of the exact sampler; on a random model how many of their tokens equal the exact mode's
says nothing about a cache's quality (modeling_tests/test_decoding.py checks that on the trained model).
"""

import argparse
import itertools
import os
import platform
import statistics
import time

import torch
import transformers

import llada_moe_hf
from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from provenance import git_state, write_json


H100_FLOOR_MS = 4.7  # one batch-1 forward of the real shape streams 14.07 GB of weights at 3.0 TB/s

MODES = {
    "exact": dict(cache_mode="none"),
    "threshold": dict(cache_mode="none", threshold=0.9),
    "prefix-cache": dict(cache_mode="prefix"),
    "dual-cache": dict(cache_mode="dual"),
    "threshold+dual": dict(cache_mode="dual", threshold=0.9),
}
IMPLEMENTATIONS = {"eager": {}, "static": dict(cache_implementation="static")}
STAND_IN = "stand_in"  # --experts value: not the model's experts, a timing device (see register_stand_in)


def register_stand_in():
    """An experts implementation that costs nearly nothing (each token scaled by its routing weights' sum): rows
    with it time everything but the experts. Its tokens are not the model's; eager and static still agree."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(STAND_IN, lambda self, hidden, index, weights: hidden * weights.sum(-1, keepdim=True))


def model_config(args) -> LLaDAMoEConfig:
    if args.model == "real":
        dims = {}  # LLaDAMoEConfig defaults are the release's shape
    elif args.model == "real-small":  # the same code path, shrunken so that a CPU can run it
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
        max_position_embeddings=max(8192, args.prompt_length + args.gen_length + 64),
    )


def build_random_model(config, args, dtype) -> LLaDAMoEForDiffusionLM:
    """Random weights created directly on the device in the target dtype (no float32 host copy of 7B params)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = LLaDAMoEForDiffusionLM._from_config(config, dtype=dtype, attn_implementation=args.attn)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(args.sharpen)
        # A trained model never predicts the mask token; a random one would, and the fixed schedule then leaves
        # that position masked.
        model.lm_head.weight[config.mask_token_id].zero_()
    return model.eval()


def tiny_model_and_prompts(args, batch_sizes):
    """The embedded model and left-padded batches of held-out questions (chat template), one per batch size."""
    from transformers import AutoTokenizer

    from llada_moe_hf.demo import TINY_ASSET_DIR, chat_prompt, held_out_questions

    model = LLaDAMoEForDiffusionLM.from_pretrained(TINY_ASSET_DIR, attn_implementation=args.attn).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(TINY_ASSET_DIR, config=model.config, trust_remote_code=False)
    questions = held_out_questions(max(batch_sizes), seed=77)
    prompts = {}
    for batch_size in batch_sizes:
        texts = [chat_prompt(tokenizer, *q) for q in questions[:batch_size]]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        prompts[batch_size] = {k: v.to(args.device) for k, v in encoded.items()}
    ids = dict(
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|role_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval(), prompts, ids


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate_kwargs(mode, implementation, block_length, args, ids) -> dict:
    kwargs = dict(
        max_new_tokens=args.gen_length, block_length=block_length, stop_at_eos=args.stop_at_eos,
        return_dict_in_generate=True, **ids, **MODES[mode], **IMPLEMENTATIONS[implementation],
    )
    if "threshold" not in MODES[mode]:
        kwargs["steps"] = args.gen_length // args.tokens_per_step
    return kwargs


def timed_generate(model, prompt, kwargs, device):
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(**prompt, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, out


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def split(value: str, kind=str) -> list:
    return [kind(v.strip()) for v in value.split(",") if v.strip()]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "mid", "real", "real-small"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (random models)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 for real shapes, else float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--experts", default=None,
                        help="comma-separated experts implementations to compare (default: the model's default); "
                        f"'{STAND_IN}' replaces the experts by a nearly free stand-in, to time the rest of the step")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,8,32")
    parser.add_argument("--prompt-length", type=int, default=None, help="random models: default 512 real, else 128")
    parser.add_argument("--gen-length", type=int, default=None, help="default 16 tiny, 1024 real, else 64")
    parser.add_argument("--block-lengths", default=None, help="comma-separated (default 8 tiny, else 32)")
    parser.add_argument("--tokens-per-step", type=int, default=1, help="fixed schedule: steps = gen_length / this")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {list(MODES)} (default: all)")
    parser.add_argument("--implementations", default="eager,static", help="comma-separated: eager, static")
    parser.add_argument("--sharpen", type=float, default=25.0, help="random models: scale of the output layer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                        help="tiny model: keep decoding after the answer (every block, the loop's steady state)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, round-robin (median)")
    parser.add_argument("--out", "--json", dest="out", default=None,
                        help="where to write the JSON, e.g. /tmp/generate.json (none if unset)")
    args = parser.parse_args(argv)
    args.stop_at_eos = args.stop_at_eos and args.model == "tiny"  # random models have no answer to end
    args.gen_length = args.gen_length or {"tiny": 16, "real": 1024}.get(args.model, 64)
    args.prompt_length = args.prompt_length or (512 if args.model == "real" else 128)
    args.block_lengths = split(args.block_lengths or ("8" if args.model == "tiny" else "32"), int)
    args.batch_sizes = split(args.batch_sizes, int)
    args.modes = split(args.modes or ",".join(MODES))
    args.implementations = split(args.implementations)
    args.experts = split(args.experts) if args.experts else [None]
    if STAND_IN in args.experts:
        register_stand_in()
    for name, allowed in (("modes", MODES), ("implementations", IMPLEMENTATIONS)):
        unknown = [v for v in getattr(args, name) if v not in allowed]
        if unknown:
            parser.error(f"unknown {name} {unknown}; choose from {list(allowed)}")
    for block_length in args.block_lengths:
        steps = args.gen_length // args.tokens_per_step
        if args.gen_length % block_length or steps % (args.gen_length // block_length):
            parser.error(f"--gen-length {args.gen_length} must be a multiple of the block length {block_length}, "
                         "and the steps (gen_length / tokens_per_step) a multiple of the number of blocks")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)  # before the run: its load average is the one at the start
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.model == "tiny":
        model, prompts, ids = tiny_model_and_prompts(args, args.batch_sizes)
    else:
        dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if args.model.startswith("real") else torch.float32)
        config = model_config(args)
        model = build_random_model(config, args, dtype)
        ids = dict(mask_token_id=config.mask_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id)
        prompts = {b: {"input_ids": torch.randint(0, config.vocab_size - 2, (b, args.prompt_length),
                                                  device=args.device)} for b in args.batch_sizes}
    build_seconds = time.perf_counter() - start

    rows = list(itertools.product(args.experts, args.batch_sizes, args.block_lengths, args.modes,
                                  args.implementations))
    warmup = {}
    for experts, batch, block, mode, implementation in rows:
        # The first call compiles the static path's graphs: its time is the compile cost, reported apart.
        if experts is not None:
            model.set_experts_implementation(experts)
        seconds, _ = timed_generate(model, prompts[batch], generate_kwargs(mode, implementation, block, args, ids),
                                    args.device)
        warmup[(experts, batch, block, mode, implementation)] = seconds
    runs = {row: [] for row in rows}
    for _ in range(args.repeats):  # round-robin, so that a busy machine slows every row alike
        for row in rows:
            experts, batch, block, mode, implementation = row
            if experts is not None:
                model.set_experts_implementation(experts)
            runs[row].append(timed_generate(model, prompts[batch],
                                            generate_kwargs(mode, implementation, block, args, ids), args.device))

    results = []
    for row in rows:
        experts, batch, block, mode, implementation = row
        seconds = statistics.median(r[0] for r in runs[row])
        out = runs[row][0][1]
        eager = runs.get((experts, batch, block, mode, "eager"))
        result = {
            "experts": experts or model.config._experts_implementation,
            "batch_size": batch,
            "block_length": block,
            "mode": mode,
            "implementation": implementation,
            "seconds": seconds,
            "seconds_all_runs": [r[0] for r in runs[row]],
            "first_call_seconds": warmup[row],
            "tokens_per_s": batch * args.gen_length / seconds,
            "forward_passes": out.nfe,
            "tokens_per_forward": out.tokens_per_forward.mean().item(),
            "ms_per_step": 1000 * seconds / out.nfe,
        }
        if eager is not None:
            eager_seconds = statistics.median(r[0] for r in eager)
            result["speedup_vs_eager"] = eager_seconds / seconds
            result["same_tokens_as_eager"] = (out.sequences == eager[0][1].sequences).float().mean().item()
        if args.model.startswith("real"):
            result["ms_per_step_over_h100_floor"] = result["ms_per_step"] / H100_FLOOR_MS
        results.append(result)

    title = (f"LLaDA-MoE generate() on {args.device}, {args.model} model, {model.dtype}, prompt "
             f"{'questions' if args.model == 'tiny' else args.prompt_length}, {args.gen_length} new tokens, "
             f"{args.tokens_per_step} token(s)/step for the fixed schedule, threads {torch.get_num_threads()}")
    print(title)
    header = (f"{'experts':<11}{'batch':>6}{'block':>6} {'mode':<15}{'path':<7}{'tok/s':>9}{'fwd':>6}{'tok/fwd':>8}"
              f"{'ms/step':>9}{'vs eager':>9}{'same':>6}{'1st call s':>11}")
    if args.model.startswith("real"):
        header += f"{'x floor':>8}"
    print(header)
    for r in results:
        line = (f"{r['experts']:<11}{r['batch_size']:>6}{r['block_length']:>6} {r['mode']:<15}{r['implementation']:<7}"
                f"{r['tokens_per_s']:>9.1f}{r['forward_passes']:>6d}{r['tokens_per_forward']:>8.2f}"
                f"{r['ms_per_step']:>9.2f}{r.get('speedup_vs_eager', float('nan')):>8.2f}x"
                f"{r.get('same_tokens_as_eager', float('nan')):>6.2f}{r['first_call_seconds']:>11.1f}")
        if args.model.startswith("real"):
            line += f"{r['ms_per_step_over_h100_floor']:>7.2f}x"
        print(line)

    report = {
        "benchmark": "generate",
        "command": "python benchmarks/generate.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "git": git_state(),
        "machine": machine,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llada_moe_hf": llada_moe_hf.__version__,
        },
        "device": args.device,
        "model": args.model,
        "dtype": str(model.dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "shapes": {
            "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
            "experts": model.config.num_experts, "top_k": model.config.num_experts_per_tok,
            "expert_width": model.config.expert_intermediate_size, "vocab": model.config.vocab_size,
            "prompt_length": None if args.model == "tiny" else args.prompt_length, "gen_length": args.gen_length,
            "tokens_per_step_fixed_schedule": args.tokens_per_step,
        },
        "threshold": 0.9,
        "stop_at_eos": args.stop_at_eos,
        "sharpen": None if args.model == "tiny" else args.sharpen,
        "repeats": args.repeats,
        "model_build_seconds": build_seconds,
        "h100_floor_ms_per_forward": H100_FLOOR_MS,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
