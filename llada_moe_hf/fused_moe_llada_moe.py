# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""A fused Triton experts implementation, registered with transformers as `experts_implementation="fused_moe"`.

Forward, for T tokens each routed to k of E experts (S = T * k (token, expert) pairs):
1. `align_routing` (plain torch, on the device, no host sync): sort the pairs by expert (stable, so the order
   is deterministic) and pad every expert's rows to a multiple of BLOCK_M with a sentinel id S. Each tile of
   BLOCK_M rows belongs to one expert. The grid is sized for the worst case, so a decoding step can be captured
   in a CUDA graph; tiles past the real end exit at once.
2. `_gate_up_kernel`: grouped GEMM x @ gate_up_proj[e].T, gathering token rows straight from `hidden_states`,
   with SiLU(gate) * up in the epilogue; writes the intermediate h in the padded sorted layout.
3. `_down_kernel`: grouped GEMM h @ down_proj[e].T with the routing weight applied in the epilogue; each row is
   written to its (token, slot) position.
4. Combine: a sum over the k slots of each token, in the model dtype, like transformers' grouped_mm.

Backward (`FusedMoEFunction`) gives gradients for hidden_states, the routing weights and both weight tensors,
with torch grouped GEMMs over the same padded layout. The weights are read from the experts module on every
call, so PEFT's LoRA on experts (which reparametrises them) trains through this path.

Triton is optional: without it, or without CUDA, this module still imports and selecting "fused_moe" raises a
clear error at the first forward. With TRITON_INTERPRET=1 (set before triton is imported) the kernels run on
CPU tensors through Triton's interpreter; that is how CI tests them.
"""

import os
from functools import lru_cache

import torch
import torch.nn.functional as F

from .fused_moe_configs_llada_moe import FUSED_MOE_CONFIGS


try:
    import triton
    import triton.language as tl
except ImportError:  # the package and a saved Hub repo must load with torch and transformers alone
    triton = None
    tl = None


FUSED_MOE_NAME = "fused_moe"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_moe_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why `fused_moe` cannot run on `device`, or None when it can."""
    if triton is None:
        return "it needs the `triton` package (pip install 'llada-moe-hf[cuda]' or pip install triton)"
    if _interpreting():
        return None
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU (none is visible to torch)"
    if device is not None and device.type != "cuda":
        return f"it runs on CUDA tensors, but the model is on {device.type}; move it with model.to('cuda')"
    return None


def is_fused_moe_available(device: torch.device | None = None) -> bool:
    return fused_moe_unavailable_reason(device) is None


# ----------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _round(x, out_ty: tl.constexpr, INTERPRET_BF16: tl.constexpr):
        """x (float32) rounded to out_ty, returned as float32. The interpreter truncates float32 -> bfloat16, so
        there the round-to-nearest-even the GPU does is spelled out on the bits."""
        if INTERPRET_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(out_ty).to(tl.float32)

    @triton.jit
    def _align_count_kernel(
        expert_ids_ptr, chunk_counts_ptr, rank_ptr, num_pairs, E_POW2: tl.constexpr, CHUNK: tl.constexpr
    ):
        """Routing step 1, one program per chunk of pairs: per-expert counts of the chunk, and each pair's rank
        among the earlier pairs of its expert in the chunk."""
        chunk = tl.program_id(0)
        experts = tl.arange(0, E_POW2)
        pair = chunk * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(expert_ids_ptr + pair, mask=pair < num_pairs, other=E_POW2)
        onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        tl.store(rank_ptr + pair, rank, mask=pair < num_pairs)
        tl.store(chunk_counts_ptr + chunk * E_POW2 + experts, tl.sum(onehot, axis=0))

    @triton.jit
    def _align_offsets_kernel(
        chunk_counts_ptr, chunk_base_ptr, sorted_ids_ptr, block_expert_ptr, offsets_ptr,
        num_chunks, num_pairs, num_experts, num_rows, num_blocks,
        BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr, FILL: tl.constexpr,
    ):  # fmt: skip
        """Routing step 2, one program: where each chunk's pairs of each expert start (stable order), the padded
        expert offsets, the expert of every row tile, and every row pre-filled as padding."""
        experts = tl.arange(0, E_POW2)
        steps = tl.arange(0, CHUNKS_PER_STEP)
        running = tl.zeros((E_POW2,), dtype=tl.int32)
        for c0 in range(0, num_chunks, CHUNKS_PER_STEP):
            c = c0 + steps
            tile = c[:, None] * E_POW2 + experts[None, :]
            counts = tl.load(chunk_counts_ptr + tile, mask=(c < num_chunks)[:, None], other=0)
            inclusive = tl.cumsum(counts, axis=0)
            tl.store(chunk_base_ptr + tile, running[None, :] + inclusive - counts, mask=(c < num_chunks)[:, None])
            running += tl.sum(counts, axis=0)
        padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, axis=0)
        tl.store(offsets_ptr + experts, padded_end, mask=experts < num_experts)
        tl.store(offsets_ptr + E_POW2 + experts, padded_end - padded)  # starts, read by step 3
        tiles = tl.arange(0, CHUNKS_PER_STEP)  # a [CHUNKS_PER_STEP, E_POW2] compare tile stays in registers
        for start in range(0, num_blocks, CHUNKS_PER_STEP):  # expert of each row tile (num_experts past the end)
            t = start + tiles
            owner = tl.sum((padded_end[None, :] <= (t * BLOCK_M)[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + t, tl.minimum(owner, num_experts), mask=t < num_blocks)
        lanes = tl.arange(0, FILL)
        for start in range(0, num_rows, FILL):
            r = start + lanes
            tl.store(sorted_ids_ptr + r, num_pairs + tl.zeros((FILL,), dtype=tl.int32), mask=r < num_rows)

    @triton.jit
    def _align_scatter_kernel(
        expert_ids_ptr, rank_ptr, chunk_base_ptr, offsets_ptr, sorted_ids_ptr, pair_row_ptr, num_pairs,
        E_POW2: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """Routing step 3, one program per chunk: row = expert start + earlier chunks' pairs + rank in chunk."""
        chunk = tl.program_id(0)
        pair = chunk * CHUNK + tl.arange(0, CHUNK)
        ok = pair < num_pairs
        ids = tl.load(expert_ids_ptr + pair, mask=ok, other=0)
        row = tl.load(offsets_ptr + E_POW2 + ids, mask=ok, other=0)
        row += tl.load(chunk_base_ptr + chunk * E_POW2 + ids, mask=ok, other=0)
        row += tl.load(rank_ptr + pair, mask=ok, other=0)
        tl.store(sorted_ids_ptr + row, pair, mask=ok)
        tl.store(pair_row_ptr + pair, row.to(tl.int64), mask=ok)

    @triton.jit
    def _align_single_kernel(
        expert_ids_ptr, sorted_ids_ptr, block_expert_ptr, offsets_ptr, pair_row_ptr,
        num_pairs, num_experts, num_rows, num_blocks,
        BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr, TILES: tl.constexpr,
    ):  # fmt: skip
        """All three routing steps in one program, for decode-sized batches where launches, not work, cost time.
        Pass 1 counts the pairs of each expert; pass 2 places every pair (stable: chunks in order, ranks within
        a chunk by a cumulative sum); padding rows are written separately, so no two stores hit one address."""
        experts = tl.arange(0, E_POW2)
        lanes = tl.arange(0, CHUNK)
        counts = tl.zeros((E_POW2,), dtype=tl.int32)
        for p0 in range(0, num_pairs, CHUNK):
            pair = p0 + lanes
            ids = tl.load(expert_ids_ptr + pair, mask=pair < num_pairs, other=E_POW2)
            counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        padded_end = tl.cumsum(padded, axis=0)
        padded_start = padded_end - padded
        tl.store(offsets_ptr + experts, padded_end, mask=experts < num_experts)

        placed = tl.zeros((E_POW2,), dtype=tl.int32)  # pairs of each expert placed by earlier chunks
        for p0 in range(0, num_pairs, CHUNK):
            pair = p0 + lanes
            ok = pair < num_pairs
            ids = tl.load(expert_ids_ptr + pair, mask=ok, other=E_POW2)
            onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
            rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
            row = tl.sum(onehot * (padded_start + placed)[None, :], axis=1) + rank
            tl.store(sorted_ids_ptr + row, pair, mask=ok)
            tl.store(pair_row_ptr + pair, row.to(tl.int64), mask=ok)
            placed += tl.sum(onehot, axis=0)

        # Padding: the (at most BLOCK_M - 1) rows after each expert's pairs, then every row past the padded end.
        pad = tl.arange(0, BLOCK_M)
        pad_row = (padded_start + counts)[:, None] + pad[None, :]
        sentinel = num_pairs + tl.zeros((E_POW2, BLOCK_M), dtype=tl.int32)
        tl.store(sorted_ids_ptr + pad_row, sentinel, mask=pad_row < padded_end[:, None])
        total = tl.sum(padded, axis=0)
        fill = tl.arange(0, FILL)
        for r0 in range(0, num_rows, FILL):
            r = r0 + fill
            past_end = (r >= total) & (r < num_rows)
            tl.store(sorted_ids_ptr + r, num_pairs + tl.zeros((FILL,), dtype=tl.int32), mask=past_end)
        tiles = tl.arange(0, TILES)  # a [TILES, E_POW2] compare tile stays in registers
        for start in range(0, num_blocks, TILES):  # expert of each row tile (num_experts past the end)
            t = start + tiles
            owner = tl.sum((padded_end[None, :] <= (t * BLOCK_M)[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + t, tl.minimum(owner, num_experts), mask=t < num_blocks)

    @triton.jit
    def _gate_up_kernel(
        x_ptr, w_ptr, h_ptr, gu_ptr, sorted_ids_ptr, block_expert_ptr,
        num_pairs, top_k, num_experts, num_blocks, N, K,
        stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_hm, stride_gm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        STORE_GATE_UP: tl.constexpr, INTERPRET_BF16: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One BLOCK_M x BLOCK_N tile of h = silu(x @ Wg.T) * (x @ Wu.T) for the expert that owns the row tile.
        N is the intermediate size I; Wg is rows [0, I) of gate_up_proj[e], Wu rows [I, 2I)."""
        pid = tl.program_id(0)
        # Row tiles vary fastest: neighbouring programs share one expert's weight tile (L2 reuse).
        pid_m = pid % num_blocks
        pid_n = pid // num_blocks
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if expert >= num_experts:  # a tile past the padded end
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        row_ok = pair < num_pairs
        token = (pair // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
        g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        u_ptrs = g_ptrs + N * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if INTERPRET_BF16:  # the interpreter's dot mishandles bfloat16 operands
                a = a.to(tl.float32)
                bg = bg.to(tl.float32)
                bu = bu.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk

        out_ty = h_ptr.dtype.element_ty
        # Round where the eager path rounds (gate and up in the model dtype, then silu, then the product).
        gate = _round(acc_g, out_ty, INTERPRET_BF16)
        up = _round(acc_u, out_ty, INTERPRET_BF16)
        if STORE_GATE_UP:  # kept for the backward pass
            gu_ptrs = gu_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :]
            tl.store(gu_ptrs, gate.to(out_ty), mask=n_ok[None, :])
            tl.store(gu_ptrs + N, up.to(out_ty), mask=n_ok[None, :])
        act = _round(gate * tl.sigmoid(gate), out_ty, INTERPRET_BF16)
        h = _round(act * up, out_ty, INTERPRET_BF16).to(out_ty)
        # Padding rows are written too (as zeros): the backward's grouped GEMMs read them.
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, h, mask=n_ok[None, :])

    @triton.jit
    def _down_kernel(
        h_ptr, w_ptr, y_ptr, routing_ptr, sorted_ids_ptr, block_expert_ptr,
        num_pairs, num_experts, num_blocks, N, K,
        stride_hm, stride_we, stride_wn, stride_wk, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        INTERPRET_BF16: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One tile of y[pair] = routing_weight[pair] * (h @ down_proj[e].T); N is the hidden size, K is I."""
        pid = tl.program_id(0)
        pid_m = pid % num_blocks
        pid_n = pid // num_blocks
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if expert >= num_experts:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        row_ok = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)

        a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
        b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if INTERPRET_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wk

        out_ty = y_ptr.dtype.element_ty
        weight = tl.load(routing_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        y = _round(_round(acc, out_ty, INTERPRET_BF16) * weight[:, None], out_ty, INTERPRET_BF16).to(out_ty)
        y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y, mask=row_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _swiglu_backward_kernel(
        gu_ptr, grad_act_ptr, routing_rows_ptr, grad_gu_ptr, h_ptr, grad_routing_ptr, total_rows_ptr,
        N, stride_gu, stride_ga, stride_ggu, stride_h,
        BLOCK_N: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    ):  # fmt: skip
        """Per row r (one program): with a = grad_act[r] = grad_out[token] @ down_proj[e] (no routing weight yet),
        grad_routing[r] = <a, h>, and with grad_h = w * a: grad_gate = grad_h * up * silu'(gate),
        grad_up = grad_h * silu(gate). h = silu(gate) * up is recomputed (rounded as in the forward)."""
        row = tl.program_id(0).to(tl.int64)
        if row >= tl.load(total_rows_ptr):  # past the padded end: nothing there was computed
            return
        weight = tl.load(routing_rows_ptr + row).to(tl.float32)
        out_ty = h_ptr.dtype.element_ty
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            ok = offs < N
            gate = tl.load(gu_ptr + row * stride_gu + offs, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(gu_ptr + row * stride_gu + N + offs, mask=ok, other=0.0).to(tl.float32)
            grad_act = tl.load(grad_act_ptr + row * stride_ga + offs, mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            act = _round(gate * sig, out_ty, INTERPRET_BF16)
            h = _round(act * up, out_ty, INTERPRET_BF16)
            dot += grad_act * h
            grad_h = _round(grad_act * weight, out_ty, INTERPRET_BF16)
            grad_up = grad_h * gate * sig
            grad_gate = grad_h * up * sig * (1.0 + gate * (1.0 - sig))
            grad_gate_out = _round(grad_gate, out_ty, INTERPRET_BF16).to(out_ty)
            grad_up_out = _round(grad_up, out_ty, INTERPRET_BF16).to(out_ty)
            tl.store(h_ptr + row * stride_h + offs, h.to(out_ty), mask=ok)
            tl.store(grad_gu_ptr + row * stride_ggu + offs, grad_gate_out, mask=ok)
            tl.store(grad_gu_ptr + row * stride_ggu + N + offs, grad_up_out, mask=ok)
        tl.store(grad_routing_ptr + row, tl.sum(dot, axis=0))


# ----------------------------------------------------------------------------------------------- routing


# Up to this many (token, expert) pairs the routing runs as one program (one launch) instead of three launches
# that each spread over the pairs: decode-sized batches are bound by launches, not by this work. (512 pairs =
# 64 tokens at top-8. On an H200, moe_layer_h200.json: launched eagerly, one launch is the faster up to 128 tokens;
# replayed from a CUDA graph, only up to 16. Static decoding records graphs, so the switch stays below the eager
# crossover. Switching on capture state would need the warmup and the recording to use the same Triton kernels:
# a kernel first loaded while a graph records fails.)
SINGLE_LAUNCH_MAX_PAIRS = 512


def align_routing(top_k_index: torch.Tensor, num_experts: int, block_m: int, single_launch: bool | None = None):
    """Sort the (token, slot) pairs by expert (stable) and pad each expert's rows to a multiple of `block_m`.

    Returns:
        sorted_ids: int32 [num_blocks * block_m], the pair id (token * k + slot) of each row, S on padding rows.
        block_expert: int32 [num_blocks], the expert of each row tile; `num_experts` past the padded end.
        offsets: int32 [num_experts], the padded end row of each expert (cumulative), for grouped GEMMs.
        pair_row: int64 [S], the row of each pair.
    All sizes depend on shapes only (no host sync): num_blocks = ceil(S / block_m) + min(E, S) bounds the tiles.
    Up to SINGLE_LAUNCH_MAX_PAIRS pairs (or with `single_launch=True`) one program does everything; beyond, three
    launches parallel over the pairs (count per chunk, prefix over chunks, scatter).
    """
    device = top_k_index.device
    num_pairs = top_k_index.numel()
    num_blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    num_rows = num_blocks * block_m
    e_pow2 = triton.next_power_of_2(num_experts)
    expert_ids = top_k_index.reshape(-1)
    if single_launch is None:
        single_launch = num_pairs <= SINGLE_LAUNCH_MAX_PAIRS
    pair_row = torch.empty(num_pairs, dtype=torch.int64, device=device)
    if single_launch:
        buffer = torch.empty(num_rows + num_blocks + e_pow2, dtype=torch.int32, device=device)
        sorted_ids, block_expert, offsets = torch.split(buffer, (num_rows, num_blocks, e_pow2))
        _align_single_kernel[(1,)](
            expert_ids, sorted_ids, block_expert, offsets, pair_row, num_pairs, num_experts, num_rows, num_blocks,
            BLOCK_M=block_m, E_POW2=e_pow2, CHUNK=max(16, 8192 // e_pow2), FILL=1024,
            TILES=max(16, 4096 // e_pow2), num_warps=8,
        )  # fmt: skip
        return sorted_ids, block_expert, offsets[:num_experts], pair_row

    chunk = max(16, 8192 // e_pow2)  # pairs per program: a [chunk, e_pow2] one-hot tile
    num_chunks = triton.cdiv(num_pairs, chunk)
    # One int32 allocation, carved up: fewer allocator calls on the decode path.
    sizes = (num_rows, num_blocks, 2 * e_pow2, num_pairs, 2 * num_chunks * e_pow2)
    buffer = torch.empty(sum(sizes), dtype=torch.int32, device=device)
    sorted_ids, block_expert, offsets, rank, chunk_tables = torch.split(buffer, sizes)
    chunk_counts, chunk_base = chunk_tables[: num_chunks * e_pow2], chunk_tables[num_chunks * e_pow2 :]
    _align_count_kernel[(num_chunks,)](expert_ids, chunk_counts, rank, num_pairs, E_POW2=e_pow2, CHUNK=chunk)
    _align_offsets_kernel[(1,)](
        chunk_counts, chunk_base, sorted_ids, block_expert, offsets,
        num_chunks, num_pairs, num_experts, num_rows, num_blocks,
        BLOCK_M=block_m, E_POW2=e_pow2, CHUNKS_PER_STEP=max(16, 4096 // e_pow2), FILL=1024,
    )  # fmt: skip
    _align_scatter_kernel[(num_chunks,)](
        expert_ids, rank, chunk_base, offsets, sorted_ids, pair_row, num_pairs, E_POW2=e_pow2, CHUNK=chunk
    )
    return sorted_ids, block_expert, offsets[:num_experts], pair_row


def align_routing_reference(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """`align_routing` in plain torch ops (the specification the kernel is tested against)."""
    device = top_k_index.device
    num_pairs = top_k_index.numel()
    expert_ids = top_k_index.reshape(-1).long()
    sorted_experts, order = torch.sort(expert_ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts

    num_blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    rank = torch.arange(num_pairs, device=device) - start[sorted_experts]
    row = padded_start[sorted_experts] + rank
    sorted_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[row] = order.to(torch.int32)
    pair_row = torch.empty_like(row)
    pair_row[order] = row
    tile_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, tile_start, right=True).to(torch.int32)
    return sorted_ids, block_expert, padded_end.to(torch.int32), pair_row


# ----------------------------------------------------------------------------------------------- configs


def default_config(num_tokens: int, num_experts: int, top_k: int) -> dict:
    """Tiles for shapes or GPUs without a tuned entry: BLOCK_M follows the expected rows per expert."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 48 else 64
    gemm = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": block_m, "gate_up": dict(gemm), "down": dict(gemm)}


@lru_cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _fit_to_dtype(config: dict, dtype: torch.dtype) -> dict:
    """Tables are tuned for 16-bit weights. Full-precision float32 dots run on the FMA units with operands and
    accumulators in registers, so float32 gets at most 32 x 64 tiles, BLOCK_K 32, 3 stages and 8 warps for gate_up:
    larger 16-bit tiles spill registers there (with triton 3.6 and 3.9) (benchmarks/kernel_resources.py checks that none does)."""
    if dtype != torch.float32:
        return config
    fitted = {"BLOCK_M": min(config["BLOCK_M"], 32)}
    for gemm in ("gate_up", "down"):
        tiles = dict(config[gemm])
        tiles["BLOCK_N"] = min(tiles["BLOCK_N"], 64)
        tiles["BLOCK_K"] = min(tiles["BLOCK_K"], 32)
        tiles["num_warps"] = 8 if gemm == "gate_up" else 4  # gate_up holds two accumulators
        tiles["num_stages"] = min(tiles.get("num_stages", 3), 3)
        fitted[gemm] = tiles
    return fitted


def get_config(num_tokens: int, num_experts: int, hidden: int, intermediate: int, top_k: int, device) -> dict:
    """The tuned entry for this GPU and shape at the smallest token bucket >= num_tokens, else the default."""
    if _interpreting() or device.type != "cuda":
        # Interpreter: few programs with small tiles are the fastest to emulate.
        return {"BLOCK_M": 16, "gate_up": {"BLOCK_N": 32, "BLOCK_K": 32}, "down": {"BLOCK_N": 32, "BLOCK_K": 32}}
    table = FUSED_MOE_CONFIGS.get(_device_name(device), {})
    buckets = table.get(f"E={num_experts},H={hidden},I={intermediate}")
    if not buckets:
        return default_config(num_tokens, num_experts, top_k)
    keys = sorted(buckets)
    key = next((k for k in keys if k >= num_tokens), keys[-1])
    return buckets[key]


# ----------------------------------------------------------------------------------------------- launches


def _dot_options(dtype: torch.dtype) -> dict:
    # float32 must match the eager path: full-precision dots, not TF32.
    return {
        "INTERPRET_BF16": _interpreting() and dtype == torch.bfloat16,
        "PRECISION": "ieee" if dtype == torch.float32 else None,
    }


def _launch_gate_up(x, gate_up, sorted_ids, block_expert, top_k, config, store_gate_up):
    num_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    rows = sorted_ids.numel()
    num_blocks = block_expert.numel()
    h = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    gu = torch.empty(rows, two_i, dtype=x.dtype, device=x.device) if store_gate_up else h
    tiles = config["gate_up"]
    grid = (num_blocks * triton.cdiv(inter, tiles["BLOCK_N"]),)
    launch = {k: v for k, v in tiles.items() if k in ("num_warps", "num_stages")}
    _gate_up_kernel[grid](
        x, gate_up, h, gu, sorted_ids, block_expert,
        x.shape[0] * top_k, top_k, num_experts, num_blocks, inter, hidden,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), h.stride(0), gu.stride(0),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"],
        STORE_GATE_UP=store_gate_up, **_dot_options(x.dtype), **launch,
    )  # fmt: skip
    return h, (gu if store_gate_up else None)


def _launch_down(h, down, routing, sorted_ids, block_expert, num_pairs, config, zero_fill=False):
    num_experts, hidden, inter = down.shape
    num_blocks = block_expert.numel()
    # zero_fill: the rows of skipped pairs (expert parallelism) are never written and must read as zeros.
    y = (torch.zeros if zero_fill else torch.empty)(num_pairs, hidden, dtype=h.dtype, device=h.device)
    tiles = config["down"]
    grid = (num_blocks * triton.cdiv(hidden, tiles["BLOCK_N"]),)
    launch = {k: v for k, v in tiles.items() if k in ("num_warps", "num_stages")}
    _down_kernel[grid](
        h, down, y, routing, sorted_ids, block_expert,
        num_pairs, num_experts, num_blocks, hidden, inter,
        h.stride(0), down.stride(0), down.stride(1), down.stride(2), y.stride(0),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], BLOCK_K=tiles["BLOCK_K"],
        **_dot_options(h.dtype), **launch,
    )  # fmt: skip
    return y


# ----------------------------------------------------------------------------------------------- backward helpers


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch's grouped GEMM: torch >= 2.9 on CPU, bfloat16 on CUDA SM >= 8.0, strides in 16-byte multiples."""
    if not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return False
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if a.is_cuda and (a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device) < (8, 0)):
        return False
    for t in (a, b):
        if any((s * t.element_size()) % 16 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1):
            return False
        if t.data_ptr() % 16:
            return False
    return True


def _torch_grouped_mm(a, b, offs):
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[rows of group e] = a[rows of group e] @ b[e]; a: [P, K], b: [E, K, N]; group e ends at row offs[e].
    Rows past offs[-1] are left unset."""
    if _grouped_mm_ok(a, b):
        return _torch_grouped_mm(a, b, offs)
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=a.dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync; backward only
        if end > start:
            torch.mm(a[start:end], b[e], out=out[start:end])
        start = end
    return out


def grouped_weight_grad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[e] = a[rows of group e].T @ b[rows of group e]; a: [P, M], b: [P, N] -> [E, M, N]."""
    a_t = a.t()
    if _grouped_mm_ok(a_t, b):
        return _torch_grouped_mm(a_t, b, offs)
    out = torch.zeros(offs.numel(), a.shape[1], b.shape[1], dtype=a.dtype, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a_t[:, start:end], b[start:end], out=out[e])
        start = end
    return out


def _swiglu_backward(gu: torch.Tensor, grad_act: torch.Tensor, w_rows: torch.Tensor, offsets: torch.Tensor):
    """(grad of gate_up output, h, grad of the routing weight) for every row; see `_swiglu_backward_kernel`."""
    rows, two_i = gu.shape
    inter = two_i // 2
    grad_gu = torch.empty_like(gu)
    h = torch.empty(rows, inter, dtype=gu.dtype, device=gu.device)
    grad_routing = torch.empty(rows, dtype=torch.float32, device=gu.device)
    block_n = min(1024, triton.next_power_of_2(inter))
    _swiglu_backward_kernel[(rows,)](
        gu, grad_act, w_rows, grad_gu, h, grad_routing, offsets[-1:],
        inter, gu.stride(0), grad_act.stride(0), grad_gu.stride(0), h.stride(0),
        BLOCK_N=block_n, INTERPRET_BF16=_interpreting() and gu.dtype == torch.bfloat16,
    )  # fmt: skip
    return grad_gu, h, grad_routing


# ----------------------------------------------------------------------------------------------- autograd


def _fused_forward(
    hidden_states, top_k_weights, gate_up_proj, down_proj, top_k_index, config, expert_parallel, keep_for_backward
):
    """The forward launches; returns the output and, with `keep_for_backward`, what the backward needs.

    With `expert_parallel`, `top_k_index` may hold the id `num_experts` (the local count): a route to another
    rank's expert. Those pairs are sorted into one more bucket after the real experts, whose tiles the kernels
    skip (they own no weights), and their output rows stay zero."""
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[1]
    num_pairs = num_tokens * top_k
    num_experts = gate_up_proj.shape[0]
    buckets = num_experts + 1 if expert_parallel else num_experts
    sorted_ids, block_expert, offsets, pair_row = align_routing(top_k_index, buckets, config["BLOCK_M"])
    offsets = offsets[:num_experts]  # the grouped GEMMs of the backward stop at the real experts' end
    routing = top_k_weights.reshape(-1).contiguous()
    h, gu = _launch_gate_up(
        hidden_states, gate_up_proj, sorted_ids, block_expert, top_k, config, keep_for_backward
    )  # fmt: skip
    y = _launch_down(h, down_proj, routing, sorted_ids, block_expert, num_pairs, config, zero_fill=expert_parallel)
    # Sum over the k slots in the model dtype (fp32 accumulation inside), as transformers' grouped_mm does.
    out = y.view(num_tokens, top_k, hidden).sum(dim=1)
    saved = (hidden_states, routing, gate_up_proj, down_proj, sorted_ids, offsets, pair_row, gu, top_k_index)
    return out, (saved if keep_for_backward else None)


class FusedMoEFunction(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * down[e_tj] @ (silu(gate[e_tj] @ x[t]) * (up[e_tj] @ x[t])), e_tj = top_k_index[t, j]."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_weights, gate_up_proj, down_proj, top_k_index, config, expert_parallel):
        needs_grad = any(ctx.needs_input_grad[:4])
        out, saved = _fused_forward(
            hidden_states, top_k_weights, gate_up_proj, down_proj, top_k_index, config, expert_parallel, needs_grad
        )  # fmt: skip
        if needs_grad:
            ctx.save_for_backward(*saved)
            ctx.top_k = top_k_index.shape[1]
            ctx.expert_parallel = expert_parallel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden_states, routing, gate_up_proj, down_proj, sorted_ids, offsets, pair_row, gu, top_k_index = (
            ctx.saved_tensors
        )
        top_k = ctx.top_k
        num_tokens, hidden = hidden_states.shape
        dtype = hidden_states.dtype
        grad_out = grad_out.to(dtype).contiguous()
        zero_row = grad_out.new_zeros(1, hidden)
        # Rows in the padded sorted layout; padding rows (id S) read a zero row / zero weight.
        token_of_row = sorted_ids.long() // top_k
        grad_rows = torch.cat([grad_out, zero_row])[token_of_row]
        x_rows = torch.cat([hidden_states, zero_row])[token_of_row]
        w_rows = torch.cat([routing, routing.new_zeros(1)])[sorted_ids.long()]

        # d(out)/d(expert output) = w; the expert output itself is never stored: <g, y> = <g @ down, h>.
        grad_act = grouped_matmul(grad_rows, down_proj, offsets)
        grad_gu, h, grad_routing_rows = _swiglu_backward(gu, grad_act, w_rows, offsets)
        grad_down = grouped_weight_grad(grad_rows * w_rows.unsqueeze(-1), h, offsets)
        grad_x_rows = grouped_matmul(grad_gu, gate_up_proj, offsets)
        grad_gate_up = grouped_weight_grad(grad_gu, x_rows, offsets)

        grad_x_pairs, grad_routing_pairs = grad_x_rows[pair_row], grad_routing_rows[pair_row]
        if ctx.expert_parallel:  # skipped pairs' rows lie past the grouped GEMMs' end: never computed
            skipped = top_k_index.reshape(-1) >= gate_up_proj.shape[0]
            grad_x_pairs = grad_x_pairs.masked_fill(skipped[:, None], 0.0)
            grad_routing_pairs = grad_routing_pairs.masked_fill(skipped, 0.0)
        grad_x = grad_x_pairs.view(num_tokens, top_k, hidden).sum(dim=1)
        grad_routing = grad_routing_pairs.view(num_tokens, top_k).to(routing.dtype)
        return grad_x, grad_routing, grad_gate_up, grad_down, None, None, None


# ----------------------------------------------------------------------------------------------- compiled graphs
# Inside torch.compile (the static decoding step of generate) the inference forward is one opaque op: dynamo does
# not trace the host-side launch logic or the Triton launches, and a CUDA graph captures the kernels as they run.


def _launch_config(hidden_states, gate_up_proj, top_k_index) -> dict:
    num_experts, two_i, hidden = gate_up_proj.shape
    config = get_config(hidden_states.shape[0], num_experts, hidden, two_i // 2, top_k_index.shape[1], hidden_states.device)
    return _fit_to_dtype(config, gate_up_proj.dtype)


def _fused_inference(hidden_states, top_k_weights, gate_up_proj, down_proj, top_k_index, expert_parallel):
    config = _launch_config(hidden_states, gate_up_proj, top_k_index)
    args = (hidden_states, top_k_weights, gate_up_proj, down_proj, top_k_index, config, expert_parallel)
    return _fused_forward(*args, keep_for_backward=False)[0]


def _register_inference_op():
    """`torch.ops.llada_moe.fused_experts`, registered once per process (the package and a Hub copy of this file
    may both be imported)."""
    try:
        return torch.ops.llada_moe.fused_experts
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("llada_moe::fused_experts", mutates_args=())
    def fused_experts(
        hidden_states: torch.Tensor,
        top_k_weights: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_index: torch.Tensor,
        expert_parallel: bool,
    ) -> torch.Tensor:
        return _fused_inference(hidden_states, top_k_weights, gate_up_proj, down_proj, top_k_index, expert_parallel)

    @fused_experts.register_fake
    def _(hidden_states, top_k_weights, gate_up_proj, down_proj, top_k_index, expert_parallel):
        return hidden_states.new_empty(hidden_states.shape)

    return torch.ops.llada_moe.fused_experts


_FUSED_EXPERTS_OP = _register_inference_op()


# ----------------------------------------------------------------------------------------------- entry point


def fused_moe_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The `fused_moe` experts implementation (same signature as transformers' `grouped_mm_experts_forward`)."""
    reason = fused_moe_unavailable_reason(hidden_states.device)
    if reason is not None:
        raise RuntimeError(
            f'experts_implementation="{FUSED_MOE_NAME}" cannot run here: {reason}. Use experts_implementation='
            '"grouped_mm" or "eager" instead (model.set_experts_implementation("grouped_mm")).'
        )
    name = f'experts_implementation="{FUSED_MOE_NAME}"'
    if getattr(self, "has_bias", False):
        raise NotImplementedError(f"{name} does not support expert biases.")
    if getattr(self, "is_transposed", False) or not getattr(self, "has_gate", True):
        raise NotImplementedError(f"{name} expects gate_up_proj [E, 2I, H] and down_proj [E, H, I].")
    act = type(self.act_fn).__name__
    if act not in ("SiLUActivation", "SiLU"):
        raise NotImplementedError(f"{name} fuses SiLU only; this model uses {act}.")

    # Read through the module attributes on every call (PEFT's LoRA reparametrises them).
    gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
    if gate_up_proj.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"{name} runs in float32, bfloat16 or float16, not {gate_up_proj.dtype}; convert the model "
            "(model.to(torch.bfloat16)) or use the eager experts."
        )
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    # grouped_mm casts the input to the weight dtype (no autocast support); do the same.
    hidden_states = hidden_states.to(gate_up_proj.dtype)
    top_k_weights = top_k_weights.to(gate_up_proj.dtype)
    # Expert parallelism (this rank holds fewer experts than the config; transformers >= 5.19 also sets
    # `_is_expert_parallel`): routes to another rank's experts arrive with the id `num_experts` and weight 0.
    num_experts = gate_up_proj.shape[0]
    global_experts = getattr(getattr(self, "config", None), "num_experts", num_experts)
    expert_parallel = bool(getattr(self, "_is_expert_parallel", False)) or num_experts < global_experts
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, top_k_weights, gate_up_proj, down_proj)):
        config = _launch_config(hidden_states, gate_up_proj, top_k_index)
        return FusedMoEFunction.apply(
            hidden_states, top_k_weights, gate_up_proj, down_proj, top_k_index, config, expert_parallel
        )
    # Inference (generation): no autograd node, no tensors kept; fewer host-side steps per layer.
    args = (hidden_states.contiguous(), top_k_weights, gate_up_proj, down_proj, top_k_index, expert_parallel)
    if torch.compiler.is_compiling():
        return _FUSED_EXPERTS_OP(*args)
    return _fused_inference(*args)


def register_fused_moe_experts():
    """Register `fused_moe` with transformers' ExpertsInterface (idempotent). Registered even where it cannot run,
    so that selecting it there gives the clear error above rather than "not a valid experts implementation"."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(FUSED_MOE_NAME, fused_moe_experts_forward)


register_fused_moe_experts()
