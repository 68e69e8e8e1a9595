"""`llada-moe generate MODEL --prompt TEXT`: one diffusion generation, streamed to the terminal.

The sampling options map one to one onto `model.generate()` parameters (see DiffusionGenerationConfig). Only
the options given on the command line are passed: everything else comes from the checkpoint's
generation_config.json, then from the package defaults, exactly as `model.generate()` without arguments.
The prompt comes from --prompt, else from standard input. --chat wraps it in the chat template.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .chat import DEFAULT_SYSTEM_PROMPT, encode_chat, ensure_chat_template, mask_token_id, stop_token_ids
from .cli_common import (
    add_runtime_arguments,
    check_source,
    check_weight_files,
    load_tokenizer,
    loading_kwargs,
    local_weight_files,
    plural,
    resolve_device,
)
from .distributed import add_distributed_arguments, from_pretrained_kwargs, read_on_main_process, setup_cli


STORED = "the checkpoint's generation_config.json, else"  # how every sampling default is resolved
REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")


def add_model_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="checkpoint directory or Hub id (e.g. inclusionAI/LLaDA-MoE-7B-A1B-Instruct)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: MODEL)")
    add_runtime_arguments(parser)
    add_distributed_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser):
    """Every option defaults to None ("not set"): generate() then uses the checkpoint's generation_config.json,
    then the package defaults. The help states that chain."""
    group = parser.add_argument_group(
        "sampling (model.generate parameters; an option you leave out takes the value of the checkpoint's "
        "generation_config.json, else the package default)"
    )
    group.add_argument("--max-new-tokens", type=int, help=f"tokens to generate (default: {STORED} 128)")
    group.add_argument(
        "--steps", type=int,
        help="denoising steps over all blocks (default: the checkpoint's; when you set --max-new-tokens, the "
             "checkpoint's steps per token times your length, a multiple of the number of blocks; without a "
             "stored value, one token per step); not used with --threshold",
    )
    group.add_argument(
        "--block-length", type=int,
        help="tokens per semi-autoregressive block, must divide max-new-tokens (default: the checkpoint's; when you "
             "set --max-new-tokens, the largest divisor of it not above the checkpoint's; without a stored value, "
             "32 when it divides max-new-tokens, else one block)",
    )
    group.add_argument("--temperature", type=float, help=f"0 = greedy (default: {STORED} 0)")
    group.add_argument("--top-k", type=int, help=f"sample among the k most likely tokens (default: {STORED} off)")
    group.add_argument("--top-p", type=float, help=f"nucleus sampling (default: {STORED} off)")
    group.add_argument("--cfg-scale", type=float, help=f"classifier-free guidance, 0 = off (default: {STORED} 0)")
    group.add_argument("--remasking", choices=REMASKING, help=f"which positions to commit first (default: {STORED} "
                                                              "low_confidence)")
    group.add_argument("--threshold", type=float,
                       help=f"confidence-threshold parallel decoding, e.g. 0.9 (default: {STORED} off)")
    group.add_argument("--cache-mode", choices=CACHE_MODES, help=f"approximate KV cache (default: {STORED} none)")
    group.add_argument("--cache-implementation", choices=["static"],
                       help="static: fixed shapes and a compiled denoising step (same tokens, less overhead per "
                            "step); the first call compiles (seconds to minutes), so it pays off in a chat or a long "
                            "generation (default: "
                            f"{STORED} none, eager)")
    group.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_const", const=False, default=None,
                       help="always fill all max-new-tokens positions (default: stop at the first finished block "
                            "holding an end token)")
    group.add_argument("--seed", type=int, help="random seed for temperature > 0 or random remasking")
    group.add_argument("--mask-token-id", type=int,
                       help="default: the checkpoint's generation_config.json, then config.json, then the "
                            "tokenizer's '<|mask|>'")
    stream = parser.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="stream the answer (drafts drawn in place on a terminal; plain text into a pipe)")
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="print only the final text")
    parser.add_argument("--stats", action="store_true",
                        help="print answer tokens, forward passes, tokens per forward pass and time to stderr")


def add_arguments(parser: argparse.ArgumentParser):
    add_model_arguments(parser)
    parser.add_argument("--prompt", default=None, help="the prompt (default: read standard input)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (Instruct models)")
    parser.add_argument("--system", default=None, help=f"system message with --chat (default: {DEFAULT_SYSTEM_PROMPT!r})")
    add_sampling_arguments(parser)


# ------------------------------------------------------------------------------------------ loading


def load_model_and_tokenizer(args):
    """The model on its device, in eval mode, and its tokenizer (with a chat template). ValueError on bad input."""
    from .modeling_llada_moe import LLaDAMoEForDiffusionLM

    from .configuration_llada_moe import LLaDAMoEConfig

    source = check_source(args.model, "MODEL")
    check_local_checkpoint(source)
    try:
        config = LLaDAMoEConfig.from_pretrained(source)
    except OSError as err:
        raise ValueError(f"could not read the model's config.json from {source!r}: {err}") from None
    tokenizer = load_tokenizer(source, args.tokenizer, config)
    device = resolve_device(args.device)
    try:
        sharded = from_pretrained_kwargs(args)  # under torchrun: tensor/expert parallel over the processes
        model = LLaDAMoEForDiffusionLM.from_pretrained(source, **loading_kwargs(args), **sharded)
    except OSError as err:
        raise ValueError(f"could not load the model from {source!r}: {err}") from None
    if not sharded:
        model = model.to(device)
    ensure_chat_template(tokenizer)
    return model.eval(), tokenizer


def check_local_checkpoint(source: str):
    """A local MODEL must have a config.json and complete weight files (named when one is truncated)."""
    directory = Path(source)
    if not directory.is_dir():
        return
    if not (directory / "config.json").is_file():
        raise ValueError(f"MODEL {source!r} has no config.json: give a Hugging Face checkpoint directory.")
    check_weight_files(local_weight_files(directory))


SAMPLING_OPTIONS = ("max_new_tokens", "steps", "block_length", "temperature", "top_k", "top_p", "cfg_scale",
                    "remasking", "threshold", "cache_mode", "stop_at_eos", "seed", "cache_implementation")


def generation_kwargs(args, model, tokenizer) -> dict:
    """model.generate() keyword arguments: the options set on the command line, nothing else; plus the stop ids
    (the checkpoint's, with the tokenizer's eos and `<|role_end|>` added) and the mask id when only the tokenizer
    knows it."""
    kwargs = {name: getattr(args, name) for name in SAMPLING_OPTIONS if getattr(args, name, None) is not None}
    kwargs["eos_token_id"] = stop_ids(model, tokenizer) or None
    mask_id = args.mask_token_id
    if mask_id is None and getattr(model.generation_config, "mask_token_id", None) is None:
        if getattr(model.config, "mask_token_id", None) is None:
            mask_id = mask_token_id(tokenizer)
    if mask_id is not None:
        kwargs["mask_token_id"] = mask_id
    return {k: v for k, v in kwargs.items() if v is not None}


def stop_ids(model, tokenizer) -> list[int]:
    stored = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if stored is None else [int(i) for i in (stored if isinstance(stored, (list, tuple)) else [stored])]
    return ids + [i for i in stop_token_ids(tokenizer, model.config) if i not in ids]


# ------------------------------------------------------------------------------------------ generation


def answer_ids(sequence, prompt_length: int, stop_ids) -> list[int]:
    """Generated ids up to (not including) the first stop id."""
    ids = sequence[prompt_length:].tolist()
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


def make_streamer(tokenizer, kwargs: dict):
    from .terminal import DiffusionStreamer

    return DiffusionStreamer(tokenizer, skip_prompt=True, stop_ids=kwargs.get("eos_token_id"), skip_special_tokens=True)


def format_stats(answer_tokens: int, output, seconds: float) -> str:
    """What happened: the answer's length, the positions the sampler committed (answer, end token and any
    padding in the last block) and the forward passes it took."""
    nfe = int(output.nfe)
    committed = round(float(output.tokens_per_forward[0]) * nfe)
    return (
        f"[answer: {plural(answer_tokens, 'token')}; sampler: {plural(committed, 'position')} committed in "
        f"{plural(nfe, 'forward pass', 'forward passes')} ({committed / max(nfe, 1):.2f} per forward pass); "
        f"{seconds:.2f} s, {answer_tokens / max(seconds, 1e-9):.1f} answer tokens/s]"
    )


def run_generation(model, tokenizer, prompt_ids: list[int], kwargs: dict, stream: bool, stats: bool) -> str:
    """Generate after `prompt_ids`, streaming if asked; returns the answer text. On Ctrl-C the draft is erased
    and the KeyboardInterrupt goes on."""
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    streamer = make_streamer(tokenizer, kwargs) if stream else None
    start = time.perf_counter()
    try:
        output = model.generate(input_ids, streamer=streamer, return_dict_in_generate=True, **kwargs)
    except KeyboardInterrupt:
        if streamer is not None:
            streamer.abort()
        raise
    seconds = time.perf_counter() - start
    ids = answer_ids(output.sequences[0], len(prompt_ids), set(kwargs.get("eos_token_id") or ()))
    if stats:
        print(format_stats(len(ids), output, seconds), file=sys.stderr)
    return tokenizer.decode(ids, skip_special_tokens=True)


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        print("Type the prompt, then Ctrl-D on an empty line (or pass --prompt TEXT):", file=sys.stderr)
    return sys.stdin.read()


def use_stream(args) -> bool:
    return sys.stdout.isatty() if args.stream is None else args.stream


def run(args) -> int:
    setup_cli(args)  # under torchrun: process group, quiet ranks > 0, one sampling seed
    prompt = read_on_main_process(lambda: read_prompt(args))
    if not prompt.strip():
        print("error: empty prompt (pass --prompt TEXT or pipe text on standard input).", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_model_and_tokenizer(args)
        if args.chat:
            messages = [{"role": "system", "content": args.system or DEFAULT_SYSTEM_PROMPT},
                        {"role": "user", "content": prompt}]
            prompt_ids = encode_chat(tokenizer, messages)
        else:
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        stream = use_stream(args)
        text = run_generation(model, tokenizer, prompt_ids, generation_kwargs(args, model, tokenizer), stream,
                              args.stats)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not stream:
        print(text)
    return 0
