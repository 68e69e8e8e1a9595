# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""LLaDA-MoE in lm-evaluation-harness: importing this module registers the model type "llada_moe".

    lm_eval.simple_evaluate(model="llada_moe", model_args="pretrained=tiny,mc_num=8", tasks=[...])
    llada-moe eval --model-args pretrained=inclusionAI/LLaDA-MoE-7B-A1B-Instruct --tasks gsm8k --apply-chat-template

A masked-diffusion LM has no left-to-right factorisation, so the adapter differs from lm-eval's `hf` model:

* `generate_until` runs `model.generate()` (the LLaDA sampler, exact or the fast decoders) on left-padded
  batches, then cuts the answer at the first stop id and at the task's stop strings.
* `loglikelihood` is the Monte-Carlo estimate of LLaDA's likelihood bound (the reference: ML-GSAI/LLaDA
  `eval_llada.py`). For a context c and a continuation x of L tokens:

      ELBO(x | c) = E_{n ~ U{1..L}} E_{S: uniform n-subset} [ (L / n) * sum_{j in S} log p(x_j | c, x masked at S) ]

  which is <= log p(x | c) under the model (it is the masked-diffusion training objective, in tokens). The
  estimate averages mc_num samples (n_i, S_i); see `mc_loglikelihood` for the sampling scheme and its variance.
* `loglikelihood_rolling` applies the same estimator to each window of lm-eval's rolling split of the text.

Model arguments (`--model-args k=v,...` or `simple_evaluate(model_args=...)`): see `LLaDAMoEEvalLM`.
This module is package-only (it does not travel to the Hub as custom code) and needs `pip install lm-eval`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch


try:
    import lm_eval.models  # noqa: F401  (fills lm-eval's lazy model registry; get_model only does it when empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "llada_moe_hf.evaluation needs lm-evaluation-harness: pip install 'llada-moe-hf[eval]' "
        "(or pip install 'lm-eval>=0.4.10')."
    ) from err

from tqdm import tqdm

from .chat import mask_token_id as tokenizer_mask_token_id
from .chat import stop_token_ids
from .demo import TINY_ASSET_DIR
from .generation_llada_moe import DiffusionGenerationConfig


logger = logging.getLogger(__name__)

MODEL_NAME = "llada_moe"
TINY_ALIAS = "tiny"  # pretrained=tiny: the package's embedded tiny model (llada_moe_hf/assets/tiny)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# DiffusionGenerationConfig fields the adapter sets itself. `max_length` keeps lm-eval's meaning (the context
# window, as in its `hf` model); the answer length is `max_new_tokens` (or the task's max_gen_toks).
ADAPTER_OWNED_FIELDS = ("max_length", "output_history", "return_dict_in_generate")
# lm-eval's generation keys that are not DiffusionGenerationConfig fields and are handled here.
LM_EVAL_GEN_KEYS = ("until", "max_gen_toks", "do_sample")


# ---------------------------------------------------------------------------------------------- the estimator


def stratified_mask_counts(k: int, length: int, num_samples: int) -> torch.Tensor:
    """Numbers of masked tokens for `num_samples` samples of a `length`-token continuation, evenly spread over
    1..length from a random start `k` in 1..length (LLaDA's stratification):

        n_i = ((k - 1 + round(i * length / num_samples)) mod length) + 1,   i = 0 .. num_samples - 1

    `round` is half-up in exact integer arithmetic. For k uniform, every n_i is uniform on 1..length, so each
    sample is an unbiased draw of the ELBO; together they cover the mask counts evenly."""
    if not 1 <= k <= length:
        raise ValueError(f"k must be in 1..{length}, got {k}.")
    i = torch.arange(num_samples, dtype=torch.long)
    offsets = (2 * i * length + num_samples) // (2 * num_samples)
    return (k - 1 + offsets) % length + 1


def sample_mask_patterns(length: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """`[num_samples, length]` booleans: sample i masks a uniformly random subset of `n_i` positions."""
    k = int(torch.randint(1, length + 1, (1,), generator=generator))
    counts = stratified_mask_counts(k, length, num_samples)
    # The rank of each position in a random permutation: the n_i lowest ranks form a uniform n_i-subset.
    ranks = torch.rand(num_samples, length, generator=generator).argsort(-1).argsort(-1)
    return ranks < counts[:, None]


def request_generator(seed: int, context_ids, continuation_length: int) -> torch.Generator:
    """A CPU generator seeded by (seed, context tokens, continuation length) only: a request's estimate does not
    depend on the order, batching or process it runs in, and the choices of one question that have the same
    length share their mask patterns (common random numbers: less variance in their difference)."""
    key = json.dumps([int(seed), [int(t) for t in context_ids], int(continuation_length)]).encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def continuation_logits(model, noisy: torch.Tensor, context_length: int, cfg: float, mask_id: int):
    """Logits `[rows, L, vocab]` (model dtype) for the continuation positions of `noisy` (rows of equal length,
    no padding), and with `cfg > 0` those of the unconditional copy, whose whole context is masked (else None)."""
    length = noisy.shape[1] - context_length
    if cfg > 0:
        uncond = noisy.clone()
        uncond[:, :context_length] = mask_id
        logits = model(input_ids=torch.cat([noisy, uncond]), logits_to_keep=length).logits
        return logits.chunk(2, dim=0)
    return model(input_ids=noisy, logits_to_keep=length).logits, None


def guided(cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float) -> torch.Tensor:
    """Float32 logits with unconditional guidance as in the reference: un + (cfg + 1) * (cond - un)."""
    cond = cond.float()
    if uncond is None:
        return cond
    uncond = uncond.float()
    return uncond + (cfg + 1) * (cond - uncond)


@torch.no_grad()
def mc_loglikelihood(
    model,
    context_ids: list[int],
    continuation_ids: list[int],
    *,
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int = 1234,
) -> float:
    """Monte-Carlo estimate of log p(continuation | context) for a masked-diffusion LM (LLaDA's likelihood bound).

    Estimator. With L = len(continuation), the i-th of `mc_num` samples draws a mask count n_i (stratified, see
    `stratified_mask_counts`) and a uniform subset S_i of n_i continuation positions, masks them (the context
    is never masked), and scores

        l_i = (L / n_i) * sum_{j in S_i} log softmax(logits_j)[x_j]          (cross-entropy in float32)

    The estimate is mean_i l_i. Each l_i is an unbiased draw of ELBO(x | c) (module docstring), hence so is the
    mean: the estimate is unbiased for the bound, which is <= log p(x | c).

    Variance. Write g(n) = E[l | n] and s2(n) = Var[l | n]. When L divides mc_num every count appears exactly
    mc_num / L times and Var = (1 / (mc_num * L)) * sum_n s2(n): the spread between counts (g(n) varies a lot
    with n) is removed entirely, which plain i.i.d. sampling (Var = Var[l] / mc_num) does not do. Otherwise the
    leftover of that spread comes only from the random start k. It shrinks as 1 / mc_num either way; a
    continuation of one token has a single mask pattern and an exact, zero-variance result.

    Compared with the reference (`eval_llada.py`, `_forward_process`): the counts are stratified over all mc_num
    samples rather than within each batch of `batch_size` (so `batch_size` only sets memory and speed, not the
    numbers), with integer rounding (the reference's float `round` is half-to-even and skips some counts when
    i * L / batch_size is a half-integer). Identical mask patterns are evaluated once and weighted by how often
    they were drawn: the same number, fewer forward passes (one for a one-token continuation, as LLaDA's
    `mc_num=1` for MMLU).

    Randomness comes from `generator`, else from `request_generator(seed, context_ids, L)`: CPU-side, so the
    masks are the same on every device.
    """
    length = len(continuation_ids)
    if length == 0:
        return 0.0
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be >= 1, got mc_num={mc_num}, batch_size={batch_size}.")
    if generator is None:
        generator = request_generator(seed, context_ids, length)
    patterns = sample_mask_patterns(length, mc_num, generator)
    unique, inverse = torch.unique(patterns, dim=0, return_inverse=True)
    weights = torch.bincount(inverse, minlength=unique.shape[0]).to(torch.float64)

    device = model.device
    sequence = torch.tensor(list(context_ids) + list(continuation_ids), dtype=torch.long, device=device)
    target = sequence[len(context_ids) :]
    scores = []  # (L / n) * sum of the masked tokens' log-probabilities, per distinct pattern
    for chunk in unique.split(batch_size):
        counts = chunk.sum(-1).to(torch.float64)
        chunk = chunk.to(device)
        noisy = sequence.repeat(chunk.shape[0], 1)
        noisy[:, len(context_ids) :].masked_fill_(chunk, mask_id)
        cond, uncond = continuation_logits(model, noisy, len(context_ids), cfg, mask_id)
        # Row by row, masked positions only: float32 log-softmax over the vocabulary without a [rows, L, V] copy.
        row_sums = []
        for row, row_mask in enumerate(chunk):
            logits = guided(cond[row][row_mask], None if uncond is None else uncond[row][row_mask], cfg)
            row_sums.append(torch.log_softmax(logits, dim=-1).gather(-1, target[row_mask].unsqueeze(-1)).sum())
        scores.append(torch.stack(row_sums).double().cpu() * length / counts)
    return float((torch.cat(scores) * weights).sum() / mc_num)


# ---------------------------------------------------------------------------------------------- the lm-eval model


def _positive_int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1 or (isinstance(value, float) and value != number) or isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return number


def _resolve_pretrained(pretrained) -> str:
    """A local directory, the alias `tiny` (the embedded model, unless ./tiny exists), or a Hub id."""
    text = str(pretrained)
    if text == TINY_ALIAS and not Path(text).is_dir():
        return str(TINY_ASSET_DIR)
    return text


def _stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little") >> 1


@register_model(MODEL_NAME)
class LLaDAMoEEvalLM(TemplateLM):
    """lm-eval model "llada_moe": LLaDA-MoE with diffusion generation and Monte-Carlo log-likelihoods.

    Args:
        pretrained: a checkpoint directory, a Hub id, `tiny` (the embedded tiny model; a local directory named
            `tiny` takes precedence), or an already loaded `LLaDAMoEForDiffusionLM` (then pass `tokenizer`).
        tokenizer: a directory, Hub id or tokenizer object (default: `pretrained`).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        device: "cuda", "cuda:1", "cpu", ... (default: cuda when available). Under `accelerate launch` each
            process takes its own device.
        batch_size: prompts per `generate()` call, and rows per forward pass of the likelihood estimate.
        mc_num: Monte-Carlo samples per log-likelihood (default 128, the reference's); a multiple of
            `batch_size`. See `mc_loglikelihood`.
        cfg: unconditional guidance scale of the likelihood estimate and of the greedy check (default 0). It is
            also the generation's `cfg_scale` unless that is given (as in the reference).
        seed: seeds the likelihood estimate (per request, see `request_generator`) and sampling with
            temperature > 0 (per batch). Default 1234.
        check_greedy: compute `is_greedy` (default True): whether greedy low-confidence decoding of exactly
            len(continuation) tokens after the context (one token per step, one block) gives the continuation.
            Costs len(continuation) forward passes per batch of requests; False returns is_greedy=False.
        max_length: context window in tokens (default: the model's max_position_embeddings).
        add_bos_token: let the tokenizer add its special tokens (default False, as lm-eval's `hf` model).
        revision, attn_implementation, experts_implementation: passed to `from_pretrained`.
        Any `DiffusionGenerationConfig` field (`max_new_tokens`, `steps`, `block_length`, `threshold`,
        `cache_mode`, `temperature`, ...): defaults for `generate_until`; the task's generation kwargs (and
        `--gen-kwargs`) override them. `max_new_tokens` given here fixes the answer length (LLaDA's
        `gen_length`); otherwise the task's `max_gen_toks` is used.
    """

    backend = "causal"  # for TemplateLM._encode_pair: encode context + continuation together, then split

    def __init__(
        self,
        pretrained="tiny",
        tokenizer=None,
        dtype="auto",
        device=None,
        batch_size=1,
        max_batch_size=None,
        mc_num=128,
        cfg=0.0,
        seed=1234,
        check_greedy=True,
        max_length=None,
        add_bos_token=False,
        revision=None,
        attn_implementation=None,
        experts_implementation=None,
        trust_remote_code=None,
        **generation_kwargs,
    ):
        super().__init__()
        self._warned = set()
        self.batch_size_per_gpu = self._check_batch_size(batch_size)
        self.mc_num = _positive_int("mc_num", mc_num)
        if self.mc_num % self.batch_size_per_gpu:
            raise ValueError(
                f"mc_num={self.mc_num} is not a multiple of batch_size={self.batch_size_per_gpu}: the Monte-Carlo "
                f"samples of one request run in mc_num / batch_size forward passes of batch_size rows. Use e.g. "
                f"mc_num={self.mc_num - self.mc_num % self.batch_size_per_gpu or self.batch_size_per_gpu} or a "
                "batch_size that divides mc_num."
            )
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or cfg < 0:
            raise ValueError(f"cfg must be a number >= 0 (0 disables guidance), got {cfg!r}.")
        self.cfg = float(cfg)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        self.seed = seed
        self.check_greedy = self._check_bool("check_greedy", check_greedy)
        self.add_bos_token = self._check_bool("add_bos_token", add_bos_token)
        self.generation_defaults = self._check_generation_kwargs(generation_kwargs, source="model argument")
        if self.cfg > 0:
            self.generation_defaults.setdefault("cfg_scale", self.cfg)  # the reference guides generation too
        if max_length is not None:
            max_length = _positive_int("max_length", max_length)
        del max_batch_size, trust_remote_code  # lm-eval passes them; nothing here runs remote code

        self._setup_distributed(device)
        self.model, self.tokenizer = self._load(
            pretrained, tokenizer, dtype, revision, attn_implementation, experts_implementation
        )
        self.mask_id = self._resolve_mask_id()
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.config)
        if max_length is None:
            max_length = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self._max_length = int(max_length)

    # --------------------------------------------------------------------------------------- construction

    @staticmethod
    def _check_bool(name, value) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}.")
        return value

    @staticmethod
    def _check_batch_size(batch_size) -> int:
        if isinstance(batch_size, str) and batch_size.strip().startswith("auto"):
            raise ValueError(
                "batch_size='auto' is not supported by llada_moe: pass an integer (rows per forward pass; "
                "mc_num must be a multiple of it)."
            )
        return _positive_int("batch_size", batch_size)

    @staticmethod
    def _check_generation_kwargs(kwargs: dict, source: str) -> dict:
        """Keep DiffusionGenerationConfig fields, validated; refuse anything else with the valid names."""
        owned = sorted(k for k in kwargs if k in ADAPTER_OWNED_FIELDS)
        if owned:
            raise ValueError(
                f"{owned} cannot be set as {source}s: max_length is the context window here (a separate model "
                "argument), the answer length is max_new_tokens, and the output format is the adapter's."
            )
        fields = DiffusionGenerationConfig._FIELDS
        unknown = sorted(k for k in kwargs if k not in fields)
        if unknown:
            raise ValueError(
                f"Unknown {source}(s) {unknown} for llada_moe. Model arguments: pretrained, tokenizer, dtype, "
                "device, batch_size, mc_num, cfg, seed, check_greedy, max_length, add_bos_token, revision, "
                "attn_implementation, experts_implementation, and the generation parameters "
                f"{', '.join(f for f in fields if f not in ADAPTER_OWNED_FIELDS)}."
            )
        DiffusionGenerationConfig(**kwargs)  # validates values (raises a ValueError naming the bad one)
        return {k: v for k, v in kwargs.items() if v is not None}  # None = unset

    def _setup_distributed(self, device):
        """One process per device under `accelerate launch` / torchrun (lm-eval's data-parallel path): each
        process answers its share of the requests; lm-eval gathers the results on process 0."""
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from datetime import timedelta

            from accelerate import Accelerator, InitProcessGroupKwargs

            # accelerate treats a multi-process CPU run (gloo) as distributed only when told it is on the CPU.
            cpu = str(device) == "cpu" or not torch.cuda.is_available()
            accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
            if accelerator.num_processes > 1:
                self.accelerator = accelerator
                self._rank = accelerator.process_index
                self._world_size = accelerator.num_processes
                self._device = accelerator.device
                return
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available: use device=cpu.")
        self._device = torch.device(device)

    def _load(self, pretrained, tokenizer, dtype, revision, attn_implementation, experts_implementation):
        from transformers import AutoTokenizer, PreTrainedModel

        from .chat import ensure_chat_template
        from .modeling_llada_moe import LLaDAMoEForDiffusionLM

        if isinstance(pretrained, PreTrainedModel):
            model = pretrained
            source = getattr(model, "name_or_path", None)
            if tokenizer is None and not source:
                raise ValueError("pretrained is a model object: pass tokenizer=... as well.")
        else:
            source = _resolve_pretrained(pretrained)
            if dtype not in ("auto", None) and not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
                raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
            kwargs = {"dtype": DTYPES.get(dtype, dtype) if dtype is not None else "auto"}
            for name, value in (
                ("revision", revision),
                ("attn_implementation", attn_implementation),
                ("experts_implementation", experts_implementation),
            ):
                if value is not None:
                    kwargs[name] = value
            model = LLaDAMoEForDiffusionLM.from_pretrained(source, **kwargs)
        model = model.to(self._device).eval()
        if isinstance(tokenizer, (str, os.PathLike)) or tokenizer is None:
            tokenizer_source = _resolve_pretrained(tokenizer) if tokenizer is not None else source
            # The tokenizer is never custom code; without the flag the release's auto_map makes transformers ask.
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_source, config=model.config, trust_remote_code=False, revision=revision
            )
        ensure_chat_template(tokenizer)
        return model, tokenizer

    def _resolve_mask_id(self) -> int:
        for candidate in (
            self.generation_defaults.get("mask_token_id"),
            getattr(getattr(self.model, "generation_config", None), "mask_token_id", None),
            getattr(self.model.config, "mask_token_id", None),
            tokenizer_mask_token_id(self.tokenizer),
        ):
            if candidate is not None:
                return int(candidate)
        raise ValueError(
            "No mask token id is known (model config, generation config and tokenizer have none): pass "
            "mask_token_id=... (156895 for the released checkpoints)."
        )

    # --------------------------------------------------------------------------------------- lm-eval plumbing

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.stop_ids[0])

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "llada_moe")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template (the Ling format for LLaDA-MoE), as lm-eval's `hf` model applies it:
        without a generation prompt the last (assistant) message is left open for the continuation."""
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def all_gather(self, tensor):
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.accelerator is None:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self):
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def get_model_info(self) -> dict:
        from . import __version__

        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "llada_moe_hf_version": __version__,
            "llada_moe_mc_num": self.mc_num,
            "llada_moe_cfg": self.cfg,
            "llada_moe_seed": self.seed,
            "llada_moe_world_size": self.world_size,
        }

    def _warn_once(self, key: str, message: str):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # --------------------------------------------------------------------------------------- log-likelihood

    def _truncate(self, context: list[int], continuation: list[int]) -> list[int]:
        """Drop context tokens from the left so that context + continuation fits the window."""
        if len(continuation) > self.max_length - 1:
            raise ValueError(
                f"A continuation of {len(continuation)} tokens does not fit the {self.max_length}-token window "
                "with at least one context token: raise max_length or use loglikelihood_rolling."
            )
        room = self.max_length - len(continuation)
        if len(context) > room:
            self._warn_once("truncate", f"Contexts longer than {room} tokens are truncated from the left.")
            context = context[-room:]
        return context

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        items = [(key, self._truncate(list(ctx), list(cont)), list(cont)) for key, ctx, cont in requests]
        greedy = self._greedy_flags([(ctx, cont) for _, ctx, cont in items], disable_tqdm)
        results = []
        progress = tqdm(
            total=len(items),
            desc=f"llada_moe loglikelihood (mc_num={self.mc_num})",
            disable=disable_tqdm or self.rank != 0,
        )
        for (key, context, continuation), is_greedy in zip(items, greedy):
            value = mc_loglikelihood(
                self.model,
                context,
                continuation,
                mask_id=self.mask_id,
                mc_num=self.mc_num,
                batch_size=self.batch_size_per_gpu,
                cfg=self.cfg,
                seed=self.seed,
            )
            results.append((value, is_greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (value, is_greedy))
            progress.update(1)
        progress.close()
        return results

    @torch.no_grad()
    def _greedy_flags(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[bool]:
        """is_greedy for each (context, continuation): greedy low-confidence decoding of len(continuation)
        tokens after the context, one token per step in one block (LLaDA's `suffix_greedy_prediction`), run
        through `generate()` in left-padded batches of equal continuation length."""
        flags = [False] * len(pairs)
        if not self.check_greedy:
            return flags
        by_length: dict[int, list[int]] = {}
        for index, (_, continuation) in enumerate(pairs):
            if continuation:
                by_length.setdefault(len(continuation), []).append(index)
            else:
                flags[index] = True
        batches = [
            (length, indices[start : start + self.batch_size_per_gpu])
            for length, indices in sorted(by_length.items())
            for start in range(0, len(indices), self.batch_size_per_gpu)
        ]
        for length, indices in tqdm(
            batches, desc="llada_moe greedy check (is_greedy)", disable=disable_tqdm or self.rank != 0
        ):
            input_ids, attention_mask = self._left_pad([pairs[i][0] for i in indices])
            output = self.model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=length,
                steps=length,
                block_length=length,
                temperature=0.0,
                top_k=None,
                top_p=None,
                remasking="low_confidence",
                threshold=None,
                cache_mode="none",
                cfg_scale=self.cfg,
                stop_at_eos=False,
                mask_token_id=self.mask_id,
                return_dict_in_generate=False,
                output_history=False,
            )
            answers = output[:, input_ids.shape[1] :].tolist()
            for i, answer in zip(indices, answers):
                flags[i] = answer == pairs[i][1]
        return flags

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
        mask = attention_mask.to(self.device) if not bool(attention_mask.all()) else None
        return input_ids.to(self.device), mask

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The estimator over the whole text: lm-eval's rolling windows (each token scored once, as much
        preceding text as context as fits), each window's continuation estimated by `mc_loglikelihood`, summed.
        The result estimates a lower bound of log p(text) (its expectation is the sum of the windows' ELBOs),
        so perplexities computed from it are upper bounds in expectation, as in the LLaDA paper."""
        results = []
        for request in tqdm(
            requests, desc=f"llada_moe loglikelihood_rolling (mc_num={self.mc_num})",
            disable=disable_tqdm or self.rank != 0,
        ):
            (text,) = request.args
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,  # no shift in a diffusion LM: context + continuation <= window
                    context_len=1,
                )
            ]
            total = 0.0
            for context, continuation in windows:
                total += mc_loglikelihood(
                    self.model,
                    context,
                    continuation,
                    mask_id=self.mask_id,
                    mc_num=self.mc_num,
                    batch_size=self.batch_size_per_gpu,
                    cfg=self.cfg,
                    seed=self.seed,
                )
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # --------------------------------------------------------------------------------------- generation

    def _generation_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """`generate()` keyword arguments and stop strings for one request's lm-eval generation kwargs."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        if isinstance(until, str):
            until = [until]
        if until is not None and not (isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until)):
            raise ValueError(f"`until` must be a string or a list of strings, got {until!r}.")
        max_gen_toks = gen_kwargs.pop("max_gen_toks", None)
        do_sample = gen_kwargs.pop("do_sample", None)
        if gen_kwargs.pop("max_length", None) is not None:
            self._warn_once("max_length", "Generation kwarg max_length is ignored: use max_gen_toks.")
        ar_keys = set(_autoregressive_generation_keys())
        ignored = sorted(k for k in gen_kwargs if k not in DiffusionGenerationConfig._FIELDS and k in ar_keys)
        for key in ignored:
            gen_kwargs.pop(key)
        if ignored:
            self._warn_once(f"ignored:{ignored}", f"llada_moe ignores autoregressive generation kwargs {ignored}.")
        request = self._check_generation_kwargs(gen_kwargs, source="generation kwarg")
        settings = {**self.generation_defaults, **request}

        # lm-eval's do_sample=False (most tasks) means greedy, as in transformers: temperature 0.
        if do_sample is False:
            if settings.get("temperature") and "temperature" not in request:
                self._warn_once(
                    "greedy",
                    f"The task asks for greedy decoding (do_sample=False): temperature={settings['temperature']} "
                    "from the model arguments is not used. Pass --gen-kwargs do_sample=True,temperature=... to "
                    "sample.",
                )
            settings["temperature"] = 0.0
        elif do_sample is True and not settings.get("temperature"):
            settings["temperature"] = 1.0

        # Answer length: max_new_tokens if given (LLaDA's gen_length), else the task's max_gen_toks; the block
        # length (given, else the model's generation_config's) must divide it: round the length up if not.
        if "max_new_tokens" not in settings:
            settings["max_new_tokens"] = _positive_int("max_gen_toks", max_gen_toks if max_gen_toks else 256)
        block_length = settings.get("block_length")
        if block_length is None:
            block_length = getattr(getattr(self.model, "generation_config", None), "block_length", None)
        if block_length is not None:
            if settings["max_new_tokens"] % block_length:
                rounded = -(-settings["max_new_tokens"] // block_length) * block_length
                self._warn_once(
                    f"round:{settings['max_new_tokens']}:{block_length}",
                    f"max_new_tokens {settings['max_new_tokens']} is not a multiple of block_length {block_length}:"
                    f" generating {rounded} tokens (answers are cut at stop tokens and strings anyway).",
                )
                settings["max_new_tokens"] = rounded
            settings["block_length"] = block_length
        settings.setdefault("steps", settings["max_new_tokens"])  # one token per step unless told otherwise
        if self.stop_ids:
            settings.setdefault("eos_token_id", self.stop_ids)
        settings.setdefault("mask_token_id", self.mask_id)

        stops = list(until or [])
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        if eos_text and eos_text not in stops:
            stops.append(eos_text)
        return settings, stops

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched diffusion generation: requests are grouped by their generation settings, sorted by prompt
        length (longest first), left-padded, run through `model.generate()`, then each answer is cut at the
        first stop id and at the earliest stop string."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        prepared = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            settings, stops = self._generation_settings(gen_kwargs)
            ids = self.tok_encode(context)
            room = self.max_length - settings["max_new_tokens"]
            if room < 1:
                raise ValueError(
                    f"max_new_tokens={settings['max_new_tokens']} leaves no room for the prompt in the "
                    f"{self.max_length}-token window: lower max_gen_toks/max_new_tokens or raise max_length."
                )
            if len(ids) > room:
                self._warn_once("truncate-gen", f"Prompts longer than {room} tokens are truncated from the left.")
                ids = ids[-room:]
            prepared.append((ids, settings, stops))
            groups.setdefault(json.dumps(settings, sort_keys=True), []).append(index)

        progress = tqdm(total=len(requests), desc="llada_moe generate_until", disable=disable_tqdm or self.rank != 0)
        for key, indices in groups.items():
            indices = sorted(indices, key=lambda i: (-len(prepared[i][0]), i))
            settings = prepared[indices[0]][1]
            for start in range(0, len(indices), self.batch_size_per_gpu):
                batch = indices[start : start + self.batch_size_per_gpu]
                input_ids, attention_mask = self._left_pad([prepared[i][0] for i in batch])
                kwargs = dict(settings)
                if kwargs.get("temperature") or kwargs.get("remasking") == "random":
                    kwargs.setdefault("seed", _stable_seed(self.seed, [prepared[i][0] for i in batch]))
                with torch.no_grad():
                    output = self.model.generate(
                        input_ids, attention_mask=attention_mask, return_dict_in_generate=False, **kwargs
                    )
                for i, row in zip(batch, output[:, input_ids.shape[1] :].tolist()):
                    text = self._decode_answer(row, prepared[i][2])
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    progress.update(1)
        progress.close()
        return results

    def _decode_answer(self, tokens: list[int], stops: list[str]) -> str:
        """Tokens up to the first stop id, decoded; cut at the earliest stop string; special tokens removed."""
        stop_ids = set(self.stop_ids)
        for position, token in enumerate(tokens):
            if token in stop_ids:
                tokens = tokens[:position]
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        cuts = [text.find(stop) for stop in stops if stop and stop in text]
        if cuts:
            text = text[: min(cuts)]
        for special in self.tokenizer.all_special_tokens:
            text = text.replace(special, "")
        return text


def _autoregressive_generation_keys() -> list[str]:
    """Keys of transformers' GenerationConfig (num_beams, repetition_penalty, ...): meaningless here, ignored."""
    from transformers import GenerationConfig

    return list(GenerationConfig().to_dict())


__all__ = [
    "LLaDAMoEEvalLM",
    "MODEL_NAME",
    "mc_loglikelihood",
    "request_generator",
    "sample_mask_patterns",
    "stratified_mask_counts",
]
