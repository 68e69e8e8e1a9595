# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""The KV-cache manager of block-wise diffusion decoding (Fast-dLLM's prefix and dual caches).

This file travels to the Hub as custom code: keep it flat, with no imports from the package.
"""

import torch


class BlockKVCache:
    """Approximate KV cache for block-wise diffusion decoding, with one fixed-size buffer per layer.

    Every layer keeps the key/value states (post-RoPE, `[batch, kv_heads, length, head_dim]`) of the whole
    sequence. A forward writes the fresh key/values of the positions it runs (`write_index`) into the buffers and
    attends over the whole sequence. At the start of each block a full forward rewrites every position; a cached
    step then runs only a query window: [block start, end of sequence) in prefix mode (the prefix is cached), or
    [block start, block end) in dual mode (prefix and the still-masked suffix are cached). The model's attention
    calls `update(key, value, layer_idx)` and uses what it returns as the full key/value states.

    The buffers never change shape or address (`allocate`), so a compiled or CUDA-graph-captured step can write
    into them; `write_index` is a device tensor, so moving the window from block to block needs no new graph.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write_index: torch.Tensor | None = None  # None: the next forward runs (and writes) every position
        self.refreshes = 0

    def allocate(self, num_layers, batch_size, num_kv_heads, length, head_dim, dtype, device, static=False):
        """Preallocate every layer's buffers. `static=True` marks them as fixed addresses for CUDA graphs."""
        shape = (batch_size, num_kv_heads, length, head_dim)
        for layer_idx in range(num_layers):
            for store in (self.keys, self.values):
                buffer = store.get(layer_idx)
                if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
                    buffer = torch.zeros(shape, dtype=dtype, device=device)
                    if static:
                        torch._dynamo.mark_static_address(buffer)
                    store[layer_idx] = buffer
        return self

    def record(self):
        """The next forward is a full pass whose key/values replace the cache."""
        self.write_index = None
        self.refreshes += 1

    def use(self, start: int, end: int):
        """Following forwards run positions [start, end) against the cache."""
        device = next(iter(self.keys.values())).device if self.keys else None
        self.write_index = torch.arange(start, end, device=device)

    def use_positions(self, index: torch.Tensor, refresh: bool = False):
        """Following forwards run the positions `index` (a 1-D device tensor); `refresh`: they are all positions."""
        self.write_index = index
        self.refreshes += int(refresh)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        index = self.write_index
        keys, values = self.keys.get(layer_idx), self.values.get(layer_idx)
        if index is None:  # a full pass
            if keys is None or keys.shape != key_states.shape:
                self.keys[layer_idx], self.values[layer_idx] = key_states.clone(), value_states.clone()
                return key_states, value_states
            keys.copy_(key_states)
            values.copy_(value_states)
            return keys, values
        if keys is None:
            raise ValueError("BlockKVCache: a windowed forward needs a full pass (or allocate()) first.")
        if key_states.shape[-2] != index.shape[0]:
            raise ValueError(f"BlockKVCache: got {key_states.shape[-2]} new positions for {index.shape[0]} slots.")
        # In place: every step of the block rewrites its window before attention reads the whole sequence.
        keys.index_copy_(2, index, key_states)
        values.index_copy_(2, index, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0


__all__ = ["BlockKVCache"]
