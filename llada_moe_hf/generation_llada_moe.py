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

Speed: `cache_implementation="static"` runs the same loop with fixed shapes (prompts left-padded to a multiple of
`prompt_bucket`, preallocated KV buffers, window positions as device tensors) and a compiled denoising step
(`torch.compile(fullgraph=True)`; CUDA graphs on GPUs), and reads the device only at block ends and every
`sync_interval` steps. It gives the tokens of the plain path. The pieces: `DiffusionPlan` (blocks and windows),
`decoding_llada_moe.py` (the sampler pieces and decoder policies), `cache_llada_moe.py` (the KV-cache manager).

This file travels to the Hub as custom code: keep it flat, with single-level relative imports only.
"""

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.utils import ModelOutput, logging

from .cache_llada_moe import BlockKVCache
from .decoding_llada_moe import (
    DECODERS,
    REMASKING_STRATEGIES,
    add_gumbel_noise,
    confidence_scores,
    denoise_window,
    filter_top_k_top_p,
    num_transfer_tokens,
)


logger = logging.get_logger(__name__)

CACHE_MODES = ("none", "prefix", "dual")
# "dynamic" (transformers' name for the default cache) means the plain eager path here.
CACHE_IMPLEMENTATIONS = ("static", "dynamic")
# Dream's `alg` names -> our `remasking` (Dream's "origin" reveals random positions; "random" is the closest).
DREAM_ALGORITHMS = {"maskgit_plus": "low_confidence", "topk_margin": "margin", "entropy": "entropy", "origin": "random"}
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_SYNC_INTERVAL = 4
DEFAULT_PROMPT_BUCKET = 64


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
        decoder (`str`): the decoder policy, a key of `decoding_llada_moe.DECODERS`: "fixed" (the reference
            schedule of `steps`) or "threshold"; default "threshold" when `threshold` is set, else "fixed".
        cache_implementation (`str`): "static" selects fixed shapes, preallocated KV buffers and a compiled
            denoising step (same tokens as the default path, much less host overhead); None (default) runs eagerly.
        disable_compile (`bool`): with `cache_implementation="static"`, run the static path without compiling.
        sync_interval (`int`): static path, threshold decoding: at most this many steps run between two host
            checks of whether the block is done (default 4; fewer when the block is nearly done, at the rate tokens
            were committed so far; extra steps on a finished block change nothing).
        prompt_bucket (`int`): static path: prompts are left-padded to a multiple of this (default 64; short
            prompts to the next power of two when it is smaller), so that new prompt lengths within a bucket reuse
            the compiled step.
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
        "decoder",
        "cache_implementation",
        "disable_compile",
        "sync_interval",
        "prompt_bucket",
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
            "disable_compile": False,
            "sync_interval": DEFAULT_SYNC_INTERVAL,
            "prompt_bucket": DEFAULT_PROMPT_BUCKET,
        }

    def validate(self, strict=False, user_set_attributes=None, **kwargs):
        """Raise a ValueError naming the first bad field and what to use instead."""

        def positive_int(name):
            value = getattr(self, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

        for name in ("max_new_tokens", "max_length", "steps", "block_length", "top_k", "sync_interval", "prompt_bucket"):
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
        decoder = getattr(self, "decoder", None)
        if decoder is not None and decoder not in DECODERS:
            raise ValueError(f"`decoder` must be one of {tuple(DECODERS)} (or None to choose by `threshold`), got {decoder!r}.")
        implementation = getattr(self, "cache_implementation", None)
        if implementation is not None and implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"`cache_implementation` must be 'static' (the compiled path) or None / 'dynamic' (the eager path), "
                f"got {implementation!r}."
            )
        for name in ("stop_at_eos", "output_history", "return_dict_in_generate", "disable_compile"):
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


# ----------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class DiffusionPlan:
    """The iteration plan: ids, lengths, blocks and the windows each step runs and decodes.

    The answer is `num_blocks` blocks of `block_length` tokens after a `prompt_length`-token prompt. A step runs
    the model on a *query* range of positions and decodes a *window* of them:
      * query: the whole sequence, except for the cached steps of a block (step > 0 with a cache): from the block
        start to the end of the sequence (prefix cache) or to the block end (dual cache);
      * window: the block; with masks in the prompt (infilling) the whole sequence, of which only masked positions
        before the block end may be committed (the reference gives later positions -inf confidence).
    """

    mask_id: int
    stop_ids: tuple[int, ...]
    pad_id: int | None
    prompt_length: int
    max_new_tokens: int
    block_length: int
    num_blocks: int
    steps_per_block: int | None  # None: threshold decoding, as many steps as a block needs
    prompt_has_masks: bool
    decoder: str

    @property
    def total_length(self) -> int:
        return self.prompt_length + self.max_new_tokens

    def block(self, index: int) -> tuple[int, int]:
        start = self.prompt_length + index * self.block_length
        return start, start + self.block_length

    def window(self, index: int) -> tuple[int, int]:
        return (0, self.total_length) if self.prompt_has_masks else self.block(index)

    def query(self, index: int, step: int, cache_mode: str) -> tuple[int, int]:
        if cache_mode == "none" or step == 0:
            return 0, self.total_length
        start, end = self.block(index)
        return (start, self.total_length) if cache_mode == "prefix" else (start, end)

    def schedule(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Tokens to commit per row and step of block `index` ([batch, steps] on the device) and each step's
        maximum (host ints). A block starts fully masked, so the counts are known without reading the device;
        only a prompt with masks (infilling) adds them to the first block, read once."""
        steps = self.steps_per_block
        if self.prompt_has_masks and index == 0:
            counts = num_transfer_tokens((x[:, : self.block(0)[1]] == self.mask_id).sum(-1), steps)
            return counts, counts.max(0).values.tolist()
        per_step = num_transfer_tokens(torch.tensor([self.block_length]), steps)
        return per_step.expand(x.shape[0], -1).to(x.device, non_blocking=True), per_step[0].tolist()


def prompt_bucket_size(prompt_length: int, bucket: int) -> int:
    """The static path pads a prompt to a multiple of this: `bucket` (default 64), or the next power of two when
    that is smaller, so that padding never more than doubles a short prompt (the tiny model's 13-token prompts
    pad to 16, a 500-token prompt to 512)."""
    return min(bucket, 1 << max(prompt_length - 1, 0).bit_length())


@dataclass(frozen=True)
class StepSettings:
    """The Python constants of a denoising step: a compiled step is specialised on them. Numbers that users vary
    (temperature, top-p, threshold, guidance scale) are 0-d tensors instead (`step_values`), so that changing
    them does not compile anything new."""

    decoder: str
    mask_id: int
    sampling: bool  # temperature > 0
    top_k: int | None
    nucleus: bool  # top_p < 1
    remasking: str
    guidance: bool  # cfg_scale > 0
    max_count: int = 0


def step_values(config, device) -> dict[str, torch.Tensor]:
    """The numeric settings as 0-d tensors, with the dtypes the eager arithmetic used (float64 for the Gumbel
    exponent; the others meet float32 logits)."""
    return {
        "temperature": torch.tensor(float(config.temperature), dtype=torch.float64, device=device),
        "top_p": torch.tensor(float(config.top_p if config.top_p is not None else 1.0), device=device),
        "threshold": torch.tensor(float(config.threshold if config.threshold is not None else 1.0), device=device),
        "guidance_weight": torch.tensor(float(config.cfg_scale) + 1.0, device=device),
    }


class StepRandom:
    """Random numbers for a step that depend only on (seed, block, step, stream): the eager and the compiled
    paths draw the same numbers whatever steps the compiled path runs beyond a block's end, and the draws happen
    outside the compiled graph (which must not own the random stream)."""

    def __init__(self, generator: torch.Generator | None, device: torch.device, vocab_size: int):
        # One draw from the caller's generator (or torch's global one) seeds the whole call.
        source_device = generator.device if generator is not None else "cpu"
        self.seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=source_device))
        self.generator = torch.Generator(device=device)
        self.device = device
        self.vocab_size = vocab_size

    def uniform(self, shape, block: int, step: int, stream: int) -> torch.Tensor:
        mixed = (self.seed * 0x9E3779B1 + block * 0x85EBCA77 + step * 0xC2B2AE3D + stream * 0x27D4EB2F) % 2**63
        self.generator.manual_seed(mixed)
        # Open interval (0, 1): -log(u) must be finite and non-zero.
        u = torch.rand(shape, dtype=torch.float64, device=self.device, generator=self.generator)
        return u.clamp_(min=torch.finfo(torch.float64).tiny)


RECOMPILE_LIMIT = 64  # graphs per step piece: shapes (one per bucket, block and batch size) x sampler settings


def _compile_options(mode: str | None) -> dict:
    """Inductor options of the static step: `mode`'s (CUDA graphs for "reduce-overhead"), plus rounding every
    half-precision intermediate as eager does. Without that, inductor keeps fused intermediates in float32: in
    bfloat16 the logits move by an ulp, near-ties flip, and the static path's tokens stop matching the plain
    path's (0.85 of them on the 7B shape on an H200; 0.89 on the CPU)."""
    from torch import _inductor  # imported on first use: compiling needs it anyway

    options = dict(_inductor.list_mode_options(mode)) if mode else {}
    options["emulate_precision_casts"] = True
    return options


def _with_recompile_budget(compiled, plain):
    """Run a compiled step piece with room for the graphs a session of different settings needs (torch's default
    is 8 per function); past that, say so once and run the piece eagerly rather than fail."""

    def run(*args):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            try:
                return compiled(*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                logger.warning_once(
                    f"generate(cache_implementation='static'): more than {RECOMPILE_LIMIT} graphs were compiled for "
                    "one step piece; the rest of this session runs it eagerly (same tokens, slower)."
                )
                return plain(*args)

    return run


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
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`, or a `BatchEncoding`/dict):
                The prompts, left-padded when their lengths differ. A tokenizer's output (with `input_ids` and
                `attention_mask`) may be passed as it is. Mask tokens inside a prompt are filled too (infilling;
                `cache_mode="none"` only).
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
                `cache_implementation`, `stop_at_eos`, `mask_token_id`, `eos_token_id`, `output_history`,
                `return_dict_in_generate`, ...).

        Returns:
            `torch.LongTensor` of shape `(batch_size, prompt_length + max_new_tokens)` (prompt + generated), or a
            [`DiffusionGenerationOutput`] with `sequences`, `history`, `nfe` and `tokens_per_forward` when
            `return_dict_in_generate=True`.

        Example:

        ```python
        >>> out = model.generate(input_ids, max_new_tokens=128, steps=128, block_length=32)
        >>> fast = model.generate(input_ids, max_new_tokens=128, block_length=32, threshold=0.9, cache_mode="dual")
        >>> compiled = model.generate(input_ids, threshold=0.9, cache_mode="dual", cache_implementation="static")
        ```
        """
        if isinstance(input_ids, Mapping):  # a tokenizer's BatchEncoding passed positionally
            encoding = input_ids
            input_ids = encoding.get("input_ids")
            if attention_mask is None:
                attention_mask = encoding.get("attention_mask")
        kwargs.pop("token_type_ids", None)  # tokenizers may return it; the model has no token types
        config, derived = self._prepare_diffusion_config(generation_config, kwargs)
        input_ids, attention_mask = self._check_diffusion_inputs(input_ids, attention_mask, streamer)
        plan = self._diffusion_plan(config, input_ids, derived)
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

    def _prepare_diffusion_config(self, generation_config, kwargs) -> tuple[DiffusionGenerationConfig, dict]:
        """Priority: keyword arguments > `generation_config` > `model.generation_config` > defaults.

        Values derived from the length follow what the caller set: when the caller sets `max_new_tokens` (or
        `max_length`) but not `steps` / `block_length`, the model's stored `steps` and `block_length` (made for its
        stored length) are not used as they are: `steps` keeps the stored steps per token and `block_length` becomes
        the largest divisor of the new length not above the stored one. Returns the config and those hints."""
        stored = getattr(self, "generation_config", None)
        if stored is not None:
            stored = DiffusionGenerationConfig.from_generation_config(stored)
        if generation_config is None:
            config = stored if stored is not None else DiffusionGenerationConfig()
            caller = dict(kwargs)
        else:
            config = DiffusionGenerationConfig.from_generation_config(generation_config)
            caller = {k: getattr(config, k) for k in config._FIELDS if getattr(config, k) is not None} | kwargs
            if stored is not None:
                config.update(**{k: getattr(stored, k) for k in config._FIELDS}, defaults_only=True)
        config = copy.deepcopy(config)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(
                f"generate() got unexpected argument(s) {sorted(unused)}. Valid generation parameters: "
                f"{', '.join(DiffusionGenerationConfig._FIELDS)} (plus input_ids, attention_mask, "
                "generation_config, streamer, generator)."
            )
        if "max_new_tokens" not in caller and "max_length" in caller:
            config.max_new_tokens = None  # an explicit max_length beats a stored max_new_tokens
        derived = {}
        if stored is not None and ("max_new_tokens" in caller or "max_length" in caller):
            if "steps" not in caller and stored.steps is not None:
                config.steps = None
                stored_length = stored.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
                derived["steps_per_token"] = stored.steps / stored_length
            if "block_length" not in caller and stored.block_length is not None:
                config.block_length = None
                derived["max_block_length"] = stored.block_length
        config.update(**config._get_default_generation_params(), defaults_only=True)
        config.validate()
        return config, derived

    def _check_diffusion_inputs(self, input_ids, attention_mask, streamer):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                "input_ids must be a 2-D LongTensor [batch_size, prompt_length] or a tokenizer's output (use "
                "tokenizer(..., return_tensors='pt') or apply_chat_template(..., return_dict=True, "
                f"return_tensors='pt')); got {type(input_ids).__name__}"
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

    def _diffusion_plan(self, config: DiffusionGenerationConfig, input_ids: torch.Tensor, derived=None) -> DiffusionPlan:
        """Resolve ids and lengths, and refuse inconsistent settings with a message saying what to change."""
        derived = derived or {}
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
        if block_length is None and "max_block_length" in derived:
            ceiling = derived["max_block_length"]
            block_length = max(d for d in range(1, min(ceiling, max_new_tokens) + 1) if max_new_tokens % d == 0)
        elif block_length is None:
            block_length = DEFAULT_BLOCK_LENGTH if max_new_tokens % DEFAULT_BLOCK_LENGTH == 0 else max_new_tokens
        if max_new_tokens % block_length:
            divisors = [d for d in range(1, max_new_tokens + 1) if max_new_tokens % d == 0][-6:]
            raise ValueError(
                f"block_length={block_length} does not divide max_new_tokens={max_new_tokens}: use a block_length "
                f"that divides it (e.g. {divisors}) or a max_new_tokens that is a multiple of {block_length}."
            )
        num_blocks = max_new_tokens // block_length
        decoder = config.decoder or ("threshold" if config.threshold is not None else "fixed")
        if decoder == "threshold" and config.threshold is None:
            raise ValueError("decoder='threshold' needs a `threshold` (e.g. threshold=0.9).")
        steps_per_block = None
        if decoder == "fixed":
            steps = config.steps
            if steps is None and "steps_per_token" in derived:
                steps = max(1, round(max_new_tokens * derived["steps_per_token"] / num_blocks)) * num_blocks
            elif steps is None:
                steps = max_new_tokens
            if steps % num_blocks:
                raise ValueError(
                    f"steps={steps} is not a multiple of the number of blocks ({num_blocks} = max_new_tokens "
                    f"{max_new_tokens} / block_length {block_length}); every block gets steps / num_blocks steps. "
                    f"Use e.g. steps={max(num_blocks, steps - steps % num_blocks)} or steps={max_new_tokens}."
                )
            steps_per_block = steps // num_blocks
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
        return DiffusionPlan(
            mask_id=mask_id,
            stop_ids=tuple(stop_ids),
            pad_id=pad_id,
            prompt_length=prompt_length,
            max_new_tokens=max_new_tokens,
            block_length=block_length,
            num_blocks=num_blocks,
            steps_per_block=steps_per_block,
            prompt_has_masks=prompt_has_masks,
            decoder=decoder,
        )

    # ------------------------------------------------------------------------------------------- the loop

    def _diffusion_sample(self, input_ids, attention_mask, config, plan, streamer, generator):
        """Blocks left to right; inside a block, denoising steps until its schedule is done (fixed) or no mask is
        left (threshold). The host reads the device only at block ends and, for threshold decoding, every
        `sync_interval` steps of the static path (a step with nothing left to commit changes nothing)."""
        static = config.cache_implementation == "static"
        device = input_ids.device
        batch_size = input_ids.shape[0]
        canvas, plan, trim = self._initial_canvas(input_ids, attention_mask, plan, config, static)
        cache_rows = 0 if config.cache_mode == "none" else canvas["x"].shape[0] * (2 if config.cfg_scale > 0 else 1)
        buffers = self._state_buffers(canvas["x"].shape, cache_rows, device, static)
        x = canvas["x"] = buffers["x"].copy_(canvas["x"])
        counters, cache = buffers["counters"], buffers["cache"]
        for counter in counters.values():
            counter.zero_()
        pieces = self._step_functions(config, device)
        random = None
        if config.temperature > 0 or config.remasking == "random":
            random = StepRandom(generator, device, self.config.vocab_size)
        settings = StepSettings(
            decoder=plan.decoder,
            mask_id=plan.mask_id,
            sampling=config.temperature > 0,
            top_k=config.top_k,
            nucleus=config.top_p is not None and config.top_p < 1.0,
            remasking=config.remasking,
            guidance=config.cfg_scale > 0,
        )
        values = step_values(config, device)
        stop_ids = torch.tensor(plan.stop_ids, device=device) if plan.stop_ids else None
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        sync_interval = config.sync_interval if static else 1
        history = [] if config.output_history else None
        fixed_steps = 0
        if streamer is not None:
            streamer.put(input_ids.cpu())

        for block in range(plan.num_blocks):
            block_start, block_end = plan.block(block)
            window_index = torch.arange(*plan.window(block), device=device)
            limit = torch.tensor(block_end, device=device)
            counts, max_counts = plan.schedule(block, x) if plan.decoder == "fixed" else (None, None)
            step, next_check, started_with = 0, 0, None
            while True:
                if plan.decoder == "fixed" and step == plan.steps_per_block:
                    break
                if plan.decoder != "fixed" and step == next_check:
                    remaining = self._masks_left(x, plan, block)
                    if not any(remaining):
                        break
                    started_with = started_with or remaining
                    next_check = step + self._steps_until_check(remaining, started_with, step, sync_interval)
                query_start, query_end = plan.query(block, step, config.cache_mode)
                query_index = torch.arange(query_start, query_end, device=device)
                if cache is not None:
                    cache.use_positions(query_index, refresh=step == 0)
                step_settings, step_args = settings, dict(values)
                if counts is not None:
                    step_settings = dataclasses.replace(settings, max_count=max_counts[step])
                    step_args["counts"] = counts[:, step]
                if random is not None:
                    step_args.update(self._step_noise(random, block, step, x.shape[0], window_index.shape[0], settings))
                if static and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are spent
                forward = pieces["full" if query_end - query_start == x.shape[1] else "window"]
                logits = forward(x, query_index, window_index, canvas, cache, settings, values)
                pieces["decode"](x, window_index, limit, logits, counters, step_args, step_settings)
                fixed_steps += plan.decoder == "fixed"
                step += 1
                if history is not None:
                    history.append(x[:, trim:].clone())
                if streamer is not None and hasattr(streamer, "put_draft"):
                    streamer.put_draft(x[:, block_start:block_end].cpu())

            if config.stop_at_eos and stop_ids is not None:
                finished = self._stop_finished_rows(x, finished, stop_ids, plan.prompt_length, block_end, plan.stop_ids[0])
            if streamer is not None:
                streamer.put(x[0, block_start:block_end].cpu())
            if bool(finished.all()):
                break

        if streamer is not None:
            streamer.end()
        sequences = x[:, trim:]
        if static:
            sequences = sequences.clone()  # the canvas is kept for the next call; hand out a tensor of its own
        if not config.return_dict_in_generate:
            return sequences
        # Fixed schedule: every step counts (as in the reference). Threshold: only steps that had a mask to commit,
        # so the static path's extra steps at a block end are not counted.
        nfe = fixed_steps if plan.decoder == "fixed" else int(counters["active_steps"])
        return DiffusionGenerationOutput(
            sequences=sequences,
            history=tuple(history) if history is not None else None,
            nfe=nfe,
            tokens_per_forward=counters["committed"].float() / max(nfe, 1),
        )

    def _initial_canvas(self, input_ids, attention_mask, plan, config, static):
        """The canvas x = [prompt | masks], the padding mask and position ids over it (and their guided copies).

        The static path left-pads the prompt (see `prompt_bucket_size`) and always passes a mask, so that prompts
        of any length within a bucket give the same shapes (no new graph)."""
        device = input_ids.device
        batch_size, prompt_length = input_ids.shape
        trim = 0
        if static:
            trim = -prompt_length % prompt_bucket_size(prompt_length, config.prompt_bucket)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if trim:
                pad = torch.full((batch_size, trim), plan.pad_id if plan.pad_id is not None else 0, device=device)
                input_ids = torch.cat([pad, input_ids], dim=1)
                attention_mask = F.pad(attention_mask, (trim, 0), value=0)
            plan = dataclasses.replace(plan, prompt_length=prompt_length + trim)
        x = torch.full((batch_size, plan.total_length), plan.mask_id, dtype=torch.long, device=device)
        x[:, : plan.prompt_length] = input_ids
        full_mask = None
        if attention_mask is not None:
            x[:, : plan.prompt_length].masked_fill_(attention_mask == 0, plan.pad_id)
            full_mask = F.pad(attention_mask, (0, plan.max_new_tokens), value=1)
            # Positions as if unpadded: a padded row sees exactly the positions it would see alone.
            position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        else:
            position_ids = torch.arange(plan.total_length, device=device).unsqueeze(0).expand(batch_size, -1)
        canvas = {"x": x, "attention_mask": full_mask, "position_ids": position_ids}
        if config.cfg_scale > 0:
            # Guidance runs a second copy whose prompt is masked (prompt positions fixed at the start, as in the
            # reference).
            canvas["prompt_index"] = x != plan.mask_id
            canvas["attention_mask"] = None if full_mask is None else torch.cat([full_mask, full_mask])
            canvas["position_ids"] = torch.cat([position_ids, position_ids])
        return canvas, plan, trim

    def _state_buffers(self, shape, cache_rows, device, static) -> dict:
        """The tensors a call writes in place: the canvas, the counters and the KV cache. The static path keeps the
        last call's buffers on the model and reuses them when the shapes match, so that compiled graphs (and CUDA
        graphs, which are recorded against fixed addresses) see the same tensors call after call."""
        key = (tuple(shape), cache_rows, str(device), self.dtype)
        kept = self.__dict__.get("_diffusion_static_buffers")
        if static and kept is not None and kept["key"] == key:
            return kept
        buffers = {
            "key": key,
            "x": torch.empty(shape, dtype=torch.long, device=device),
            "counters": {
                "committed": torch.zeros(shape[0], dtype=torch.long, device=device),
                "active_steps": torch.zeros((), dtype=torch.long, device=device),
            },
            "cache": self._allocate_block_cache(cache_rows, shape[1], static) if cache_rows else None,
        }
        if static:
            for tensor in (buffers["x"], *buffers["counters"].values()):
                torch._dynamo.mark_static_address(tensor)
            self.__dict__["_diffusion_static_buffers"] = buffers
        return buffers

    def _allocate_block_cache(self, batch_size, length, static):
        config = self.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return BlockKVCache().allocate(
            config.num_hidden_layers,
            batch_size,
            config.num_key_value_heads,
            length,
            head_dim,
            self.dtype,
            self.device,
            static=static,
        )

    @staticmethod
    def _step_noise(random, block, step, batch_size, width, settings) -> dict:
        """The uniform numbers a step needs, drawn outside the (possibly compiled) step."""
        noise = {}
        if settings.sampling:
            noise["gumbel_uniform"] = random.uniform((batch_size, width, random.vocab_size), block, step, 0)
        if settings.remasking == "random":
            noise["remask_uniform"] = random.uniform((batch_size, width), block, step, 1).float()
        return noise

    @staticmethod
    def _masks_left(x, plan, block) -> list[int]:
        """How many masks each row may still commit in this block (one host read)."""
        start, end = plan.window(block)
        return (x[:, start : min(end, plan.block(block)[1])] == plan.mask_id).sum(-1).tolist()

    @staticmethod
    def _steps_until_check(remaining, started_with, step, sync_interval) -> int:
        """Threshold decoding: how many steps to run before the host looks again (dInfer's loop unrolling): the
        steps the slowest row still needs at the rate it has committed so far, at most `sync_interval`. A block's
        first step is checked at once: a confident model often commits the whole block in it."""
        if sync_interval == 1 or step == 0:
            return 1
        needed = max(left * step / max(start - left, 1) for left, start in zip(remaining, started_with))
        return max(1, min(sync_interval, int(needed)))

    @staticmethod
    def _stop_finished_rows(x, finished, stop_ids, prompt_length, block_end, eos_fill):
        """Rows whose answer so far holds a stop id are done: everything after the first stop id becomes eos.
        Runs on the device without reading it back."""
        answer = x[:, prompt_length:block_end]
        has_stop = torch.isin(answer, stop_ids)
        newly = has_stop.any(-1) & ~finished
        first = has_stop.float().argmax(-1)  # first True
        positions = torch.arange(x.shape[1] - prompt_length, device=x.device)
        tail = newly[:, None] & (positions[None, :] > first[:, None])
        x[:, prompt_length:].masked_fill_(tail, eos_fill)
        return finished | newly

    # ------------------------------------------------------------------------------------------- one step

    def _step_logits(self, x, query_index, window_index, canvas, cache, settings, values):
        """The model on the query positions; logits of the window positions (guidance combined)."""
        ids = x.index_select(1, query_index)
        position_ids = canvas["position_ids"].index_select(1, query_index)
        if settings.guidance:
            unconditional = torch.where(canvas["prompt_index"], settings.mask_id, x).index_select(1, query_index)
            ids = torch.cat([ids, unconditional])
        logits = self(
            input_ids=ids,
            attention_mask=canvas["attention_mask"],
            position_ids=position_ids,
            cache=cache,
            logits_to_keep=window_index - query_index[:1],
            return_dict=True,  # whatever config.return_dict says
        ).logits
        if settings.guidance:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + values["guidance_weight"] * (cond - uncond)
        return logits

    def _full_step_logits(self, *args):
        return self._step_logits(*args)

    def _window_step_logits(self, *args):
        return self._step_logits(*args)

    @staticmethod
    def _step_decode(x, window_index, limit, logits, counters, step_args, settings):
        """Commit tokens of the window from its logits, in place on `x` and `counters` (no host read)."""
        window = x.index_select(1, window_index)
        candidates = (window == settings.mask_id) & (window_index < limit)[None, :]
        decoder_args = {"threshold": step_args["threshold"]}
        if settings.decoder == "fixed":
            decoder_args = {"counts": step_args["counts"], "max_count": settings.max_count}
        new_window, committed = denoise_window(
            window,
            logits,
            candidates,
            decoder=settings.decoder,
            mask_id=settings.mask_id,
            temperature=step_args["temperature"],
            top_k=settings.top_k,
            top_p=step_args["top_p"] if settings.nucleus else None,
            remasking=settings.remasking,
            gumbel_uniform=step_args.get("gumbel_uniform"),
            remask_uniform=step_args.get("remask_uniform"),
            **decoder_args,
        )
        x.index_copy_(1, window_index, new_window)
        counters["committed"].add_(committed)
        counters["active_steps"].add_(candidates.any().long())

    def _step_functions(self, config, device) -> dict:
        """The step's pieces: plain, or compiled once and kept on the model (a later call with the same shapes
        reuses the compiled code). The forward over the whole sequence, the forward over a cached window and the
        decoding are compiled apart: each keeps its own graphs, and sampler settings do not recompile a forward."""
        plain = {"full": self._step_logits, "window": self._step_logits, "decode": self._step_decode}
        if config.cache_implementation != "static" or config.disable_compile:
            return plain
        experts = getattr(self.config, "_experts_implementation", None)
        if experts == "eager":
            raise ValueError(
                "cache_implementation='static' compiles the denoising step, and the eager experts loop over the "
                "experts a batch hits (a loop that depends on the data, which cannot be compiled). Use "
                "experts_implementation='auto' (the default, grouped_mm under compile), 'cpu_moe' (likewise), "
                "'grouped_mm' or 'fused_moe' (model.set_experts_implementation(...); on the command line "
                "--experts-implementation), or pass disable_compile=True."
            )
        compiled = self.__dict__.setdefault("_compiled_diffusion_steps", {})
        mode = "reduce-overhead" if device.type == "cuda" else None
        if mode not in compiled:
            functions = {"full": self._full_step_logits, "window": self._window_step_logits, "decode": self._step_decode}
            options = _compile_options(mode)
            compiled[mode] = {
                key: _with_recompile_budget(torch.compile(fn, fullgraph=True, options=options), plain[key])
                for key, fn in functions.items()
            }
        return compiled[mode]

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
    "DiffusionPlan",
    "num_transfer_tokens",
]
