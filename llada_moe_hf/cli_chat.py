"""`llada-moe chat MODEL`: an interactive chat with an Instruct checkpoint, answers streamed as they form.

Type a message and press Enter. Commands: /reset (forget the conversation), /exit or /quit (or end of input).
"""

from __future__ import annotations

import argparse
import sys

from .chat import DEFAULT_SYSTEM_PROMPT, encode_chat
from .cli_generate import add_model_arguments, add_sampling_arguments, generation_kwargs, load_model_and_tokenizer, run_generation
from .distributed import read_on_main_process, setup_cli


def add_arguments(parser: argparse.ArgumentParser):
    add_model_arguments(parser)
    parser.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system message ('' for none)")
    add_sampling_arguments(parser)


def read_message(interactive: bool) -> str | None:
    try:
        return input("> " if interactive else "")
    except EOFError:
        return None


def run(args) -> int:
    setup_cli(args)  # under torchrun: process group, quiet ranks > 0, one sampling seed
    model, tokenizer = load_model_and_tokenizer(args)
    kwargs = generation_kwargs(args, model, tokenizer)
    interactive = sys.stdin.isatty()
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    if interactive:
        print("Chat with LLaDA-MoE. /reset forgets the conversation, /exit quits.")
    while True:
        line = read_on_main_process(lambda: read_message(interactive))  # rank 0 reads, every rank gets it
        if line is None or line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(base)
            print("[conversation reset]")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = encode_chat(tokenizer, messages)
        try:
            answer = run_generation(model, tokenizer, prompt_ids, kwargs, stream, args.stats)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            messages.pop()
            continue
        if not stream:
            print(answer)
        messages.append({"role": "assistant", "content": answer})
