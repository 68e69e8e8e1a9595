"""GPU memory per rank of LLaDA-MoE-7B-A1B in bf16 under tensor / expert parallelism and under FSDP2 + LoRA,
COMPUTED (arithmetic, not measured): the release config is built on the meta device (no memory), every parameter
is matched against the tensor-parallel plan the model uses, and the bytes each rank holds are added up.

    python benchmarks/parallel_memory.py --out /tmp/parallel_memory.json

What it counts:
- inference, weights only: a parameter a plan rule shards holds 1/N per rank, a replicated one (router, norms)
  is whole on every rank. Expert parallelism (ep_size = N) holds 1/N of the experts whole instead of 1/N of
  each expert: the same bytes. Not counted: activations, the diffusion KV caches (128 KB per token for the
  whole model in bf16, split by heads under TP) and the logits, which every rank holds whole (0.31 MB per
  token in bf16).
- LoRA with FSDP2 (examples/finetune_lora.py --fsdp, default LoRA r=16 on attention + experts, AdamW,
  gradient checkpointing): the base weights sharded 1/N; two decoder layers gathered whole at a time (the one
  computing and the one FSDP2 prefetches); the LoRA weights, gradients and AdamW states in float32, whole on
  every rank (they are added after sharding and stay replicated); one layer's adapted expert weights and their
  gradient (PEFT materialises W + s*BA); logits and loss for the rank's micro-batch (2.2 MB per token).
"""

import argparse
import re

import torch

from llada_moe_hf import LLaDAMoEConfig, LLaDAMoEForDiffusionLM
from provenance import git_state, write_json


GB = 1e9
SHARDING_STYLES = ("colwise", "rowwise", "packed_colwise", "packed_rowwise", "embedding")
BF16, FP32 = 2, 4


def tp_rules(model) -> list[tuple[re.Pattern, str]]:
    """The model's full plan (what transformers applies): base_model_tp_plan under `model.`, the input embedding
    (added by transformers, vocabulary-parallel) and the class plan (lm_head)."""
    plan = {f"model.{key}": style for key, style in model.config.base_model_tp_plan.items()}
    plan["model.embed_tokens"] = "embedding_rowwise"
    plan.update(type(model)._tp_plan or {})
    return [(re.compile(key.replace(".", r"\.").replace("*", r"\d+")), style) for key, style in plan.items()]


def style_of(name: str, rules) -> str | None:
    module, _, _ = name.rpartition(".")
    for candidate in (name, module):
        for pattern, style in rules:
            if pattern.fullmatch(candidate):
                return style
    return None


def weights_per_rank(model, sizes) -> dict:
    rules = tp_rules(model)
    sharded = replicated = 0
    for name, param in model.named_parameters():
        style = style_of(name, rules)
        if style and style.startswith(SHARDING_STYLES):
            sharded += param.numel()
        else:
            replicated += param.numel()
    rows = {n: (sharded / n + replicated) * BF16 / GB for n in sizes}
    return {"sharded_params": sharded, "replicated_params": replicated, "bf16_gb_per_rank": rows}


def lora_fsdp_per_rank(model, sizes, tokens: int, r: int) -> dict:
    config = model.config
    hidden, inter, experts, layers = (
        config.hidden_size, config.expert_intermediate_size, config.num_experts, config.num_hidden_layers
    )  # fmt: skip
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    lora = layers * (experts * r * (2 * hidden + 3 * inter) + 4 * r * (hidden + hidden))
    adapted = experts * (2 * inter * hidden + hidden * inter) * BF16  # W + s*BA of one MoE layer, bf16
    logits = config.vocab_size * (BF16 + FP32 + FP32 + FP32)  # bf16 logits, fp32 copy, log-softmax, gradient
    fixed = {
        "two_gathered_layers_gb": 2 * layer * BF16 / GB,
        "lora_weights_grads_adamw_fp32_gb": lora * (FP32 + FP32 + 2 * FP32) / GB,
        "adapted_expert_weights_and_grad_gb": 2 * adapted / GB,
        "logits_and_loss_gb": tokens * logits / GB,
        "checkpointed_layer_inputs_gb": tokens * layers * hidden * BF16 / GB,
    }
    # One rank (n = 1) is plain LoRA, nothing to gather.
    rows = {n: total * BF16 / n / GB + sum(fixed.values()) - (fixed["two_gathered_layers_gb"] if n == 1 else 0)
            for n in sizes}
    return {"lora_params": lora, "tokens_per_micro_batch": tokens, **fixed,
            "base_weights_gb": total * BF16 / GB, "total_gb_per_rank": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="tokens per micro-batch (LoRA)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    args = parser.parse_args(argv)

    config = LLaDAMoEConfig()  # the release's shape (16 layers, hidden 2048, 64 experts x 1024, vocab 157184)
    with torch.device("meta"):
        model = LLaDAMoEForDiffusionLM(config)
    inference = weights_per_rank(model, args.sizes)
    training = {tokens: lora_fsdp_per_rank(model, args.sizes, tokens, args.r) for tokens in args.tokens}
    result = {
        "benchmark": "parallel_memory",
        "git": git_state(),
        "kind": "arithmetic (not measured)",
        "model": "LLaDA-MoE-7B-A1B shape, bf16",
        "params": sum(p.numel() for p in model.parameters()),
        "inference_weights": inference,
        "lora_fsdp2": training,
    }
    print(f"# LLaDA-MoE-7B-A1B, bf16, {result['params']:,} parameters: COMPUTED, not measured")
    print("ranks | weights per rank, TP (or TP + EP) | LoRA + FSDP2 per rank: " +
          ", ".join(f"{t} tokens" for t in args.tokens))
    for n in args.sizes:
        lora = ", ".join(f"{training[t]['total_gb_per_rank'][n]:.1f} GB" for t in args.tokens)
        print(f"{n:>5} | {inference['bf16_gb_per_rank'][n]:>8.2f} GB | {lora}")
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
