"""Peak GPU memory and step time of LoRA fine-tuning at the released 7B shape (random bf16 weights), measured next to
the estimate the README computes, for each experts implementation, with and without gradient checkpointing.

    python benchmarks/lora_memory.py --out benchmarks/results/lora_memory_h100.json          # needs a GPU (~40 GB)
    python benchmarks/lora_memory.py --smoke                                                 # tiny, CPU, code paths only

One optimizer step = the masked-diffusion loss on one sequence of T tokens (half of them masked, as the collator
does at t = 0.5), backward, AdamW on the LoRA weights (the package's default LoRA config: r = 16 on q/k/v/o and on
every expert's gate_up and down projections). Memory is `torch.cuda.max_memory_allocated` over the steps after the
model is built; the table also shows the weights alone and the README's arithmetic for the same case.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import peft
import torch
import transformers

from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from llada_moe_hf.lora import default_lora_config, get_lora_model
from provenance import git_state


GB = 1e9


def build(config: LLaDAMoEConfig, device: torch.device) -> LLaDAMoEForDiffusionLM:
    """The model in bf16 straight on `device` (no float32 copy of 7B parameters), routers random so tokens spread."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LLaDAMoEForDiffusionLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.02)
    return model


def estimate_gb(config: LLaDAMoEConfig, lora_params: int, base_params: int, tokens: int, checkpointing: bool) -> float:
    """The README's arithmetic ("GPU memory for LoRA on the 7B in bf16"), without the activations it leaves out
    when checkpointing is off (those it gives as a range per token)."""
    hidden, inter, experts = config.hidden_size, config.expert_intermediate_size, config.num_experts
    moe_layers = sum(1 for f in config.moe_layer_freq if f) if config.moe_layer_freq else config.num_hidden_layers
    adapted_per_layer = experts * (2 * inter * hidden + hidden * inter) * 2  # W + s·BA, bf16
    total = base_params * 2 + lora_params * (4 + 4 + 8)
    total += adapted_per_layer * (2 if checkpointing else moe_layers)
    total += config.vocab_size * (2 + 4 + 4 + 4) * tokens  # logits, fp32 copy, log-softmax, gradient
    total += config.num_hidden_layers * hidden * 2 * tokens  # checkpointed layer inputs
    return total / GB


def training_batch(config, tokens, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, config.vocab_size - 8, (1, tokens), generator=gen)
    masked = torch.rand(1, tokens, generator=gen) < 0.5
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    inputs = torch.where(masked, torch.full_like(ids, config.mask_token_id), ids)
    p_mask = torch.full((1, tokens), 0.5)
    return {"input_ids": inputs.to(device), "labels": labels.to(device), "p_mask": p_mask.to(device)}


def run_case(model, config, impl, tokens, checkpointing, steps, device):
    base = model.get_base_model()
    base.set_experts_implementation(impl)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(steps):
        batch = training_batch(config, tokens, device, seed=step)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
    row = {
        "experts_implementation": impl, "tokens": tokens, "gradient_checkpointing": checkpointing,
        "steps": steps, "step_ms_median_after_first": statistics.median(times[1:] or times), "losses": losses,
    }  # fmt: skip
    if device.type == "cuda":
        row["peak_allocated_GB"] = torch.cuda.max_memory_allocated() / GB
        row["peak_reserved_GB"] = torch.cuda.max_memory_reserved() / GB
    del optimizer  # its states go with it: the next case starts from the weights alone
    for param in model.parameters():
        param.grad = None
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--impls", nargs="+", default=["grouped_mm", "fused_moe"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-checkpointing-tokens", type=int, nargs="*", default=[1024],
                        help="token counts also run without gradient checkpointing (more memory)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny config on the CPU: exercises the code only")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        config = LLaDAMoEConfig(
            vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, moe_layer_freq=[1, 1],
            pad_token_id=90, eos_token_id=90, mask_token_id=95,
        )  # fmt: skip
        tokens, no_ckpt, impls = [16], [16], ["eager", "grouped_mm"]
    else:
        if not torch.cuda.is_available():
            sys.exit("lora_memory.py measures GPU memory: run it on a CUDA machine, or pass --smoke on the CPU.")
        device = torch.device("cuda")
        config = LLaDAMoEConfig()  # the release's dimensions
        tokens, no_ckpt, impls = args.tokens, args.no_checkpointing_tokens, args.impls

    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git": git_state(),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "platform": platform.platform(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },  # fmt: skip
        "shape": {
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "experts": config.num_experts,
            "top_k": config.num_experts_per_tok, "expert_width": config.expert_intermediate_size,
            "vocab": config.vocab_size, "dtype": "bfloat16 weights, float32 LoRA weights and AdamW states",
        },  # fmt: skip
        "rows": [],
    }
    print(json.dumps(results["environment"]), flush=True)
    model = build(config, device)
    base_params = sum(p.numel() for p in model.parameters())
    weights_gb = torch.cuda.memory_allocated() / GB if device.type == "cuda" else None
    model = get_lora_model(model, default_lora_config(model))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})  # PEFT: float32 adapters
    results.update(base_params=base_params, lora_params=lora_params, lora_dtypes=lora_dtypes, weights_only_GB=weights_gb)
    print(f"base parameters {base_params / 1e9:.2f} B, LoRA parameters {lora_params / 1e6:.1f} M"
          + (f", weights alone {weights_gb:.1f} GB" if weights_gb else ""), flush=True)  # fmt: skip
    print(f"{'experts':<11} {'tokens':>6} {'ckpt':>5} {'step ms':>9} {'peak GB':>8} {'estimate GB':>11} {'ratio':>6}")

    cases = [(impl, t, True) for impl in impls for t in tokens] + [(impl, t, False) for impl in impls for t in no_ckpt]
    for impl, num_tokens, checkpointing in cases:
        try:
            row = run_case(model, config, impl, num_tokens, checkpointing, args.steps, device)
        except torch.OutOfMemoryError as err:
            row = {"experts_implementation": impl, "tokens": num_tokens, "gradient_checkpointing": checkpointing,
                   "error": f"OutOfMemoryError: {str(err)[:300]}"}  # fmt: skip
            torch.cuda.empty_cache()
        row["estimate_GB"] = estimate_gb(config, lora_params, base_params, num_tokens, checkpointing)
        peak = row.get("peak_allocated_GB")
        if peak:
            row["measured_over_estimate"] = peak / row["estimate_GB"]
        results["rows"].append(row)
        shown = f"{peak:8.1f}" if peak else f"{'n/a' if 'error' not in row else 'OOM':>8}"
        ratio = f"{row['measured_over_estimate']:6.2f}" if peak else f"{'':>6}"
        step = f"{row['step_ms_median_after_first']:9.1f}" if "step_ms_median_after_first" in row else f"{'':>9}"
        print(f"{impl:<11} {num_tokens:>6} {str(checkpointing):>5} {step} {shown} {row['estimate_GB']:11.2f} {ratio}",
              flush=True)  # fmt: skip
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
            os.replace(tmp, args.out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
