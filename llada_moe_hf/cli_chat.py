"""`llada-moe chat MODEL`: an interactive chat with an Instruct checkpoint, answers streamed as they form.

Type a message and press Enter. Commands: /help, /reset (forget the conversation), /exit or /quit (or end of
input, Ctrl-D). Ctrl-C while an answer is being generated drops that answer; Ctrl-C at the prompt ends the chat.
"""

from __future__ import annotations

import argparse
import re
import sys

from .chat import DEFAULT_SYSTEM_PROMPT, encode_chat
from .cli_generate import (
    add_model_arguments,
    add_sampling_arguments,
    generation_kwargs,
    load_model_and_tokenizer,
    run_generation,
    use_stream,
)
from .distributed import read_on_main_process, setup_cli


PROMPT = "> "
COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation (keep the system message)",
    "/exit": "end the chat (also /quit, Ctrl-D, or Ctrl-C at the prompt)",
}
COMMAND_LIKE = re.compile(r"^/[A-Za-z]+$")  # a lone /word is a command, not a message


def add_arguments(parser: argparse.ArgumentParser):
    add_model_arguments(parser)
    parser.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system message ('' for none)")
    add_sampling_arguments(parser)


def help_text() -> str:
    lines = [f"  {name:<7} {text}" for name, text in COMMANDS.items()]
    return "Commands:\n" + "\n".join(lines) + "\nCtrl-C during an answer stops that answer."


def read_message() -> str | None:
    """One line from the user, None at end of input. The prompt goes where the answers go when that is the
    terminal, else to the terminal on stderr; no prompt when the input is not a terminal."""
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    try:
        if sys.stdout.isatty():
            try:
                import readline  # noqa: F401  (line editing and history; input() then prompts on stdout)
            except ImportError:
                pass
            return input(PROMPT)
        sys.stderr.write(PROMPT)
        sys.stderr.flush()
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None


class Conversation:
    """The messages so far; a turn is added only once its answer is complete."""

    def __init__(self, system: str):
        self.base = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.base)

    def reset(self):
        self.messages = list(self.base)

    def with_user(self, text: str) -> list[dict]:
        return self.messages + [{"role": "user", "content": text}]

    def add_turn(self, text: str, answer: str):
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def handle_command(line: str, conversation: Conversation) -> bool | None:
    """Run a /command. Returns False to end the chat, True when handled, None when `line` is a message."""
    command = line.strip()
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        conversation.reset()
        print("[conversation reset]")
        return True
    if command == "/help":
        print(help_text())
        return True
    if COMMAND_LIKE.match(command):
        print(f"[unknown command {command}; /help lists the commands]")
        return True
    return None


def answer(model, tokenizer, conversation: Conversation, text: str, kwargs: dict, stream: bool, stats: bool):
    """Generate and print one answer; the turn is kept only if it completes (Ctrl-C drops it)."""
    prompt_ids = encode_chat(tokenizer, conversation.with_user(text))
    try:
        reply = run_generation(model, tokenizer, prompt_ids, kwargs, stream, stats)
    except KeyboardInterrupt:
        print("[answer interrupted; the conversation goes on without it]")
        return
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return
    if not stream:
        print(reply)
    conversation.add_turn(text, reply)


def run(args) -> int:
    setup_cli(args)  # under torchrun: process group, quiet ranks > 0, one sampling seed
    try:
        model, tokenizer = load_model_and_tokenizer(args)
        kwargs = generation_kwargs(args, model, tokenizer)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stream = use_stream(args)
    conversation = Conversation(args.system)
    if sys.stdin.isatty():
        print("Chat with LLaDA-MoE. /help lists the commands, /exit quits.")
    while True:
        # Ctrl-C here ends the chat (exit code 130, see cli.main). Under torchrun rank 0 reads, every rank gets it.
        line = read_on_main_process(read_message)
        if line is None:
            return 0
        handled = handle_command(line, conversation)
        if handled is False:
            return 0
        if handled or not line.strip():
            continue
        answer(model, tokenizer, conversation, line, kwargs, stream, args.stats)
