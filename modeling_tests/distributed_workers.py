"""What the processes of test_distributed.py run (two CPU processes, gloo), and how they are started.

This module must not import llada_moe_hf at the top: the Hub custom-code check runs first in each process and
must find the package not imported (a Hub user's process never imports it).
"""

import datetime
import os
import socket
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
import torch.multiprocessing as mp


FIXTURE_DIR = Path(__file__).parent / "fixtures" / "llada-moe-tiny"
MASK_ID = 363
CHAT_INPUT = "w10 w11 w12\n/reset\nw20 w21\n/exit\n"
CHAT_ARGS = ["--max-new-tokens", "8", "--block-length", "8", "--no-stream"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(target, world_size: int, *args, env: dict | None = None, timeout: float = 300):
    """Run `target(rank, *args)` in `world_size` fresh processes joined in a gloo group; raise if one fails."""
    context = mp.start_processes(
        _entry, args=(world_size, free_port(), env or {}, target, args), nprocs=world_size, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{target.__name__} did not finish in {timeout} s")


def _entry(rank, world_size, port, env, target, args):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- shared inputs


def golden(name="logits.input_ids"):
    from safetensors.torch import load_file

    return load_file(FIXTURE_DIR / "golden.safetensors")[name]


def training_batch(rows: slice = slice(None)):
    """A fixed noised batch of 4 sequences (half their tokens masked), as the data collator makes them."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 360, (4, 16), generator=generator)
    masked = torch.rand(4, 16, generator=generator) < 0.5
    labels = torch.where(masked, clean, torch.full_like(clean, -100))
    input_ids = clean.masked_fill(masked, MASK_ID)
    p_mask = torch.tensor([0.5, 0.4, 0.6, 0.5])
    return {"input_ids": input_ids[rows], "labels": labels[rows], "p_mask": p_mask[rows]}


def set_lora_weights(model):
    """LoRA weights that depend only on the parameter's name (not on the process, nor on B starting at zero)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            generator = torch.Generator().manual_seed(zlib.crc32(lora_key(name).encode()))
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def lora_key(name: str) -> str:
    return name.split("base_model.model.")[-1]


def full(tensor):
    """A plain tensor from a DTensor shard (every rank takes part) or a plain tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# ----------------------------------------------------------------------------------------------- checks


def run_checks(rank, out_dir, checks, custom_code_repo, cli_model_dir):
    """Each check writes `{name}.{rank}.pt` (what it measured) or `{name}.{rank}.err` (its traceback)."""
    import torch.distributed as dist

    out_dir = Path(out_dir)
    functions = {
        "custom_code_tp": lambda: custom_code_tp(custom_code_repo),
        "tp": lambda: sharded_logits(tp_size=2),
        "ep_all_reduce": lambda: sharded_logits(tp_size=2, ep_size=2, ep_implementation="all_reduce"),
        "ep_all_to_all": lambda: sharded_logits(tp_size=2, ep_size=2, ep_implementation="all_to_all"),
        "tp_grads": tp_gradients,
        "tp_fused_moe": lambda: sharded_logits(tp_size=2, experts_implementation="fused_moe"),
        "ep_fused_moe": lambda: sharded_logits(
            tp_size=2, ep_size=2, experts_implementation="fused_moe", ep_implementation=sentinel_ep_implementation()
        ),
        "fsdp_lora_grads": lambda: fsdp_lora_gradients(rank),
        "chat_cli": lambda: chat_cli(rank, cli_model_dir),
        "finetune_ddp": lambda: finetune_script(out_dir / "finetune-ddp"),
        "finetune_fsdp": lambda: finetune_script(out_dir / "finetune-fsdp", "--fsdp"),
    }
    for name in checks:
        (out_dir / f"{name}.{rank}.started").touch()
        try:
            torch.save(functions[name](), out_dir / f"{name}.{rank}.pt")
        except Exception:
            (out_dir / f"{name}.{rank}.err").write_text(traceback.format_exc())
        dist.barrier()


def custom_code_tp(repo):
    """A converted repo loaded as Hub custom code (no llada_moe_hf in the process) with tensor parallelism."""
    from transformers import AutoModel
    from transformers.distributed import DistributedConfig

    assert "llada_moe_hf" not in sys.modules, "the package was imported before the custom-code check"
    model = AutoModel.from_pretrained(repo, trust_remote_code=True, distributed_config=DistributedConfig(tp_size=2))
    with torch.no_grad():
        logits = model(golden()).logits
    attention = model.model.layers[0].self_attn
    return {
        "logits": logits,
        "module": type(model).__module__,
        "package_imported": "llada_moe_hf" in sys.modules,
        "q_proj_local": tuple(attention.q_proj.weight.to_local().shape),
    }


def sharded_logits(experts_implementation=None, **sizes):
    from llada_moe_hf import LLaDAMoEForDiffusionLM
    from llada_moe_hf.distributed import make_distributed_config

    model = LLaDAMoEForDiffusionLM.from_pretrained(
        FIXTURE_DIR, distributed_config=make_distributed_config(**sizes), experts_implementation=experts_implementation
    )
    with torch.no_grad():
        logits = model(golden()).logits
        tokens = None
        if experts_implementation is None:  # (the Triton interpreter is too slow for a generation)
            tokens = model.generate(golden("gen0.prompt"), max_new_tokens=16, steps=16, block_length=8,
                                    mask_token_id=MASK_ID, stop_at_eos=False)
    attention, experts = model.model.layers[0].self_attn, model.model.layers[0].mlp.experts
    return {
        "logits": logits,
        "generated": tokens,
        "placements": {
            name: str(getattr(param, "placements", "plain"))
            for name, param in (
                ("q_proj", attention.q_proj.weight), ("o_proj", attention.o_proj.weight),
                ("q_norm", attention.q_norm.weight), ("gate_up_proj", experts.gate_up_proj),
            )
        },
        "local_shapes": {
            "q_proj": tuple(local(attention.q_proj.weight).shape),
            "o_proj": tuple(local(attention.o_proj.weight).shape),
            "q_norm": tuple(local(attention.q_norm.weight).shape),
            "gate_up_proj": tuple(local(experts.gate_up_proj).shape),
        },
        "num_local_experts": experts.num_experts,
        "ep_implementation": ep_implementation_name(experts),
    }


def sentinel_ep_implementation():
    """The expert parallelism that hands the experts the skipped-route id: all_reduce (5.23+), the only one
    before 5.19 ("auto" there); 5.19-5.22 exchange tokens all-to-all and never send the id."""
    from transformers.distributed import DistributedConfig

    return "all_reduce" if "ep_implementation" in DistributedConfig.__dataclass_fields__ else "auto"


def local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def ep_implementation_name(experts):
    """The class of the `EPImplementation` that transformers installed on this experts module, if any."""
    for cell in getattr(experts.forward, "__closure__", None) or ():
        value = cell.cell_contents
        if type(value).__name__.endswith("EP"):
            return type(value).__name__
    return None


def tp_gradients():
    """Full-parameter gradients of the masked-diffusion loss under tensor parallelism (the qk-norm weights too)."""
    from llada_moe_hf import LLaDAMoEForDiffusionLM
    from llada_moe_hf.distributed import make_distributed_config

    model = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, distributed_config=make_distributed_config(tp_size=2))
    model.train()
    loss = model(**training_batch()).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": {name: full(p.grad) for name, p in model.named_parameters()}}


def fsdp_lora_gradients(rank):
    """FSDP2 (base weights sharded over 2 ranks) + LoRA on attention and experts, each rank on half the batch;
    the LoRA gradients averaged over the ranks as Trainer does for adapters attached after sharding."""
    import torch.distributed as dist

    from llada_moe_hf import LLaDAMoEForDiffusionLM
    from llada_moe_hf.distributed import make_distributed_config
    from llada_moe_hf.lora import get_lora_model

    base = LLaDAMoEForDiffusionLM.from_pretrained(FIXTURE_DIR, distributed_config=make_distributed_config(fsdp_size=2))
    sharded = sum(hasattr(p, "placements") for p in base.parameters()), sum(1 for _ in base.parameters())
    model = get_lora_model(base)
    set_lora_weights(model)
    model.train()
    loss = model(**training_batch(slice(2 * rank, 2 * rank + 2))).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad.detach().clone()
            dist.all_reduce(grad)
            grads[lora_key(name)] = grad / dist.get_world_size()
    return {"grads": grads, "sharded_params": sharded}


def chat_cli(rank, model_dir):
    """`llada-moe chat` in a launched group: rank 0 reads the messages, every rank answers, only rank 0 prints.
    Rank > 0 ends with its standard output and error sent to /dev/null (so this check runs after the others)."""
    import contextlib
    import io

    from llada_moe_hf.cli import main

    stdin = io.StringIO(CHAT_INPUT if rank == 0 else "")
    stdout = io.StringIO()
    previous_stdin, sys.stdin = sys.stdin, stdin
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(["chat", str(model_dir), *CHAT_ARGS])
    finally:
        sys.stdin = previous_stdin
    return {
        "code": code,
        "stdout": stdout.getvalue(),
        "stdin_left": stdin.read(),
        "fd1_is_devnull": os.path.samefile(f"/proc/self/fd/1", os.devnull),
        "fd2_is_devnull": os.path.samefile(f"/proc/self/fd/2", os.devnull),
    }


def finetune_script(output_dir, *extra):
    """examples/finetune_lora.py as launched by torchrun (this group has torchrun's environment), 2 steps. Returns
    its losses and the batches its final loss was measured on (to recompute it from the saved adapter)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
    import finetune_lora

    measured = []
    eval_loss = finetune_lora.eval_loss

    def recording_eval_loss(model, batches):
        measured.append(batches)
        return eval_loss(model, batches)

    finetune_lora.eval_loss = recording_eval_loss
    try:
        result = finetune_lora.main(
            ["--output-dir", str(output_dir), "--max-steps", "2", "--save-steps", "1", "--batch-size", "4",
             "--eval-questions", "0", *extra]
        )
    finally:
        finetune_lora.eval_loss = eval_loss
    return {**result["loss"], "eval_batches": measured[-1]}
