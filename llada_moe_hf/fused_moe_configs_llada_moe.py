# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Tile configurations for the fused MoE kernels in `fused_moe_llada_moe.py`, kept as data.

This is a .py module rather than JSON because Hub custom code copies only the .py files a model imports.

Layout: GPU name (`torch.cuda.get_device_name()`) -> shape key "E=..,H=..,I=.." -> token-count bucket ->
configuration. A call with T tokens uses the smallest bucket >= T (the largest bucket beyond the table): a tile
tuned for more rows per expert still works for fewer, the reverse under-fills it. GPUs or shapes missing here
use `default_config()` in the kernel module.

Each configuration holds BLOCK_M (rows of (token, expert) pairs per tile; every expert's rows are padded to a
multiple of it, so both GEMMs share it) and, per GEMM, BLOCK_N (output columns per tile), BLOCK_K (reduction
depth per step), num_warps and num_stages (software pipelining depth).

The H100 entries are the winners of `benchmarks/moe_layer.py --tune` on an H100 80GB HBM3 (torch 2.11, triton 3.6;
the full sweep is in benchmarks/results/moe_layer_h100_tune.json). They are for 16-bit weights; float32 caps the
tiles (see `_fit_to_dtype`). `python benchmarks/kernel_resources.py --candidate M,N,K,WARPS,STAGES` checks, with no
GPU, that a new entry builds for the GPU without spilling registers and fits in its shared memory.
"""


def _cfg(block_m, gate_up, down):
    keys = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return {"BLOCK_M": block_m, "gate_up": dict(zip(keys, gate_up)), "down": dict(zip(keys, down))}


FUSED_MOE_CONFIGS = {
    "NVIDIA H100 80GB HBM3": {
        "E=64,H=2048,I=1024": {
            16: _cfg(16, (64, 128, 4, 5), (64, 128, 4, 5)),
            64: _cfg(16, (128, 128, 4, 3), (64, 128, 4, 5)),
            128: _cfg(32, (64, 128, 4, 3), (64, 128, 4, 3)),
            256: _cfg(32, (64, 128, 4, 3), (64, 256, 4, 3)),
            512: _cfg(64, (64, 64, 4, 3), (128, 64, 4, 3)),
            1024: _cfg(64, (128, 64, 4, 5), (128, 64, 4, 3)),
            2048: _cfg(128, (128, 64, 8, 4), (128, 64, 4, 3)),
            4096: _cfg(128, (128, 64, 8, 4), (128, 128, 4, 3)),
        },
    },
}
