# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""The LLaDA masked-diffusion training objective. Travels to the Hub with the modeling file (flat, no extras).

Two halves that meet in `LLaDAMoEForDiffusionLM.forward(labels=..., p_mask=..., loss_normalizer=...)`:

* `LLaDAMoEDataCollator` noises clean token sequences (the forward process of the diffusion) and returns the
  batch the model's forward takes;
* `masked_diffusion_loss` turns the model's logits on that batch into the LLaDA loss.

Because the batch carries everything the loss needs, `transformers.Trainer` works unchanged (pass the collator
as `data_collator` and `remove_unused_columns=False`, so that `prompt_length` reaches it).
"""

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func


IGNORE_INDEX = -100
COLLATOR_MODES = ("sft", "pretrain")


def masked_diffusion_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    p_mask: torch.Tensor | None,
    loss_normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on masked positions (labels != -100), each weighted by 1 / t, summed per sequence, divided
    by the sequence's normaliser (its length in pre-training, its answer length in SFT), averaged over the batch.

    Without `p_mask` (labels alone, as transformers' masked-LM heads take them) it is the plain masked-LM loss:
    the mean cross-entropy over the labelled positions. The LLaDA objective needs `p_mask`, which
    `LLaDAMoEDataCollator` provides.

    A batch with no masked position gives 0 (connected to the graph), never NaN.
    """
    batch_size, seq_len = labels.shape
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape[:2])}.")
    if p_mask is None:
        token_loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        return token_loss / (labels != IGNORE_INDEX).sum().clamp_min(1)
    p_mask = p_mask.to(logits.device, torch.float32)
    if p_mask.dim() == 1:
        p_mask = p_mask[:, None].expand(batch_size, seq_len)
    masked = labels != IGNORE_INDEX
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch_size, seq_len)
    weighted = torch.where(masked, token_loss / p_mask.clamp_min(1e-12), torch.zeros_like(token_loss))
    if loss_normalizer is None:
        loss_normalizer = torch.full((batch_size,), float(seq_len), device=logits.device)
    loss_normalizer = loss_normalizer.to(logits.device, torch.float32).clamp_min(1.0)
    return (weighted.sum(dim=1) / loss_normalizer).mean()


def router_load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all layers' router logits (transformers' implementation)."""
    return load_balancing_loss_func(tuple(router_logits), num_experts, top_k, attention_mask)


@dataclass
class LLaDAMoEDataCollator:
    r"""
    Builds masked-diffusion training batches (the LLaDA forward process) from tokenized examples.

    Each feature is a dict with `"input_ids"` (a list of ints or a 1-D tensor: the clean sequence) and, in SFT
    mode, `"prompt_length"` (int: how many leading tokens are the prompt, chat template included). For
    `"input_ids"` of an SFT example, use `tokenize_sft_example`: prompt (chat template, generation prompt) +
    response + one EOS.

    Per sequence b of the batch (padded to the longest sequence, or truncated to `max_length`):

        t_b ~ U(0, 1),   p_b = (1 - eps) * t_b + eps              (the masking ratio, in (eps, 1])
        m_bi ~ Bernoulli(p_b) for each maskable position i         (prompt and padding are never masked)
        noised x_bi = mask_token_id where m_bi, else the clean token
        loss = (1 / B) * sum_b (1 / N_b) * sum_{i: m_bi} CE(logits_bi, clean x_bi) / p_b

    * `mode="sft"` (LLaDA paper, SMDM / LLaDA GUIDELINES): maskable positions are all positions from
      `prompt_length` on. Sequences are right-padded with `pad_token_id` (LLaDA pads with EOS): the padding
      **counts as response** (it is maskable, predicted and in N_b), which is how the model learns to stop.
      N_b = padded length - prompt_length_b (the answer length, EOS padding included). No attention mask is
      returned: every position, padding included, is attended.
    * `mode="pretrain"`: every real token is maskable and N_b = the sequence's real length (with equal lengths
      this is LLaDA's `sum / (B * L)`). Shorter sequences are padded with `pad_token_id`; padding is never
      masked, is excluded from N_b, and is hidden by the returned `attention_mask`.

    Returns a dict of tensors: `input_ids` (noised, long [B, L]), `labels` (clean token at masked positions,
    -100 elsewhere, long [B, L]), `p_mask` (p_b broadcast to every position, float32 [B, L]),
    `loss_normalizer` (N_b, float32 [B]) and, in pre-training mode, `attention_mask` (long [B, L]).
    A sequence that happens to get no masked position contributes 0 to the loss (never NaN).

    Randomness: `generator` (a `torch.Generator`), else `seed` (a private generator seeded once), else torch's
    global RNG (what `transformers.Trainer` seeds). A private generator is copied into each DataLoader worker,
    so with `dataloader_num_workers > 0` prefer the global RNG.

    Args:
        mask_token_id: the `<|mask|>` id (`config.mask_token_id`; 156895 for the release).
        pad_token_id: the padding id; the release pads with EOS (156892).
        mode: "sft" or "pretrain".
        eps: the smallest masking ratio (LLaDA uses 1e-3).
        max_length: truncate longer sequences to this many tokens (SFT: the response is cut, never the prompt;
            an example whose prompt fills `max_length` is refused).
        seed, generator: see Randomness.
    """

    mask_token_id: int
    pad_token_id: int
    mode: str = "sft"
    eps: float = 1e-3
    max_length: int | None = None
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in COLLATOR_MODES:
            raise ValueError(f"LLaDAMoEDataCollator.mode must be one of {COLLATOR_MODES}, got {self.mode!r}.")
        for name in ("mask_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"LLaDAMoEDataCollator.{name} must be a non-negative int, got {value!r} "
                    "(use config.mask_token_id and config.pad_token_id)."
                )
        if self.mask_token_id == self.pad_token_id:
            raise ValueError(
                f"mask_token_id and pad_token_id are both {self.mask_token_id}: padding would read as masked tokens."
            )
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"LLaDAMoEDataCollator.eps must be in (0, 1), got {self.eps!r} (LLaDA uses 1e-3).")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"LLaDAMoEDataCollator.max_length must be an int >= 2 or None, got {self.max_length!r}.")
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("LLaDAMoEDataCollator got an empty batch.")
        sequences, starts = [], []
        for index, feature in enumerate(features):
            ids, start = self._read_feature(index, feature)
            sequences.append(ids)
            starts.append(start)
        batch_size, length = len(sequences), max(len(s) for s in sequences)

        clean = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in sequences])
        for row, ids in enumerate(sequences):
            clean[row, : len(ids)] = ids
        positions = torch.arange(length)[None, :]
        starts = torch.tensor(starts)[:, None]
        if self.mode == "sft":
            # Prompt never masked; EOS padding is part of the answer (the model learns to stop).
            maskable = positions >= starts
        else:
            maskable = positions < lengths[:, None]
        loss_normalizer = maskable.sum(dim=1).to(torch.float32)

        t = torch.rand(batch_size, generator=self.generator)
        p_mask = ((1.0 - self.eps) * t + self.eps)[:, None].expand(batch_size, length).contiguous()
        masked = (torch.rand(batch_size, length, generator=self.generator) < p_mask) & maskable

        batch = {
            "input_ids": torch.where(masked, torch.full_like(clean, self.mask_token_id), clean),
            "labels": torch.where(masked, clean, torch.full_like(clean, IGNORE_INDEX)),
            "p_mask": p_mask,
            "loss_normalizer": loss_normalizer,
        }
        if self.mode == "pretrain":
            batch["attention_mask"] = (positions < lengths[:, None]).long()
        return batch

    def _read_feature(self, index: int, feature: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if "input_ids" not in feature:
            raise ValueError(f"feature {index} has no 'input_ids' (keys: {sorted(feature)}).")
        ids = torch.as_tensor(feature["input_ids"], dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError(f"feature {index} has empty 'input_ids'.")
        if (ids == self.mask_token_id).any():
            raise ValueError(
                f"feature {index} already contains mask_token_id {self.mask_token_id}: training inputs must be "
                "clean text (the collator does the masking). Check the tokenizer and mask_token_id."
            )
        if self.max_length is not None:
            ids = ids[: self.max_length]
        if self.mode == "pretrain":
            return ids, 0
        if "prompt_length" not in feature:
            raise ValueError(
                f"feature {index} has no 'prompt_length', which SFT mode needs (tokenize with "
                "tokenize_sft_example). With transformers.Trainer set TrainingArguments(remove_unused_columns=False): "
                "otherwise the Trainer drops 'prompt_length' before the collator sees it. For plain text use mode='pretrain'."
            )
        prompt_length = int(feature["prompt_length"])
        if not 0 <= prompt_length < len(ids):
            raise ValueError(
                f"feature {index}: prompt_length={prompt_length} leaves no response token in a sequence of "
                f"{len(ids)} tokens{' after truncation to max_length' if self.max_length else ''}. Drop such "
                "examples or raise max_length."
            )
        return ids, prompt_length


def tokenize_sft_example(
    tokenizer,
    prompt: str | list[dict[str, str]],
    response: str,
    max_length: int | None = None,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Tokenize one prompt/response pair for SFT: `{"input_ids": [...], "prompt_length": n}` for the collator.

    `prompt` is a user message string or a list of chat messages (e.g. a system message first). With the chat
    template, the prompt is the conversation with the generation prompt (`<role>ASSISTANT</role>` for
    LLaDA-MoE) and the response is the rest of the conversation with the assistant turn appended (the answer and
    the template's end-of-turn, `<|role_end|>`), followed by one EOS; the collator's EOS padding supplies the
    rest. Pass `chat_template` when the tokenizer has none (`llada_moe_hf.chat.CHAT_TEMPLATE`). Raises
    ValueError when the template does not render the prompt as a prefix of the conversation, or when the
    prompt alone fills `max_length`.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass chat_template= (llada_moe_hf.chat.CHAT_TEMPLATE is the "
            "release's format) or set tokenizer.chat_template."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; SFT responses must end with EOS.")

    def render(conversation, add_generation_prompt):
        ids = tokenizer.apply_chat_template(
            conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    prompt_ids = render(messages, add_generation_prompt=True)
    full_ids = render(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise ValueError(
            "the chat template does not render the prompt (with add_generation_prompt=True) as a prefix of the "
            "conversation with the answer appended; tokenize_sft_example cannot split prompt and response."
        )
    input_ids = full_ids + [tokenizer.eos_token_id]
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            raise ValueError(
                f"the prompt alone is {len(prompt_ids)} tokens, which fills max_length={max_length}: no room for a response."
            )
        input_ids = input_ids[:max_length]
    return {"input_ids": input_ids, "prompt_length": len(prompt_ids)}


__all__ = ["LLaDAMoEDataCollator", "masked_diffusion_loss", "router_load_balancing_loss", "tokenize_sft_example"]
