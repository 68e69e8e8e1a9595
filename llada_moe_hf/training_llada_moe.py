# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""The LLaDA masked-diffusion training objective. Travels to the Hub with the modeling file (flat, no extras)."""

import torch
import torch.nn.functional as F
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func


def masked_diffusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    p_mask: torch.Tensor | None,
    loss_normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on masked positions (labels != -100), each weighted by 1 / t, summed per sequence, divided
    by the sequence's normaliser (its length in pre-training, its answer length in SFT), averaged over the batch.

    A batch with no masked position gives 0 (connected to the graph), never NaN.
    """
    if p_mask is None:
        raise ValueError(
            "labels were given without p_mask: the masked-diffusion loss weights each masked token by 1/t. "
            "Build batches with LLaDAMoEDataCollator (or pass p_mask, the masking probability per sequence or token)."
        )
    batch_size, seq_len = labels.shape
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape[:2])}.")
    p_mask = p_mask.to(logits.device, torch.float32)
    if p_mask.dim() == 1:
        p_mask = p_mask[:, None].expand(batch_size, seq_len)
    masked = labels != -100
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(batch_size, seq_len)
    weighted = torch.where(masked, token_loss / p_mask.clamp_min(1e-12), torch.zeros_like(token_loss))
    if loss_normalizer is None:
        loss_normalizer = torch.full((batch_size,), float(seq_len), device=logits.device)
    loss_normalizer = loss_normalizer.to(logits.device, torch.float32).clamp_min(1.0)
    return (weighted.sum(dim=1) / loss_normalizer).mean()


def router_load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all layers' router logits (transformers' implementation)."""
    return load_balancing_loss_func(tuple(router_logits), num_experts, top_k, attention_mask)
