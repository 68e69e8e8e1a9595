# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Diffusion generation for LLaDA-MoE: `model.generate()` runs the LLaDA sampler.

The default settings are the original sampler (the LLaDA/LLaDA-MoE model-card `generate` loop): the answer is
split into blocks decoded left to right (semi-autoregressive); inside a block, each denoising step runs the
model on the whole sequence and commits a fixed number of the most confident masked positions (a linear
schedule over the block's steps); with `temperature > 0` tokens are drawn by Gumbel-max in float64; with
`cfg_scale > 0` classifier-free guidance contrasts against a copy whose prompt is masked. With temperature 0,
`remasking="low_confidence"`, `cache_mode="none"`, no `threshold` and `stop_at_eos=False` the tokens are those
of the reference loop, token for token.

On top of it, the faster decoders found since (Fast-dLLM, dInfer), each opt-in:
  * `threshold`: commit every masked token of the block whose confidence clears it (at least one per step);
    a block then takes as many steps as it needs, `steps` is not used.
  * `cache_mode="prefix"` / `"dual"`: approximate KV caches refreshed by a full forward at the start of each
    block; later steps run only the block and what follows it (prefix) or only the block (dual).
  * `stop_at_eos`: once a finished block holds a stop id (eos, `<|role_end|>`), the rest becomes eos and the
    row is done; generation ends when every row is done.

This file travels to the Hub as custom code: keep it flat, with single-level relative imports only.
"""

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput, logging


logger = logging.get_logger(__name__)

REMASKING_STRATEGIES = ("low_confidence", "random", "margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")
# Dream's `alg` names -> our `remasking` (Dream's "origin" reveals random positions; "random" is the closest).
DREAM_ALGORITHMS = {"maskgit_plus": "low_confidence", "topk_margin": "margin", "entropy": "entropy", "origin": "random"}
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_MAX_NEW_TOKENS = 128


class DiffusionGenerationConfig(GenerationConfig):
    # no-format
    """
    Parameters of [`DiffusionGenerationMixin.generate`]. Saved and loaded as `generation_config.json`.

    Every field defaults to `None` ("unset"): `generate` fills unset fields from the model's generation config,
    then from `_get_default_generation_params()`. Like transformers' DiffusionGemma config, it deliberately does
    not call `GenerationConfig.__init__`: most autoregressive flags mean nothing here.

    Args:
        max_new_tokens (`int`): number of tokens to generate (default 128). `max_length` (prompt + new) is
            accepted instead when `max_new_tokens` is unset.
        steps (`int`): total denoising steps over all blocks (default: `max_new_tokens`, one token per step).
            Must be a multiple of the number of blocks.
        block_length (`int`): tokens per semi-autoregressive block; must divide `max_new_tokens` (default 32
            when it divides `max_new_tokens`, else one block).
        temperature (`float`): 0 = greedy (default); > 0 samples with Gumbel-max noise in float64.
        top_k (`int`), top_p (`float`): restrict the candidate tokens before sampling and confidence.
        cfg_scale (`float`): classifier-free guidance strength (0 = off). The unconditional copy masks the prompt.
        remasking (`str`): which masked positions to commit first: "low_confidence" (probability of the chosen
            token, the reference), "random", "margin" (top-1 minus top-2 probability), "entropy" (lowest entropy).
        threshold (`float` in (0, 1]): confidence-threshold parallel decoding (Fast-dLLM / dInfer).
        cache_mode (`str`): "none" (exact), "prefix" or "dual" (approximate KV caches, refreshed per block).
        stop_at_eos (`bool`): end a row once a finished block holds a stop id (default True).
        mask_token_id (`int`): the `<|mask|>` id (default: the model config's).
        eos_token_id (`int` or `list[int]`): stop ids, e.g. `<|endoftext|>` and `<|role_end|>` (default: the
            model config's). The first one fills the tail of a stopped row.
        pad_token_id (`int`): id written at padded prompt positions (default: the model config's).
        output_history (`bool`): return the sequence after every step (`history`).
        return_dict_in_generate (`bool`): return a [`DiffusionGenerationOutput`] instead of a tensor.
        seed (`int`): seed of a private random generator (temperature > 0, "random" remasking).
    """

    _FIELDS = (
        "max_new_tokens",
        "max_length",
        "steps",
        "block_length",
        "temperature",
        "top_k",
        "top_p",
        "cfg_scale",
        "remasking",
        "threshold",
        "cache_mode",
        "stop_at_eos",
        "mask_token_id",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "output_history",
        "return_dict_in_generate",
        "seed",
    )
    _METADATA = ("_commit_hash", "_from_model_config", "transformers_version")

    def __init__(self, **kwargs):
        for name in self._FIELDS + self._METADATA:
            setattr(self, name, kwargs.pop(name, None))
        # Keys of the autoregressive GenerationConfig (e.g. an older generation_config.json) carry no meaning for
        # diffusion sampling: drop them loudly rather than failing to load. Anything else is a typo.
        base_keys = set(GenerationConfig().to_dict())
        ignored = sorted(k for k in kwargs if k in base_keys or k.startswith("_"))
        unknown = sorted(k for k in kwargs if k not in ignored)
        if unknown:
            raise ValueError(
                f"DiffusionGenerationConfig got unknown parameter(s) {unknown}. Valid parameters: "
                f"{', '.join(self._FIELDS)}."
            )
        if ignored:
            logger.warning_once(f"DiffusionGenerationConfig ignores autoregressive generation parameter(s) {ignored}.")
        self.validate()

    @staticmethod
    def _get_default_generation_params() -> dict[str, Any]:
        """Values for fields left unset by the user and by the model's generation_config.json (`steps` and
        `block_length` are derived from `max_new_tokens`, which defaults to 128 unless `max_length` is set)."""
        return {
            "temperature": 0.0,
            "cfg_scale": 0.0,
            "remasking": "low_confidence",
            "cache_mode": "none",
            "stop_at_eos": True,
            "output_history": False,
            "return_dict_in_generate": False,
        }

    def validate(self, strict=False, user_set_attributes=None, **kwargs):
        """Raise a ValueError naming the first bad field and what to use instead."""

        def positive_int(name):
            value = getattr(self, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

        for name in ("max_new_tokens", "max_length", "steps", "block_length", "top_k"):
            positive_int(name)
        temperature = getattr(self, "temperature", None)
        if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
            raise ValueError(f"`temperature` must be a number >= 0 (0 = greedy), got {temperature!r}.")
        top_p = getattr(self, "top_p", None)
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
        cfg_scale = getattr(self, "cfg_scale", None)
        if cfg_scale is not None and (not isinstance(cfg_scale, (int, float)) or cfg_scale < 0):
            raise ValueError(f"`cfg_scale` must be a number >= 0 (0 disables guidance), got {cfg_scale!r}.")
        remasking = getattr(self, "remasking", None)
        if remasking is not None and remasking not in REMASKING_STRATEGIES:
            raise ValueError(f"`remasking` must be one of {REMASKING_STRATEGIES}, got {remasking!r}.")
        threshold = getattr(self, "threshold", None)
        if threshold is not None and (not isinstance(threshold, (int, float)) or not 0 < threshold <= 1):
            raise ValueError(
                f"`threshold` must be in (0, 1] (e.g. 0.9), or None for the fixed schedule; got {threshold!r}."
            )
        cache_mode = getattr(self, "cache_mode", None)
        if cache_mode is not None and cache_mode not in CACHE_MODES:
            raise ValueError(f"`cache_mode` must be one of {CACHE_MODES}, got {cache_mode!r}.")
        for name in ("mask_token_id", "pad_token_id", "bos_token_id", "seed"):
            value = getattr(self, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        eos = getattr(self, "eos_token_id", None)
        if eos is not None:
            ids = eos if isinstance(eos, (list, tuple)) else [eos]
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"`eos_token_id` must be an id or a non-empty list of ids, got {eos!r}.")
        for name in ("stop_at_eos", "output_history", "return_dict_in_generate"):
            value = getattr(self, name, None)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")

    def to_diff_dict(self) -> dict[str, Any]:
        # Unset fields are left out of generation_config.json (they mean "use the default").
        return {k: v for k, v in super().to_diff_dict().items() if v is not None or k not in self._FIELDS}

    @classmethod
    def from_model_config(cls, *args, **kwargs):
        # transformers' legacy path copies AR fields from the model config; the model falls back to cls().
        raise NotImplementedError("DiffusionGenerationConfig does not support `from_model_config`.")

    def get_generation_mode(self, *args, **kwargs):
        raise NotImplementedError("DiffusionGenerationConfig has no autoregressive generation mode.")

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> "DiffusionGenerationConfig":
        """Keep the fields we know from any GenerationConfig (e.g. one loaded with the base class)."""
        if isinstance(config, cls):
            return copy.deepcopy(config)
        values = {k: v for k, v in config.to_dict().items() if k in cls._FIELDS}
        return cls(**values)


@dataclass
class DiffusionGenerationOutput(ModelOutput):
    """
    Output of [`DiffusionGenerationMixin.generate`] with `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, prompt_length + max_new_tokens)`):
            Prompt followed by the generated tokens.
        history (`tuple(torch.LongTensor)`, *optional*):
            With `output_history=True`: the whole sequence after each denoising step.
        nfe (`int`):
            Number of forward passes of the model (one batched pass counts once, with or without guidance).
        tokens_per_forward (`torch.FloatTensor` of shape `(batch_size,)`):
            Tokens committed by the sampler in each row divided by `nfe` (the tail an early stop fills is not
            counted).
    """

    sequences: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    nfe: int | None = None
    tokens_per_forward: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------- sampling pieces


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear schedule: `mask_count[b]` tokens spread over `steps` steps, the remainder on the first steps.
    Returns `[batch, steps]` (int64), as the reference `get_num_transfer_tokens`."""
    base = mask_count // steps
    remainder = mask_count % steps
    schedule = base[:, None].expand(-1, steps).clone()
    schedule += torch.arange(steps, device=mask_count.device)[None, :] < remainder[:, None]
    return schedule


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max scores exp(logits) / (-log u)^temperature in float64 (float32 is not enough to keep the
    sampled distribution right, per the LLaDA authors); identity at temperature 0."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. The best token is always kept."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def confidence_scores(
    logits: torch.Tensor, x0: torch.Tensor, remasking: str, generator: torch.Generator | None, upcast: bool
) -> torch.Tensor:
    """How sure the model is of each position's candidate `x0`; the most confident positions are committed first.
    The reference computes the softmax in the logits' dtype (`upcast=False`); the threshold decoders in float32."""
    if remasking == "random":
        return torch.rand(x0.shape, device=x0.device, generator=generator)
    probs = F.softmax(logits.float() if upcast else logits, dim=-1)
    if remasking == "low_confidence":
        return torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    if remasking == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    # entropy: lower entropy = more confident
    return (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


class BlockKVCache:
    """Approximate KV cache for block-wise diffusion decoding (Fast-dLLM's prefix and dual caches).

    At the start of each block a full forward *records* every layer's key/value states (post-RoPE,
    `[batch, kv_heads, length, head_dim]`). A cached step then runs only a query window `[start, end)` of the
    sequence: its fresh key/values are written over the recorded ones at those positions and attention sees the
    whole sequence. Prefix mode uses the window [block start, end of sequence) (the prefix is cached); dual mode
    uses [block start, block end) (prefix and the still-masked suffix are cached). The model's attention calls
    `update(key, value, layer_idx)` and uses what it returns as the full key/value states.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True
        self.window = (0, 0)
        self.refreshes = 0

    def record(self):
        """The next forward is a full pass whose key/values replace the cache."""
        self.recording = True
        self.refreshes += 1

    def use(self, start: int, end: int):
        """Following forwards run positions [start, end) against the cache."""
        self.recording = False
        self.window = (start, end)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.keys[layer_idx] = key_states
            self.values[layer_idx] = value_states
            return key_states, value_states
        start, end = self.window
        if key_states.shape[-2] != end - start:
            raise ValueError(f"BlockKVCache: got {key_states.shape[-2]} new positions for the window [{start}, {end}).")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # In place: every step of the block rewrites the same window before attention reads it.
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0


# ----------------------------------------------------------------------------------------------- the mixin


class DiffusionGenerationMixin:
    """Adds `generate` (LLaDA masked-diffusion sampling) and its Dream-style alias `diffusion_generate`."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: DiffusionGenerationConfig | None = None,
        streamer: BaseStreamer | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> torch.LongTensor | DiffusionGenerationOutput:
        r"""
        Generate `max_new_tokens` tokens after each prompt by masked-diffusion sampling.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`):
                The prompts, left-padded when their lengths differ. Mask tokens inside a prompt are filled too
                (infilling; `cache_mode="none"` only).
            attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*):
                1 for prompt tokens, 0 for (left) padding.
            generation_config ([`DiffusionGenerationConfig`], *optional*):
                Base parameters; defaults to `model.generation_config`. Keyword arguments override it.
            streamer (`BaseStreamer`, *optional*):
                E.g. `transformers.TextDiffusionStreamer`: receives the prompt, a draft of the current block after
                every step (`put_draft`) and each block once it is final (`put`). Batch size 1 only.
            generator (`torch.Generator`, *optional*):
                Random generator for sampling (temperature > 0) and "random" remasking; `seed=` creates one.
            kwargs:
                Any [`DiffusionGenerationConfig`] field (`max_new_tokens`, `steps`, `block_length`,
                `temperature`, `top_k`, `top_p`, `cfg_scale`, `remasking`, `threshold`, `cache_mode`,
                `stop_at_eos`, `mask_token_id`, `eos_token_id`, `output_history`, `return_dict_in_generate`, ...).

        Returns:
            `torch.LongTensor` of shape `(batch_size, prompt_length + max_new_tokens)` (prompt + generated), or a
            [`DiffusionGenerationOutput`] with `sequences`, `history`, `nfe` and `tokens_per_forward` when
            `return_dict_in_generate=True`.

        Example:

        ```python
        >>> out = model.generate(input_ids, max_new_tokens=128, steps=128, block_length=32)
        >>> fast = model.generate(input_ids, max_new_tokens=128, block_length=32, threshold=0.9, cache_mode="dual")
        ```
        """
        config = self._prepare_diffusion_config(generation_config, kwargs)
        input_ids, attention_mask = self._check_diffusion_inputs(input_ids, attention_mask, streamer)
        plan = self._diffusion_plan(config, input_ids)
        if config.seed is not None and generator is None:
            generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
        return self._diffusion_sample(input_ids, attention_mask, config, plan, streamer, generator)

    def diffusion_generate(self, inputs: torch.LongTensor | None = None, generation_config=None, **kwargs):
        """Dream-compatible entry point: `diffusion_generate(inputs, generation_config=None, **kwargs)`.

        Accepts Dream's `alg` ("maskgit_plus", "topk_margin", "entropy", "origin") as `remasking`
        ("low_confidence", "margin", "entropy", "random"); everything else is passed to `generate`.
        """
        if "alg" in kwargs:
            alg = kwargs.pop("alg")
            if alg not in DREAM_ALGORITHMS:
                raise ValueError(f"Unknown Dream `alg` {alg!r}: use one of {sorted(DREAM_ALGORITHMS)}.")
            kwargs["remasking"] = DREAM_ALGORITHMS[alg]
        alg_temp = kwargs.pop("alg_temp", None)
        if alg_temp:
            raise ValueError("`alg_temp` (random choice of positions) is not supported: leave it None or 0.")
        return self.generate(inputs, generation_config=generation_config, **kwargs)

    # ------------------------------------------------------------------------------------------- preparation

    def _prepare_diffusion_config(self, generation_config, kwargs) -> DiffusionGenerationConfig:
        """Priority: keyword arguments > `generation_config` > `model.generation_config` > defaults."""
        model_config = getattr(self, "generation_config", None)
        if model_config is not None:
            model_config = DiffusionGenerationConfig.from_generation_config(model_config)
        if generation_config is None:
            config = model_config if model_config is not None else DiffusionGenerationConfig()
        else:
            config = DiffusionGenerationConfig.from_generation_config(generation_config)
            if model_config is not None:
                config.update(**{k: getattr(model_config, k) for k in config._FIELDS}, defaults_only=True)
        config = copy.deepcopy(config)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(
                f"generate() got unexpected argument(s) {sorted(unused)}. Valid generation parameters: "
                f"{', '.join(DiffusionGenerationConfig._FIELDS)} (plus input_ids, attention_mask, "
                "generation_config, streamer, generator)."
            )
        if "max_new_tokens" not in kwargs and "max_length" in kwargs:
            config.max_new_tokens = None  # an explicit max_length beats a stored max_new_tokens
        config.update(**config._get_default_generation_params(), defaults_only=True)
        return config

    def _check_diffusion_inputs(self, input_ids, attention_mask, streamer):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                "input_ids must be a 2-D LongTensor [batch_size, prompt_length] (use tokenizer(..., "
                f"return_tensors='pt').input_ids); got {type(input_ids).__name__}"
                + (f" of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else "")
            )
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must hold integer token ids for at least one prompt, got {input_ids.dtype}.")
        input_ids = input_ids.long()
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                    f"{tuple(input_ids.shape)}: pass the tokenizer's attention_mask for these prompts."
                )
            attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
            if ((attention_mask != 0) & (attention_mask != 1)).any():
                raise ValueError("attention_mask must contain only 0 (padding) and 1 (tokens).")
            if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
                raise ValueError(
                    "Prompts must be LEFT-padded (padding before the prompt) so that every row's answer starts at "
                    "the same position: set tokenizer.padding_side = 'left'."
                )
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: skip the mask entirely
        if streamer is not None and input_ids.shape[0] != 1:
            raise ValueError(f"Streaming supports batch size 1 only; got {input_ids.shape[0]} prompts.")
        return input_ids, attention_mask

    def _diffusion_plan(self, config: DiffusionGenerationConfig, input_ids: torch.Tensor) -> dict:
        """Resolve ids and lengths, and refuse inconsistent settings with a message saying what to change."""
        model_config = self.config
        prompt_length = input_ids.shape[1]
        mask_id = config.mask_token_id
        if mask_id is None:
            mask_id = getattr(model_config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError(
                "No mask token id is known: pass mask_token_id=... to generate() (the id of '<|mask|>' in the "
                "tokenizer, 156895 for the released checkpoints) or set model.config.mask_token_id."
            )
        if not 0 <= mask_id < model_config.vocab_size:
            raise ValueError(f"mask_token_id={mask_id} is outside the vocabulary [0, {model_config.vocab_size}).")

        eos = config.eos_token_id if config.eos_token_id is not None else getattr(model_config, "eos_token_id", None)
        stop_ids = [] if eos is None else [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]
        pad_id = config.pad_token_id if config.pad_token_id is not None else getattr(model_config, "pad_token_id", None)
        if pad_id is None and stop_ids:
            pad_id = stop_ids[0]

        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None and config.max_length is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        elif max_new_tokens is None:
            max_new_tokens = config.max_length - prompt_length
            if max_new_tokens <= 0:
                raise ValueError(
                    f"max_length={config.max_length} leaves no room after the {prompt_length}-token prompt: "
                    "raise max_length or pass max_new_tokens."
                )
        block_length = config.block_length
        if block_length is None:
            block_length = DEFAULT_BLOCK_LENGTH if max_new_tokens % DEFAULT_BLOCK_LENGTH == 0 else max_new_tokens
        if max_new_tokens % block_length:
            divisors = [d for d in range(1, max_new_tokens + 1) if max_new_tokens % d == 0][-6:]
            raise ValueError(
                f"block_length={block_length} does not divide max_new_tokens={max_new_tokens}: use a block_length "
                f"that divides it (e.g. {divisors}) or a max_new_tokens that is a multiple of {block_length}."
            )
        num_blocks = max_new_tokens // block_length
        steps = config.steps if config.steps is not None else max_new_tokens
        if steps % num_blocks:
            raise ValueError(
                f"steps={steps} is not a multiple of the number of blocks ({num_blocks} = max_new_tokens "
                f"{max_new_tokens} / block_length {block_length}); every block gets steps / num_blocks steps. "
                f"Use e.g. steps={max(num_blocks, steps - steps % num_blocks)} or steps={max_new_tokens}."
            )
        max_positions = getattr(model_config, "max_position_embeddings", None)
        total = prompt_length + max_new_tokens
        if max_positions is not None and total > max_positions:
            raise ValueError(
                f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} = {total} exceeds the model's "
                f"max_position_embeddings ({max_positions}): shorten the prompt or lower max_new_tokens."
            )
        prompt_has_masks = bool((input_ids == mask_id).any())
        if prompt_has_masks and config.cache_mode != "none":
            raise ValueError(
                f"The prompt contains mask tokens (infilling), which cache_mode={config.cache_mode!r} cannot fill "
                "(the prompt's key/values are cached): use cache_mode='none' for infilling."
            )
        if pad_id is not None and pad_id == mask_id:
            raise ValueError(f"pad_token_id equals mask_token_id ({mask_id}): padding would be generated over.")
        return {
            "mask_id": mask_id,
            "stop_ids": stop_ids,
            "pad_id": pad_id,
            "prompt_length": prompt_length,
            "max_new_tokens": max_new_tokens,
            "block_length": block_length,
            "num_blocks": num_blocks,
            "steps_per_block": steps // num_blocks,
            "prompt_has_masks": prompt_has_masks,
        }

    # ------------------------------------------------------------------------------------------- the loop

    def _diffusion_sample(self, input_ids, attention_mask, config, plan, streamer, generator):
        device = input_ids.device
        batch_size, prompt_length = input_ids.shape
        mask_id, block_length = plan["mask_id"], plan["block_length"]
        total_length = prompt_length + plan["max_new_tokens"]

        x = torch.full((batch_size, total_length), mask_id, dtype=torch.long, device=device)
        x[:, :prompt_length] = input_ids
        full_mask = position_ids = None
        if attention_mask is not None:
            x[:, :prompt_length].masked_fill_(attention_mask == 0, plan["pad_id"])
            full_mask = F.pad(attention_mask, (0, plan["max_new_tokens"]), value=1)
            # Positions as if unpadded: a padded row sees exactly the positions it would see alone.
            position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(total_length, device=device).unsqueeze(0).expand(batch_size, -1)
        prompt_index = x != mask_id  # fixed at the start, as in the reference (guidance masks these)

        cfg = config.cfg_scale > 0
        if cfg:
            full_mask_2 = None if full_mask is None else torch.cat([full_mask, full_mask])
            position_ids_2 = torch.cat([position_ids, position_ids])
        cache = BlockKVCache() if config.cache_mode != "none" else None
        stop_ids = torch.tensor(plan["stop_ids"], device=device) if plan["stop_ids"] else None
        eos_fill = plan["stop_ids"][0] if plan["stop_ids"] else None
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        committed = torch.zeros(batch_size, dtype=torch.long, device=device)
        history = [] if config.output_history else None
        nfe = 0
        if streamer is not None:
            streamer.put(input_ids.cpu())

        def forward(q_start, q_end, w_start, w_end):
            """Logits for positions [w_start, w_end) from a forward over the query positions [q_start, q_end)."""
            nonlocal nfe
            nfe += 1
            ids = x[:, q_start:q_end]
            mask, pos = full_mask, position_ids[:, q_start:q_end]
            if cfg:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                ids = torch.cat([ids, un_x[:, q_start:q_end]])
                mask, pos = full_mask_2, position_ids_2[:, q_start:q_end]
            keep = 0
            if (w_start, w_end) != (q_start, q_end):
                keep = torch.arange(w_start - q_start, w_end - q_start, device=device)
            logits = self(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=keep
            ).logits
            if cfg:
                cond, uncond = logits.chunk(2, dim=0)
                logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
            return logits

        for block in range(plan["num_blocks"]):
            block_start = prompt_length + block * block_length
            block_end = block_start + block_length
            # Positions that may be committed during this block: masks before the block end (reference: later
            # positions get -inf confidence). Prompt masks (infilling) only exist with cache_mode "none".
            region_start = 0 if plan["prompt_has_masks"] else prompt_length
            if cache is not None:
                region_start = block_start
            block_masks = x[:, block_start:block_end] == mask_id
            mask_count = block_masks.sum(-1)
            if block == 0 and plan["prompt_has_masks"]:
                mask_count = mask_count + (x[:, :prompt_length] == mask_id).sum(-1)
            schedule = None
            if config.threshold is None:
                schedule = num_transfer_tokens(mask_count, plan["steps_per_block"]).tolist()

            step = 0
            while True:
                if config.threshold is None and step == plan["steps_per_block"]:
                    break
                if config.threshold is not None and not bool((x[:, region_start:block_end] == mask_id).any()):
                    break
                if cache is None:
                    logits = forward(0, total_length, region_start, block_end)
                elif step == 0:
                    cache.record()
                    logits = forward(0, total_length, region_start, block_end)
                else:
                    q_end = total_length if config.cache_mode == "prefix" else block_end
                    cache.use(block_start, q_end)
                    logits = forward(block_start, q_end, region_start, block_end)
                counts = None if schedule is None else [row[step] for row in schedule]
                committed += self._denoise_step(
                    x, logits, region_start, block_end, counts, config, mask_id, generator
                )
                step += 1
                if history is not None:
                    history.append(x.clone())
                if streamer is not None and hasattr(streamer, "put_draft"):
                    streamer.put_draft(x[:, block_start:block_end].cpu())

            if config.stop_at_eos and stop_ids is not None:
                finished = self._stop_finished_rows(x, finished, stop_ids, prompt_length, block_end, eos_fill)
            if streamer is not None:
                streamer.put(x[0, block_start:block_end].cpu())
            if bool(finished.all()):
                break

        if streamer is not None:
            streamer.end()
        if not config.return_dict_in_generate:
            return x
        return DiffusionGenerationOutput(
            sequences=x,
            history=tuple(history) if history is not None else None,
            nfe=nfe,
            tokens_per_forward=committed.float() / max(nfe, 1),
        )

    @staticmethod
    def _denoise_step(x, logits, region_start, block_end, counts, config, mask_id, generator) -> torch.Tensor:
        """Commit tokens in x[:, region_start:block_end] from `logits` for those positions. Returns the number of
        tokens committed per row."""
        window = x[:, region_start:block_end]
        if config.top_k is not None or config.top_p is not None:
            logits = filter_top_k_top_p(logits, config.top_k, config.top_p)
        scores = add_gumbel_noise(logits, config.temperature, generator)
        if config.threshold is not None:
            # Threshold decoding never commits the mask token itself (it would loop forever on that position).
            scores = scores.clone()
            scores[..., mask_id] = float("-inf")
        x0 = torch.argmax(scores, dim=-1)
        confidence = confidence_scores(
            logits, x0, config.remasking, generator, upcast=config.threshold is not None
        )
        is_masked = window == mask_id
        confidence = torch.where(is_masked, confidence, torch.full_like(confidence, float("-inf")))
        x0 = torch.where(is_masked, x0, window)

        if counts is None:
            # At least the single most confident masked position, plus all that clear the threshold.
            select = is_masked & (confidence >= config.threshold)
            best = confidence.argmax(dim=-1, keepdim=True)
            select.scatter_(-1, best, is_masked.gather(-1, best) | select.gather(-1, best))
        else:
            select = torch.zeros_like(is_masked)
            if len(set(counts)) == 1:
                if counts[0] > 0:
                    select.scatter_(-1, torch.topk(confidence, counts[0], dim=-1).indices, True)
            else:
                for row, k in enumerate(counts):
                    if k > 0:
                        select[row, torch.topk(confidence[row], k).indices] = True
        # The reference writes x0 at every selected position; non-masked ones keep their token (x0 = x there).
        window.copy_(torch.where(select, x0, window))
        return (select & is_masked & (x0 != mask_id)).sum(-1)

    @staticmethod
    def _stop_finished_rows(x, finished, stop_ids, prompt_length, block_end, eos_fill):
        """Rows whose answer so far holds a stop id are done: everything after the first stop id becomes eos."""
        answer = x[:, prompt_length:block_end]
        has_stop = torch.isin(answer, stop_ids)
        newly = has_stop.any(-1) & ~finished
        if bool(newly.any()):
            first = has_stop.float().argmax(-1)  # first True
            positions = torch.arange(x.shape[1] - prompt_length, device=x.device)
            tail = newly[:, None] & (positions[None, :] > first[:, None])
            x[:, prompt_length:].masked_fill_(tail, eos_fill)
        return finished | newly

    # ------------------------------------------------------------------------------------------- loading

    def adjust_generation_fn(
        self,
        generation_config,
        from_auto_class,
        from_pipeline,
        pretrained_model_name_or_path,
        cache_dir=None,
        force_download=False,
        proxies=None,
        local_files_only=False,
        token=None,
        revision=None,
        subfolder="",
        trust_remote_code=None,
        **kwargs,
    ):
        """Called by `from_pretrained`: load generation_config.json with DiffusionGenerationConfig (the base
        implementation would use the autoregressive GenerationConfig class)."""
        if not self.can_generate():
            return
        config_class = getattr(self, "generation_config_class", DiffusionGenerationConfig)
        if generation_config is not None:
            self.generation_config = config_class.from_generation_config(generation_config)
        elif pretrained_model_name_or_path is not None:
            try:
                self.generation_config = config_class.from_pretrained(
                    pretrained_model_name_or_path,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    proxies=proxies,
                    local_files_only=local_files_only,
                    token=token,
                    revision=revision,
                    subfolder=subfolder,
                    _from_auto=from_auto_class,
                    _from_pipeline=from_pipeline,
                )
            except OSError:
                logger.info("No generation_config.json found: using the default DiffusionGenerationConfig.")


__all__ = [
    "BlockKVCache",
    "DiffusionGenerationConfig",
    "DiffusionGenerationMixin",
    "DiffusionGenerationOutput",
]
