# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Diffusion generation with LLaDA-MoE sharded over the processes torchrun starts (tensor parallelism, optionally
expert parallelism); every rank runs the same sampler on the same logits, rank 0 prints.

    # one node, 8 GPUs: attention and experts split 8 ways (bf16 weights: 1.8 GB per GPU)
    torchrun --nproc-per-node 8 examples/distributed_generate.py --model inclusionAI/LLaDA-MoE-7B-A1B-Instruct \\
        --prompt "Why is the sky blue?" --max-new-tokens 256 --threshold 0.9 --cache-mode dual
    # the same with whole experts per GPU (expert parallelism; attention stays tensor parallel)
    torchrun --nproc-per-node 8 examples/distributed_generate.py --model ... --ep-size 8
    # two CPU processes (gloo), the package's embedded tiny model
    torchrun --nproc-per-node 2 examples/distributed_generate.py

On one process (plain `python`) it runs unsharded.
"""

import argparse

import torch
from transformers import AutoTokenizer

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf.chat import encode_chat, stop_token_ids
from llada_moe_hf.distributed import (
    EP_IMPLEMENTATIONS, init_distributed, is_main_process, launched_distributed, make_distributed_config,
    silence_other_ranks, world_size,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint or Hub id (default: the embedded tiny model)")
    parser.add_argument("--prompt", default="sort 3 1 4 1 5")
    parser.add_argument("--ep-size", type=int, default=1, help="1, or the number of processes (whole experts)")
    parser.add_argument("--ep-implementation", default="auto", choices=EP_IMPLEMENTATIONS)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--experts-implementation", default=None, help="auto (default), cpu_moe, eager, grouped_mm or fused_moe")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--cache-mode", default="none", choices=["none", "prefix", "dual"])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if launched_distributed():
        init_distributed()
        silence_other_ranks()  # one copy of the warnings and progress bars
    if args.model is None:
        from llada_moe_hf.demo import TINY_ASSET_DIR

        args.model = str(TINY_ASSET_DIR)
    # tp_size = every process; on one process DistributedConfig(tp_size=1) shards nothing.
    parallel = make_distributed_config(
        tp_size=world_size(), ep_size=args.ep_size, ep_implementation=args.ep_implementation
    )
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = LLaDAMoEForDiffusionLM.from_pretrained(
        args.model, dtype=dtype, distributed_config=parallel, experts_implementation=args.experts_implementation
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, config=model.config, trust_remote_code=False)
    prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}])
    input_ids = torch.tensor([prompt_ids], device=model.device)
    output = model.generate(
        input_ids, max_new_tokens=args.max_new_tokens, block_length=args.block_length, threshold=args.threshold,
        cache_mode=args.cache_mode, eos_token_id=stop_token_ids(tokenizer, model.config),
    )  # fmt: skip
    if is_main_process():
        print(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
