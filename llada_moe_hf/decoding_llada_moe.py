# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""The sampler pieces of LLaDA diffusion decoding, as small functions over tensors.

One denoising step looks at a *window* of the canvas (the current block, or the whole sequence when the prompt
has masks to fill) and its logits, and decides which masked positions to commit:

1. `filter_top_k_top_p` and `add_gumbel_noise` turn logits into sampling scores; the candidate token `x0` of
   each position is their argmax;
2. `confidence_scores` says how sure the model is of each candidate (the remasking strategy);
3. a *decoder policy* picks the positions to commit from the confidences: `fixed_schedule_decoder` (the
   reference: a precomputed number per step) or `threshold_decoder` (Fast-dLLM / dInfer: all that clear a
   threshold). A new policy is one function here plus one entry in `DECODERS`.

`denoise_window` chains them. Everything is shape-static and free of host synchronisation, so the same code runs
eagerly and inside a compiled (CUDA-graph) denoising step. Random numbers are drawn by the caller and passed in:
a compiled graph must not own the random stream, and the eager and compiled paths must see the same numbers.

This file travels to the Hub as custom code: keep it flat, with no imports from the package.
"""

import torch
import torch.nn.functional as F


REMASKING_STRATEGIES = ("low_confidence", "random", "margin", "entropy")


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear schedule: `mask_count[b]` tokens spread over `steps` steps, the remainder on the first steps.
    Returns `[batch, steps]` (int64), as the reference `get_num_transfer_tokens`."""
    base = mask_count // steps
    remainder = mask_count % steps
    schedule = base[:, None].expand(-1, steps).clone()
    schedule += torch.arange(steps, device=mask_count.device)[None, :] < remainder[:, None]
    return schedule


def add_gumbel_noise(logits: torch.Tensor, temperature, uniform: torch.Tensor | None) -> torch.Tensor:
    """Gumbel-max scores exp(logits) / (-log u)^temperature in float64 (float32 is not enough to keep the
    sampled distribution right, per the LLaDA authors). `uniform` holds u ~ U(0, 1) of the logits' shape, in
    float64; None means temperature 0 (greedy: the logits as they are). `temperature` may be a 0-d tensor."""
    if uniform is None:
        return logits
    return logits.to(torch.float64).exp() / (-torch.log(uniform)) ** temperature


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. The best token is always kept. `top_p` may be
    a 0-d tensor (then it is applied whatever its value)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and (isinstance(top_p, torch.Tensor) or top_p < 1.0):
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def confidence_scores(
    logits: torch.Tensor, x0: torch.Tensor, remasking: str, uniform: torch.Tensor | None, upcast: bool
) -> torch.Tensor:
    """How sure the model is of each position's candidate `x0`; the most confident positions are committed first.
    The reference computes the softmax in the logits' dtype (`upcast=False`); the threshold decoder in float32.
    "random" ranks positions by `uniform` (U(0, 1) of x0's shape)."""
    if remasking == "random":
        return uniform
    probs = F.softmax(logits.float() if upcast else logits, dim=-1)
    if remasking == "low_confidence":
        return torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    if remasking == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    # entropy: lower entropy = more confident
    return (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


# ----------------------------------------------------------------------------------------------- decoder policies
# A decoder policy takes `confidence` [batch, W] (-inf at positions that are not candidates), `candidates`
# [batch, W] (bool) and its own keyword arguments, and returns the positions to commit [batch, W] (bool).


def fixed_schedule_decoder(confidence, candidates, *, counts, max_count, **unused):
    """The reference: commit the `counts[b]` most confident candidates of each row (`counts` [batch] on the
    device, `max_count` its maximum as a Python int). With equal counts this is `torch.topk(confidence, k)` per
    row, exactly as the reference loop."""
    select = torch.zeros_like(candidates)
    if max_count == 0:
        return select
    top = torch.topk(confidence, max_count, dim=-1).indices
    rank_ok = torch.arange(max_count, device=counts.device)[None, :] < counts[:, None]
    return select.scatter(-1, top, rank_ok)


def threshold_decoder(confidence, candidates, *, threshold, **unused):
    """Confidence-threshold parallel decoding: commit every candidate whose confidence is at least `threshold`,
    and at least the single most confident one, so that every step makes progress."""
    select = candidates & (confidence >= threshold)
    best = confidence.argmax(dim=-1, keepdim=True)
    return select.scatter(-1, best, candidates.gather(-1, best))


DECODERS = {"fixed": fixed_schedule_decoder, "threshold": threshold_decoder}


def denoise_window(
    window: torch.Tensor,
    logits: torch.Tensor,
    candidates: torch.Tensor,
    *,
    decoder: str,
    mask_id: int,
    temperature=0.0,
    top_k: int | None = None,
    top_p=None,
    remasking: str = "low_confidence",
    gumbel_uniform: torch.Tensor | None = None,
    remask_uniform: torch.Tensor | None = None,
    **decoder_args,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising decision over a window.

    Args:
        window: `[batch, W]` token ids; undecided positions hold `mask_id`.
        logits: `[batch, W, vocab]` for those positions.
        candidates: `[batch, W]` bool, the masked positions that may be committed now.
        decoder: a key of `DECODERS`; `decoder_args` are its keyword arguments (`counts`/`max_count` or
            `threshold`).
        gumbel_uniform, remask_uniform: the random numbers of the step (U(0, 1)): Gumbel-max sampling with
            `temperature` when `gumbel_uniform` is given (greedy otherwise), and the "random" ranking.
        Numbers (`temperature`, `top_p`, `threshold`) may be Python numbers or 0-d tensors.

    Returns the new window (committed positions hold their token) and the number of tokens committed per row.
    """
    if top_k is not None or top_p is not None:
        logits = filter_top_k_top_p(logits, top_k, top_p)
    scores = add_gumbel_noise(logits, temperature, gumbel_uniform)
    upcast = decoder != "fixed"
    if upcast:
        # Parallel decoders never commit the mask token itself (a position could loop on it forever).
        scores = scores.index_fill(-1, torch.tensor([mask_id], device=scores.device), float("-inf"))
    x0 = torch.argmax(scores, dim=-1)
    confidence = confidence_scores(logits, x0, remasking, remask_uniform, upcast=upcast)
    confidence = torch.where(candidates, confidence, torch.full_like(confidence, float("-inf")))
    x0 = torch.where(candidates, x0, window)
    select = DECODERS[decoder](confidence, candidates, **decoder_args)
    # The reference writes x0 at every selected position; non-candidates keep their token (x0 = window there).
    committed = (select & candidates & (x0 != mask_id)).sum(-1)
    return torch.where(select, x0, window), committed


__all__ = [
    "DECODERS",
    "REMASKING_STRATEGIES",
    "add_gumbel_noise",
    "confidence_scores",
    "denoise_window",
    "filter_top_k_top_p",
    "fixed_schedule_decoder",
    "num_transfer_tokens",
    "threshold_decoder",
]
