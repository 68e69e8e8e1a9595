# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""What the `llada-moe` commands share: the model-loading options (the same names, choices and help in
generate, chat and convert), checks of a model/tokenizer argument that fail fast with a message saying what is
wrong, and clean handling of Ctrl-C and SIGTERM (exit codes 130 and 143, no traceback)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import signal
import struct
import sys
from pathlib import Path


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
EXPERTS_IMPLEMENTATIONS = ("auto", "cpu_moe", "eager", "grouped_mm", "batched_mm", "fused_moe")
# A Hub repo id: "org/name" (one slash, the Hub's characters). Anything else given as MODEL is a local path.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone is not a tokenizer).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken",
                         "spiece.model", "sentencepiece.bpe.model")


# ------------------------------------------------------------------------------------------ options


def add_runtime_arguments(parser: argparse.ArgumentParser, device_default: str = "auto"):
    """--dtype, --device, --attn-implementation, --experts-implementation: one definition for every command."""
    group = parser.add_argument_group("model loading")
    group.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="dtype of the weights: auto keeps the checkpoint's own (default: %(default)s)")
    group.add_argument("--device", default=device_default,
                       help="where the forward passes run: auto (cuda when available, else cpu), cpu, cuda, cuda:N "
                            "(default: %(default)s)")
    group.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                       help="attention kernel (default: transformers' choice, sdpa where available)")
    group.add_argument("--experts-implementation", choices=EXPERTS_IMPLEMENTATIONS, default=None,
                       help="MoE experts kernel: auto is cpu_moe on the CPU and grouped_mm elsewhere; fused_moe "
                            "needs CUDA and triton (default: auto)")


def loading_kwargs(args) -> dict:
    """from_pretrained keyword arguments for the options the user set."""
    import torch

    kwargs = {"dtype": "auto" if args.dtype == "auto" else getattr(torch, args.dtype)}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.experts_implementation:
        kwargs["experts_implementation"] = args.experts_implementation
    return kwargs


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but no CUDA device is available (use --device cpu).")
    return name


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def get(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"llada-moe-hf {get('llada-moe-hf')} (transformers {get('transformers')}, torch {get('torch')}, " \
           f"peft {get('peft')}, Python {sys.version.split()[0]})"


def plural(count: int, word: str, plural_word: str | None = None) -> str:
    return f"{count} {word if count == 1 else (plural_word or word + 's')}"


# ------------------------------------------------------------------------------------------ sources


def hub_offline() -> bool:
    from huggingface_hub import constants

    truthy = {"1", "on", "yes", "true"}
    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(name, "").strip().lower() in truthy for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_path(name: str) -> bool:
    """A MODEL argument that cannot be a Hub id, or whose first part exists here (`out/x` with ./out present)."""
    if name.startswith((".", "/", "~")) or "\\" in name or not REPO_ID.match(name):
        return True
    return Path(name.split("/", 1)[0]).expanduser().is_dir()


def missing_path_message(name: str, what: str) -> str:
    path = Path(name).expanduser()
    message = f"{what} {name!r}: no such directory"
    if REPO_ID.match(name) and not name.startswith("."):
        message += (f" (read as a local path because {name.split('/', 1)[0]}/ exists here; for the Hub repo of that "
                    "name, run from another directory)")
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if parent != path.parent:
        message += f"; {parent}/ exists, {path.parent}/ does not"
    else:
        siblings = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)
        if close:
            message += "; did you mean " + " or ".join(repr(str(parent / c)) for c in close) + "?"
            return message
    return message + ". Give the checkpoint's directory, or a Hub repo id of the form org/name."


def check_source(name: str, what: str = "MODEL") -> str:
    """`name` when it is an existing directory or a Hub id that can be used; otherwise a ValueError that says what
    is wrong, without the minute of network retries a mistyped path would cost (one quick Hub request at most)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{what} {name!r} is a file: give the directory that holds config.json, or a Hub repo id.")
    if looks_like_path(name):
        raise ValueError(missing_path_message(name, what))
    check_hub_id(name, what)
    return name


def check_hub_id(repo_id: str, what: str = "MODEL"):
    """Fail fast when a Hub id can be neither read from the cache nor reached: one request, no retries."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: from_pretrained can load it even offline
    if hub_offline():
        raise ValueError(
            f"{what} {repo_id!r} is not a local directory and not in the Hugging Face cache, and offline mode is on "
            "(HF_HUB_OFFLINE): give a local directory, or unset HF_HUB_OFFLINE to download it."
        )
    try:
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        return  # from_pretrained explains how to request access
    except RepositoryNotFoundError:
        raise ValueError(
            f"{what} {repo_id!r}: no such local directory, and no Hub repository of that name (or it is private: "
            "log in with `hf auth login` or set HF_TOKEN)."
        ) from None
    except HfHubHTTPError:
        return  # the Hub answered; from_pretrained reports what it says
    except Exception as err:  # DNS, refused connection, timeout, TLS: the Hub cannot be reached
        raise ValueError(
            f"{what} {repo_id!r} is not a local directory, and the Hub ({constants.ENDPOINT}) cannot be reached "
            f"({type(err).__name__}: {err}). If it is a local path, check the spelling; if it is a Hub id, check the "
            "network (with HF_HUB_OFFLINE=1 only local directories and cached repos are used)."
        ) from None


def has_tokenizer(directory: Path) -> bool:
    directory = Path(directory)
    return any((directory / name).is_file() for name in TOKENIZER_VOCAB_FILES) or any(directory.glob("*.tiktoken"))


def check_tokenizer_source(model: str, tokenizer: str | None) -> str:
    """The tokenizer to load (--tokenizer, else MODEL); a ValueError suggesting --tokenizer when there is none."""
    name = check_source(tokenizer, "--tokenizer") if tokenizer else model
    if Path(name).is_dir() and not has_tokenizer(Path(name)):
        flag = "--tokenizer" if tokenizer else "MODEL"
        raise ValueError(
            f"{name} ({flag}) has no tokenizer: none of {', '.join(TOKENIZER_VOCAB_FILES[:4])} is there. "
            + ("Give a directory or Hub id that has one" if tokenizer else
               "Pass --tokenizer DIR_OR_HUB_ID (the tokenizer the model was trained with, e.g. the release's "
               "inclusionAI/LLaDA-MoE-7B-A1B-Instruct)")
            + "."
        )
    return name


def load_tokenizer(model: str, tokenizer: str | None, config=None):
    """AutoTokenizer for MODEL (or --tokenizer), never as remote code, with errors that name the fix. `config` (the
    model's) spares AutoTokenizer reading config.json itself, whose release model_type ("llada") it does not know."""
    from transformers import AutoTokenizer

    name = check_tokenizer_source(model, tokenizer)
    try:
        # The tokenizer itself is never custom code (the release ships tokenizer.json); without this flag the
        # config.json's auto_map would make transformers ask whether to run remote code.
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False, **({"config": config} if config else {}))
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from {name!r} ({err}). Pass --tokenizer DIR_OR_HUB_ID.") from None


# ------------------------------------------------------------------------------------------ weights


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (None when its header and size agree)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                return f"its header says {length} bytes of metadata but the file has only {size} bytes"
            header = json.loads(f.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"its header is unreadable ({type(err).__name__})"
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + end > size:
        return f"it is truncated: its tensors need {8 + length + end} bytes, the file has {size}"
    return None


def check_weight_files(files) -> None:
    """A ValueError naming each incomplete or corrupt safetensors file and what to do about it."""
    bad = [(Path(f), problem) for f in files if (problem := safetensors_problem(Path(f)))]
    if bad:
        details = "; ".join(f"{path} ({problem})" for path, problem in bad)
        raise ValueError(
            f"{plural(len(bad), 'weight file')} cannot be read: {details}. The download or copy was cut short or "
            "the file was damaged: download it again (e.g. `hf download REPO_ID FILE --local-dir DIR`) or copy it "
            "again from the source."
        )


def local_weight_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError):
            raise ValueError(f"{index} is not a valid safetensors index (no weight_map).") from None
        return [directory / name for name in names if (directory / name).is_file()]
    return sorted(directory.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ signals


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


@contextlib.contextmanager
def sigterm_raises():
    """Inside, SIGTERM raises `Terminated` (in the main thread) instead of killing the process on the spot."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_interruptible(prog: str, function, *args, interrupted_note: str = "") -> int:
    """`function(*args)` with Ctrl-C and SIGTERM turned into one line on stderr and exit codes 130 / 143."""
    with sigterm_raises():
        try:
            return int(function(*args) or 0)
        except Terminated:
            print(f"{prog}: terminated (SIGTERM){interrupted_note}", file=sys.stderr)
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted (Ctrl-C){interrupted_note}", file=sys.stderr)
            return EXIT_INTERRUPTED
