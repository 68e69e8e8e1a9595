"""Tensor-parallel attention plans side by side: q/k/v gathered after each projection ("gather", the plan of the
first release: colwise_gather_output + rowwise_split_input) against q/k/v kept sharded by heads ("local", the
current plan: colwise + rowwise, qk-norm run on the local heads).

Both plans run in the same processes on the same random model (float32), interleaved, on CPU processes joined
by gloo (`--world-size` processes, one torch thread each). CPU + gloo is a relative measure only: it counts the
same collectives and the same per-rank work as GPUs would, but neither the speed of NCCL links nor GPU kernels.
Each plan's logits are also compared with one process's.

    python benchmarks/tp_attention_plan.py --out /tmp/tp_attention_plan.json

Prints a table and writes JSON (machine, load, versions, shapes, dtype, git commit, timings) to --out.
"""

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from provenance import git_state, write_json


ATTENTION = "model.layers.*.self_attn"
EXPERTS = {
    "model.layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "model.layers.*.mlp.experts.down_proj": "rowwise",
    "model.layers.*.mlp.experts": "moe_tp_experts",
    "lm_head": "colwise_gather_output",
}
# Whole plans (transformers < 5.19 replaces the model's plan with the one given; later versions merge them).
PLANS = {
    "gather": {
        **{f"{ATTENTION}.{p}_proj": "colwise_gather_output" for p in "qkv"},
        f"{ATTENTION}.o_proj": "rowwise_split_input",
        **EXPERTS,
    },
    "local": {
        **{f"{ATTENTION}.{p}_proj": "colwise" for p in "qkv"},
        f"{ATTENTION}.q_norm": "replicated_with_grad_allreduce",
        f"{ATTENTION}.k_norm": "replicated_with_grad_allreduce",
        f"{ATTENTION}.o_proj": "rowwise",
        **EXPERTS,
    },
}


def build_model(args, folder: Path):
    from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM

    config = LLaDAMoEConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, num_experts=args.experts,
        num_experts_per_tok=args.top_k, expert_intermediate_size=args.expert_width, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=1, mask_token_id=2,
    )
    torch.manual_seed(0)
    LLaDAMoEForDiffusionLM(config).save_pretrained(folder)


def worker(rank, world_size, port, folder, args, out_file):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=600))
    from transformers.distributed import DistributedConfig

    from llada_moe_hf import LLaDAMoEForDiffusionLM

    models = {
        name: LLaDAMoEForDiffusionLM.from_pretrained(
            folder, distributed_config=DistributedConfig(tp_size=world_size, tp_plan=dict(plan))
        )
        for name, plan in PLANS.items()
    }
    reference = LLaDAMoEForDiffusionLM.from_pretrained(folder) if rank == 0 else None
    collectives = {name: count_collectives(model, args) for name, model in models.items()}
    rows = []
    for tokens in args.tokens:
        ids = torch.randint(3, args.vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        labels = ids.clone()
        for mode in args.modes:
            samples = {name: [] for name in models}
            errors = {}
            for repeat in range(args.warmup + args.repeats):
                # Alternate the order so that drifting machine load hits both plans alike.
                order = list(models) if repeat % 2 == 0 else list(models)[::-1]
                for name in order:
                    elapsed = timed_step(models[name], ids, labels, mode)
                    if repeat >= args.warmup:
                        samples[name].append(elapsed)
            if mode == "forward":
                with torch.no_grad():
                    expected = reference(ids).logits if rank == 0 else None
                    for name, model in models.items():
                        logits = model(ids).logits
                        if rank == 0:
                            errors[name] = (logits - expected).abs().max().item()
            rows.append({
                "tokens": tokens,
                "mode": mode,
                "median_ms": {name: statistics.median(t) * 1e3 for name, t in samples.items()},
                "min_ms": {name: min(t) * 1e3 for name, t in samples.items()},
                "samples_ms": {name: [x * 1e3 for x in t] for name, t in samples.items()},
                "max_abs_diff_vs_one_process": errors or None,
            })
    if rank == 0:
        Path(out_file).write_text(json.dumps({"rows": rows, "collectives_per_forward": collectives}))
    dist.destroy_process_group()


def count_collectives(model, args) -> dict:
    """gloo collectives one forward launches (noise-free, unlike the timings), from the profiler's events."""
    ids = torch.randint(3, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(ids)
    names = [event.name for event in profile.events()]
    return {kind: names.count(f"gloo:{kind}") for kind in ("all_gather", "all_reduce")}


def timed_step(model, ids, labels, mode) -> float:
    """Wall time of one step, the slowest rank's (every rank waits for the others at the end anyway)."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            model(ids)
    else:
        model.zero_grad(set_to_none=True)
        model(ids, labels=labels, p_mask=torch.ones(1)).loss.backward()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    parser.add_argument("--world-size", type=int, default=2, help="tensor-parallel processes (gloo)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--modes", nargs="+", default=["forward", "forward+backward"],
                        choices=["forward", "forward+backward"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-width", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tp-plan-") as tmp:
        folder = Path(tmp) / "model"
        build_model(args, folder)
        out_file = Path(tmp) / "rows.json"
        mp.spawn(worker, args=(args.world_size, free_port(), str(folder), args, str(out_file)),
                 nprocs=args.world_size)
        measured = json.loads(out_file.read_text())
    rows = measured["rows"]
    for row in rows:
        row["gather_over_local"] = row["median_ms"]["gather"] / row["median_ms"]["local"]
        row["gather_over_local_min"] = row["min_ms"]["gather"] / row["min_ms"]["local"]

    shapes = {key: getattr(args, key) for key in
              ("layers", "hidden", "heads", "experts", "expert_width", "top_k", "vocab")}
    result = {
        "benchmark": "tp_attention_plan",
        "git": git_state(),
        "command": "python benchmarks/tp_attention_plan.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "machine": machine(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "backend": "gloo (CPU processes)",
        "world_size": args.world_size,
        "threads_per_process": args.threads,
        "dtype": "float32",
        "batch": 1,
        "shapes": shapes,
        "plans": PLANS,
        "repeats": args.repeats,
        "statistic": "median over repeats of the slowest rank's wall time per step, plans interleaved",
        "collectives_per_forward": measured["collectives_per_forward"],
        "rows": rows,
    }
    print(f"# tensor-parallel attention plans, {args.world_size} CPU processes (gloo), {args.threads} thread(s) each, "
          f"float32, {shapes}")
    print(f"# {result['machine']}, load average before/after {result['load_average_before_after']}")
    header = (f"{'tokens':>6} | {'mode':<16} | {'gather ms':>9} | {'local ms':>8} | gather/local | (of minima) | "
              "max |Δ| vs 1 process")
    print(header)
    print("-" * len(header))
    for row in rows:
        median, diff = row["median_ms"], row["max_abs_diff_vs_one_process"]
        diff_text = f"gather {diff['gather']:.1e}, local {diff['local']:.1e}" if diff else "-"
        print(f"{row['tokens']:>6} | {row['mode']:<16} | {median['gather']:>9.1f} | {median['local']:>8.1f} | "
              f"{row['gather_over_local']:>11.2f}x | {row['gather_over_local_min']:>10.2f}x | {diff_text}")
    for name, counts in measured["collectives_per_forward"].items():
        print(f"{name}: {counts['all_gather']} all-gathers and {counts['all_reduce']} all-reduces per forward "
              f"({args.layers} layers)")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
