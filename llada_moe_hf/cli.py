"""`llada-moe` command line: each subcommand lives in its own module, imported only when used."""

import argparse
import importlib
import sys

from .cli_common import package_version, run_interruptible


# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": ("llada_moe_hf.demo", "run the embedded tiny model end to end (no download)"),
    "generate": ("llada_moe_hf.cli_generate", "generate from a prompt with diffusion sampling"),
    "chat": ("llada_moe_hf.cli_chat", "interactive chat with streaming output"),
    "convert": ("llada_moe_hf.conversion.convert", "convert a checkpoint into a Hub-ready custom-code repo"),
    "eval": ("llada_moe_hf.cli_eval", "evaluate with lm-evaluation-harness (needs the eval extra)"),
}


class VersionAction(argparse.Action):
    """Like action="version", but printed as is (argparse would re-wrap it) and computed only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(package_version())
        parser.exit()


def build_parser(argv) -> tuple[argparse.ArgumentParser, object]:
    """The parser, with only the chosen subcommand's module imported (one command's dependencies never break
    another); returns (parser, module or None)."""
    parser = argparse.ArgumentParser(prog="llada-moe", description="LLaDA-MoE for the Hugging Face ecosystem.")
    parser.add_argument("--version", action=VersionAction, help="print the versions of llada-moe-hf and its main "
                                                                "dependencies, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
    return parser, module


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "llada-moe" + (f" {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "")
    # Ctrl-C and SIGTERM (also while torch is being imported): one line on stderr and exit code 130 / 143.
    return run_interruptible(prog, parse_and_run, argv)


def parse_and_run(argv) -> int:
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
