"""`llada-moe` command line: each subcommand lives in its own module, imported only when used."""

import argparse
import importlib
import sys


# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": ("llada_moe_hf.demo", "run the embedded tiny model end to end (no download)"),
    "generate": ("llada_moe_hf.cli_generate", "generate from a prompt with diffusion sampling"),
    "chat": ("llada_moe_hf.cli_chat", "interactive chat with streaming output"),
    "convert": ("llada_moe_hf.conversion.convert", "convert a checkpoint into a Hub-ready custom-code repo"),
    "eval": ("llada_moe_hf.cli_eval", "evaluate with lm-evaluation-harness (needs the eval extra)"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="llada-moe", description="LLaDA-MoE for the Hugging Face ecosystem.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            # Only the chosen subcommand is imported: one command's dependencies never break another.
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
