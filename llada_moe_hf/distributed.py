# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Several processes (`torchrun`, `accelerate launch`): what the command line and the examples share.

transformers shards the model itself (`from_pretrained(..., distributed_config=DistributedConfig(...))`: tensor,
expert and FSDP2 parallelism); this module only adds what a program around it needs: knowing that it was
launched on several processes, building a `DistributedConfig` that the installed transformers accepts,
reading input on rank 0 and sending it to the other ranks, and keeping the other ranks quiet.
Package-only (not part of the Hub custom code).
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import os
import random
import sys
import traceback


EP_IMPLEMENTATIONS = ("auto", "all_reduce", "all_to_all")


def launched_distributed() -> bool:
    """True under `torchrun` / `accelerate launch` with more than one process (they set WORLD_SIZE and RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def init_distributed():
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); left alone if already joined."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    # Destroying the group before exit avoids the "process group was not destroyed" warning of recent torch.
    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)


def barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` as rank `src` has it, on every rank (any picklable object; the object itself on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def read_on_main_process(read):
    """Call `read()` on rank 0 only (standard input, a prompt) and give its result to every rank."""
    return broadcast_object(read() if is_main_process() else None)


def run_on_main_process(function):
    """Call `function()` on rank 0 only (a check, a file write) and give its result to every rank; a SystemExit
    it raises (a user error) is raised on every rank, so that no rank waits for the others forever."""
    outcome = None
    if is_main_process():
        try:
            outcome = ("ok", function())
        except SystemExit as exit_:
            outcome = ("exit", exit_.code)
    kind, value = broadcast_object(outcome)
    if kind == "exit":
        raise SystemExit(value)
    return value


def shared_seed(seed: int | None) -> int | None:
    """The same sampling seed on every rank: ranks that drew different random tokens would feed different inputs
    to the same sharded layers. Without a seed, rank 0 draws one."""
    if not launched_distributed():
        return seed
    return broadcast_object(seed if seed is not None else random.randrange(2**31))


def silence_other_ranks():
    """Send the standard output and error of every rank but 0 to /dev/null (prints, warnings, progress bars,
    C++ messages), so that a command prints once. An uncaught exception is still shown, prefixed with its rank,
    and so is the Python stack of a crash."""
    if not launched_distributed() or is_main_process():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    error_stream = os.fdopen(os.dup(2), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    this_rank = rank()

    def excepthook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            return
        text = "".join(traceback.format_exception(kind, value, tb))
        error_stream.write("".join(f"[rank {this_rank}] {line}\n" for line in text.splitlines()))
        error_stream.flush()

    sys.excepthook = excepthook
    faulthandler.enable(file=error_stream, all_threads=True)  # a crash (abort, segfault) shows its Python stack


def make_distributed_config(tp_size: int = 1, ep_size: int = 1, fsdp_size: int = 1, ep_implementation: str = "auto"):
    """A `transformers.DistributedConfig` for these sizes that the installed transformers (5.17 or later) accepts.

    transformers 5.23+ takes them as they are. 5.19-5.22 have no `ep_implementation` (their expert parallelism
    exchanges tokens all-to-all). 5.17-5.18 have only `enable_expert_parallel`: experts spread over the tensor
    parallel ranks (`ep_size == tp_size`), attention not sharded, outputs summed (all-reduce).
    """
    from transformers.distributed import DistributedConfig

    for name, value in (("tp_size", tp_size), ("ep_size", ep_size), ("fsdp_size", fsdp_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if ep_implementation not in EP_IMPLEMENTATIONS:
        raise ValueError(f"ep_implementation must be one of {EP_IMPLEMENTATIONS}, got {ep_implementation!r}.")
    fields = DistributedConfig.__dataclass_fields__
    if ep_size > 1 and "ep_size" not in fields:
        if ep_size != tp_size or fsdp_size > 1 or ep_implementation == "all_to_all":
            raise ValueError(
                f"This transformers version only spreads experts over the tensor-parallel ranks "
                f"(ep_size == tp_size, no FSDP, all-reduce); got tp_size={tp_size}, ep_size={ep_size}, "
                f"fsdp_size={fsdp_size}, ep_implementation={ep_implementation!r}. Upgrade transformers "
                "(pip install -U 'transformers>=5.23') for the other layouts."
            )
        return DistributedConfig(tp_size=tp_size, enable_expert_parallel=True)
    kwargs = {"tp_size": tp_size, "fsdp_size": fsdp_size}
    if ep_size > 1:
        kwargs["ep_size"] = ep_size
        if ep_implementation != "auto":
            if "ep_implementation" in fields:
                kwargs["ep_implementation"] = ep_implementation
            elif ep_implementation != "all_to_all":
                raise ValueError(
                    f"ep_implementation={ep_implementation!r} needs transformers >= 5.23 (this one only exchanges "
                    "tokens all-to-all): pip install -U 'transformers>=5.23', or leave it at 'auto'."
                )
    return DistributedConfig(**kwargs)


# Command line (`llada-moe generate` / `chat` under torchrun).


def add_distributed_arguments(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("several processes (under torchrun)")
    group.add_argument(
        "--tp-size", type=int, default=None, help="tensor-parallel ranks (default: all the processes torchrun started)"
    )
    group.add_argument(
        "--ep-size", type=int, default=1, help="expert-parallel ranks: 1 (experts sharded by tensor parallelism) "
        "or --tp-size (each rank holds whole experts)"
    )


def setup_cli(args):
    """Under torchrun: join the process group, keep the other ranks quiet, share the sampling seed and check
    --tp-size / --ep-size / --device. On one process, only refuses sizes above 1."""
    if not launched_distributed():
        size = max(getattr(args, "tp_size", None) or 1, getattr(args, "ep_size", 1))
        if size > 1:
            raise SystemExit(
                f"error: --tp-size/--ep-size above 1 need several processes: torchrun --nproc-per-node {size} "
                f"-m llada_moe_hf.cli {getattr(args, 'command', None) or 'generate'} ..."
            )
        return
    init_distributed()
    silence_other_ranks()
    if getattr(args, "seed", None) is None:
        args.seed = shared_seed(None)
    cli_distributed_config(args)  # fail early, before loading, on a bad size


def cli_distributed_config(args):
    world = world_size()
    tp_size = getattr(args, "tp_size", None) or world
    ep_size = getattr(args, "ep_size", 1)
    if tp_size != world:
        raise SystemExit(
            f"error: --tp-size {tp_size} but torchrun started {world} processes: generation shards the model over "
            f"all of them (use --tp-size {world}, or torchrun --nproc-per-node {tp_size})."
        )
    if ep_size not in (1, tp_size):
        raise SystemExit(
            f"error: --ep-size {ep_size}: use 1 (experts split by tensor parallelism) or {tp_size} (= --tp-size: "
            "each rank holds whole experts)."
        )
    import torch

    device = getattr(args, "device", "auto")
    if device not in ("auto", "cuda" if torch.cuda.is_available() else "cpu"):
        raise SystemExit(
            f"error: --device {device} under torchrun: each rank uses cuda:LOCAL_RANK when CUDA is available, "
            "else the CPU (leave --device at auto; CUDA_VISIBLE_DEVICES='' runs CPU processes)."
        )
    try:
        return make_distributed_config(tp_size=tp_size, ep_size=ep_size)
    except ValueError as err:
        raise SystemExit(f"error: {err}")


def from_pretrained_kwargs(args) -> dict:
    """`from_pretrained` keyword arguments that shard the model under torchrun; {} on one process."""
    if not launched_distributed():
        return {}
    return {"distributed_config": cli_distributed_config(args)}


__all__ = [
    "add_distributed_arguments",
    "barrier",
    "broadcast_object",
    "from_pretrained_kwargs",
    "init_distributed",
    "is_main_process",
    "launched_distributed",
    "make_distributed_config",
    "rank",
    "read_on_main_process",
    "run_on_main_process",
    "setup_cli",
    "shared_seed",
    "silence_other_ranks",
    "world_size",
]
