"""`llada-moe generate MODEL --prompt TEXT`: one diffusion generation, streamed to the terminal.

The sampling options map one to one onto `model.generate()` parameters (see DiffusionGenerationConfig).
The prompt comes from --prompt, else from standard input. --chat wraps it in the chat template.
"""

from __future__ import annotations

import argparse
import sys
import time

from .chat import DEFAULT_SYSTEM_PROMPT, encode_chat, ensure_chat_template, mask_token_id, stop_token_ids
from .distributed import add_distributed_arguments, from_pretrained_kwargs, read_on_main_process, setup_cli


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="checkpoint directory or Hub id (e.g. inclusionAI/LLaDA-MoE-7B-A1B-Instruct)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: MODEL)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    add_distributed_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("sampling (model.generate parameters)")
    group.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    group.add_argument("--steps", type=int, default=None, help="total denoising steps (default: max-new-tokens)")
    group.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size (default 32)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (0 = off)")
    group.add_argument(
        "--remasking", default="low_confidence", choices=("low_confidence", "random", "margin", "entropy")
    )
    group.add_argument("--threshold", type=float, default=None, help="confidence-threshold parallel decoding, e.g. 0.9")
    group.add_argument("--cache-mode", default="none", choices=("none", "prefix", "dual"))
    group.add_argument("--no-stop-at-eos", action="store_true", help="always fill all max-new-tokens positions")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--mask-token-id", type=int, default=None, help="default: model config, then '<|mask|>'")
    stream = parser.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None, help="show drafts as they form")
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="print only the final text")
    parser.add_argument("--stats", action="store_true", help="print forward passes, tokens/forward and time to stderr")


def add_arguments(parser: argparse.ArgumentParser):
    add_model_arguments(parser)
    parser.add_argument("--prompt", default=None, help="the prompt (default: read standard input)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (Instruct models)")
    parser.add_argument("--system", default=None, help=f"system message with --chat (default: {DEFAULT_SYSTEM_PROMPT!r})")
    add_sampling_arguments(parser)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but no CUDA device is available (use --device cpu).")
    return name


def load_model_and_tokenizer(args):
    import torch
    from transformers import AutoTokenizer

    from .modeling_llada_moe import LLaDAMoEForDiffusionLM

    device = resolve_device(args.device)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        # The tokenizer itself is never custom code (the release ships tokenizer.json); without this flag the
        # config.json's auto_map would make transformers ask whether to run remote code.
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: could not load a tokenizer from {args.tokenizer or args.model!r}: {err}")
    sharded = from_pretrained_kwargs(args)  # under torchrun: tensor/expert parallel over the processes
    if sharded:
        model = LLaDAMoEForDiffusionLM.from_pretrained(args.model, dtype=dtype, **sharded).eval()
    else:
        model = LLaDAMoEForDiffusionLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    ensure_chat_template(tokenizer)
    return model, tokenizer


def generation_kwargs(args, model, tokenizer) -> dict:
    """model.generate() keyword arguments from the command line; stop ids include `<|role_end|>`."""
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        block_length=args.block_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_scale=args.cfg_scale,
        remasking=args.remasking,
        threshold=args.threshold,
        cache_mode=args.cache_mode,
        stop_at_eos=not args.no_stop_at_eos,
        seed=args.seed,
        eos_token_id=stop_token_ids(tokenizer, model.config) or None,
    )
    mask_id = args.mask_token_id
    if mask_id is None and getattr(model.generation_config, "mask_token_id", None) is None:
        if getattr(model.config, "mask_token_id", None) is None:
            mask_id = mask_token_id(tokenizer)
    if mask_id is not None:
        kwargs["mask_token_id"] = mask_id
    return {k: v for k, v in kwargs.items() if v is not None}


def answer_ids(sequence, prompt_length: int, stop_ids) -> list[int]:
    """Generated ids up to (not including) the first stop id."""
    ids = sequence[prompt_length:].tolist()
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


def run_generation(model, tokenizer, prompt_ids: list[int], kwargs: dict, stream: bool, stats: bool) -> str:
    """Generate after `prompt_ids`, streaming drafts if asked; returns the answer text."""
    import torch
    from transformers import TextDiffusionStreamer

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    streamer = TextDiffusionStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    start = time.perf_counter()
    output = model.generate(input_ids, streamer=streamer, return_dict_in_generate=True, **kwargs)
    seconds = time.perf_counter() - start
    ids = answer_ids(output.sequences[0], len(prompt_ids), set(kwargs.get("eos_token_id") or ()))
    if stats:
        print(
            f"[{len(ids)} tokens, {output.nfe} forward passes, {output.tokens_per_forward[0].item():.2f} tokens/forward, "
            f"{seconds:.2f} s, {len(ids) / max(seconds, 1e-9):.1f} tokens/s]",
            file=sys.stderr,
        )
    return tokenizer.decode(ids, skip_special_tokens=True)


def run(args) -> int:
    setup_cli(args)  # under torchrun: process group, quiet ranks > 0, one sampling seed
    prompt = read_on_main_process(lambda: args.prompt if args.prompt is not None else sys.stdin.read())
    if not prompt.strip():
        print("error: empty prompt (pass --prompt TEXT or pipe text on standard input).", file=sys.stderr)
        return 2
    model, tokenizer = load_model_and_tokenizer(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system or DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        prompt_ids = encode_chat(tokenizer, messages)
    else:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    try:
        text = run_generation(model, tokenizer, prompt_ids, generation_kwargs(args, model, tokenizer), stream, args.stats)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not stream:
        print(text)
    return 0
