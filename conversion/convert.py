"""Convert a LLaDA-MoE checkpoint into a verified, Hub-ready repository (and optionally push it).

    llada-moe convert SRC DST [--dtype bfloat16] [--fused-experts] [--to-original] [--push-to-hub REPO_ID]
    llada-moe convert --push-only DST --push-to-hub REPO_ID
    python conversion/convert.py ...   |   python -m llada_moe_hf.conversion.convert ...

SRC is a directory or a Hub repo id in the release's layout, dInfer's fused layout or this package's layout.
DST is written into a temporary directory beside it, verified (tensor checksums, logits of the output loaded in a
fresh process against the source's), and only then renamed into place.
"""

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


# Absolute imports, so that `python conversion/convert.py` works as well as the installed module.
from llada_moe_hf.cli_common import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    add_runtime_arguments,
    has_tokenizer,
    resolve_device,
    run_interruptible,
)
from llada_moe_hf.conversion.card import card_kind, default_base_model, write_card
from llada_moe_hf.conversion.hub import PushError, push_folder, push_only_command, resolve_source
from llada_moe_hf.conversion.layouts import (
    DTYPES,
    RELEASE_CODE_FILES,
    detect_layout,
    load_model,
    original_config_dict,
    weight_files,
)
from llada_moe_hf.conversion.verify import (
    CAST_MIN_TOP1_AGREEMENT,
    CAST_RELATIVE_TOLERANCE,
    VerificationError,
    check_manifest,
    compare_logits,
    compare_tensors,
    fixed_batch,
    logits_in_fresh_process,
    model_logits,
    tensor_checksums,
    write_manifest,
)
from llada_moe_hf.staging import StagingDir, clean_leftovers


logger = logging.getLogger("llada_moe_hf.conversion")

MASK_TOKEN = "<|mask|>"
ROLE_END = "<|role_end|>"
RELEASE_MASK_TOKEN_ID = 156895
RELEASE_EOS_TOKEN_ID = 156892
# The original model card's sampler: 128 new tokens, 4 blocks of 32, one token per step, greedy, low-confidence
# remasking. Keys are DiffusionGenerationConfig fields (the model card calls max_new_tokens gen_length). Used only
# for what the source's generation_config.json does not set.
SAMPLER_DEFAULTS = dict(steps=128, max_new_tokens=128, block_length=32, temperature=0.0, cfg_scale=0.0,
                        remasking="low_confidence")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


class ConversionError(ValueError):
    """Bad arguments or an unusable destination."""


class Progress:
    """Timestamped progress lines on stderr (or through the logger when used as a library)."""

    def __init__(self, echo: bool = True):
        self.start, self.echo = time.perf_counter(), echo

    def __call__(self, message: str):
        if self.echo:
            print(f"[{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)
        else:
            logger.info(message)


# ----------------------------------------------------------------------------------------------- tokenizer


def convert_tokenizer(tokenizer_dir: Path, out_dir: Path, explicit: bool = False) -> dict:
    """Copy the tokenizer with `<|mask|>` declared as its mask token and a chat template set. Returns the ids
    found ({"mask": ..., "role_end": ..., "eos": ...}); warns and returns {} when SRC has no tokenizer, and
    refuses a --tokenizer (explicit) that has none."""
    if not has_tokenizer(tokenizer_dir):
        if explicit:
            raise ConversionError(f"--tokenizer {tokenizer_dir} has no tokenizer (no tokenizer.json, tokenizer.model "
                                  "or vocab.json): give the directory of the tokenizer to ship with DST.")
        warnings.warn(f"{tokenizer_dir} has no tokenizer files: DST will have none. Pass --tokenizer DIR (e.g. a "
                      "download of the release's tokenizer), or copy one into DST before pushing.", stacklevel=2)
        return {}
    from transformers import AutoTokenizer

    from llada_moe_hf.chat import ensure_chat_template, single_token_id

    with tempfile.TemporaryDirectory() as alone:
        # Without config.json beside it, AutoTokenizer never looks at the model's auto_map (remote code).
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, Path(alone) / name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone)
        except (OSError, ValueError) as err:
            raise ConversionError(f"The tokenizer in {tokenizer_dir} does not load ({err}); pass --tokenizer DIR "
                                  "with a working one.") from None
    ids = {"mask": single_token_id(tokenizer, MASK_TOKEN), "role_end": single_token_id(tokenizer, ROLE_END),
           "eos": tokenizer.eos_token_id}
    if ids["mask"] is None:
        warnings.warn(f"The tokenizer in {tokenizer_dir} has no single {MASK_TOKEN} token: the mask token is not "
                      "declared (diffusion sampling needs its id; pass --mask-token-id).", stacklevel=2)
    elif tokenizer.mask_token != MASK_TOKEN:
        tokenizer.mask_token = MASK_TOKEN  # already in the vocabulary: declares it, adds nothing
    if ensure_chat_template(tokenizer):
        logger.info("The tokenizer had no chat template; set the Ling-style one (llada_moe_hf.chat.CHAT_TEMPLATE).")
    tokenizer.save_pretrained(out_dir)
    return ids


# ----------------------------------------------------------------------------------------------- generation config


def source_generation_config(src_dir: Path) -> tuple[dict, list[str]]:
    """The DiffusionGenerationConfig fields set in SRC's generation_config.json, and the keys dropped (those of
    autoregressive generation, which mean nothing to diffusion sampling)."""
    from llada_moe_hf.generation_llada_moe import DiffusionGenerationConfig

    path = src_dir / "generation_config.json"
    if not path.is_file():
        return {}, []
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err}).") from None
    kept = {k: v for k, v in stored.items() if k in DiffusionGenerationConfig._FIELDS and v is not None}
    dropped = sorted(k for k in stored if k not in kept and not k.startswith("_") and k != "transformers_version"
                     and stored[k] is not None)
    return kept, dropped


def generation_settings(config, token_ids: dict, mask_token_id: int | None, stored: dict | None = None) -> dict:
    """generation_config.json for DST: SRC's values kept, the missing ones filled (sampler settings consistent
    with SRC's max_new_tokens, else the original model card's; ids from the tokenizer and config). The stop ids
    are SRC's, with the tokenizer's eos and `<|role_end|>` added when missing. --mask-token-id wins."""
    stored = dict(stored or {})
    settings = dict(stored)
    mask = mask_token_id if mask_token_id is not None else stored.get("mask_token_id", token_ids.get("mask"))
    settings["mask_token_id"] = mask if mask is not None else config.mask_token_id
    eos = stored.get("eos_token_id", config.eos_token_id if config.eos_token_id is not None else RELEASE_EOS_TOKEN_ID)
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    for extra in (token_ids.get("eos"), token_ids.get("role_end")):
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    settings["eos_token_id"] = eos_ids
    settings.setdefault("pad_token_id", config.pad_token_id)
    if "max_new_tokens" not in stored and "max_length" not in stored:
        settings["max_new_tokens"] = SAMPLER_DEFAULTS["max_new_tokens"]
    new_tokens = settings.get("max_new_tokens")
    if new_tokens is not None:
        default_block = SAMPLER_DEFAULTS["block_length"]
        settings.setdefault("block_length", default_block if new_tokens % default_block == 0 else new_tokens)
        settings.setdefault("steps", new_tokens)  # one token per step, as the original card
    if not stored:  # written out for the card; generate() defaults to the same values when they are unset
        for key in ("temperature", "cfg_scale", "remasking"):
            settings.setdefault(key, SAMPLER_DEFAULTS[key])
    return {k: v for k, v in settings.items() if v is not None}


def write_generation_config(out_dir: Path, settings: dict):
    """generation_config.json through the package's DiffusionGenerationConfig, and checked to load back with it."""
    from llada_moe_hf.generation_llada_moe import DiffusionGenerationConfig

    DiffusionGenerationConfig(**settings).save_pretrained(out_dir)
    loaded = DiffusionGenerationConfig.from_pretrained(out_dir)
    wrong = {k: getattr(loaded, k, None) for k, v in settings.items() if getattr(loaded, k, None) != v}
    if wrong:
        raise VerificationError(f"generation_config.json does not load back as written: {wrong}.")


# ----------------------------------------------------------------------------------------------- conversion


def check_destination(dst: Path, src_dir: Path, overwrite: bool, progress):
    """Refuse an unusable DST; remove the staging directories that killed runs left beside it (and mention any
    other leftover) before anything else, so that a failed run is never silent about them."""
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"DST {dst} exists and is not a directory.")
    if not dst.parent.is_dir():
        raise ConversionError(f"The parent directory of DST ({dst.parent}) does not exist.")
    for entry in clean_leftovers(dst, progress):
        writing = entry["info"].get("destination")
        if entry["kind"] == "running" and writing and Path(writing).resolve() == dst.resolve():
            raise ConversionError(
                f"Another conversion (pid {entry['info'].get('pid')}) is writing {dst} right now (in "
                f"{entry['path']}): wait for it to finish, or stop it first."
            )
    if dst.exists() and not overwrite:
        raise ConversionError(
            f"DST {dst} already exists; nothing was written. Pass --overwrite to replace it (the old one is kept "
            f"until the new one is verified), or push it as it is: "
            f"{push_only_command(dst, 'REPO_ID')}"
        )
    resolved = dst.resolve()
    if resolved == src_dir.resolve() or src_dir.resolve() in resolved.parents:
        raise ConversionError(f"DST {dst} must not be SRC or inside it.")


def write_checkpoint(model, out_dir: Path, *, fused: bool, max_shard_size: str):
    """save_pretrained: config.json with auto_map, the custom-code files, sharded safetensors (per expert, the
    release's names, unless fused)."""
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, save_original_format=not fused)


def rewrite_as_original(out_dir: Path, model, src_dir: Path, layout: str, source_config: dict):
    """Turn a save_pretrained output into the release's layout: its config.json format, no llada_moe code files
    (the release's own code files are copied from SRC when it has them)."""
    config = original_config_dict(model.config, source_config if layout == "release" else None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in out_dir.glob("*.py"):
        path.unlink()
    missing = []
    for name in RELEASE_CODE_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)
        else:
            missing.append(name)
    if missing:
        warnings.warn(f"DST's auto_map names the release's {missing}, which SRC does not have: copy them from the "
                      "release repository for tools that load it with trust_remote_code (llada-moe-hf loads this "
                      "layout without them).", stacklevel=2)
    for name in ("generation_config.json", "README.md"):
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)


def sampler_origin(stored: dict, settings: dict) -> str:
    sampler_keys = [k for k in ("max_new_tokens", "steps", "block_length") if k in settings]
    filled = [k for k in sampler_keys if k not in stored]
    if not stored:
        return "the source had no generation_config.json: the original model card's settings"
    if not filled:
        return "kept from the source's generation_config.json"
    return f"the source's generation_config.json, with {', '.join(filled)} filled in"


def convert(src: str, dst: str, *, dtype: str = "auto", max_shard_size: str = "5GB", fused_experts: bool = False,
            to_original: bool = False, overwrite: bool = False, tokenizer: str | None = None,
            mask_token_id: int | None = None, card: str = "auto", base_model: str | None = None,
            repo_id: str | None = None, src_revision: str | None = None, token: str | None = None,
            device: str = "cpu", attn_implementation: str | None = None, experts_implementation: str | None = None,
            max_cast_error: float = CAST_RELATIVE_TOLERANCE, min_cast_top1: float = CAST_MIN_TOP1_AGREEMENT,
            progress=None) -> Path:
    """Convert SRC into DST (see the module docstring). Returns DST. Raises ConversionError / VerificationError;
    on any failure (Ctrl-C and SIGTERM included) no DST is created and an existing one is left as it was.
    `progress(message)` receives a line per step (default: the logger)."""
    progress = progress or Progress(echo=False)
    if to_original and fused_experts:
        raise ConversionError("--to-original writes the release's per-expert tensors; it cannot be combined with --fused-experts.")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}.")
    if tokenizer is not None and not Path(tokenizer).expanduser().is_dir():
        raise ConversionError(f"--tokenizer {tokenizer}: no such directory (give a local tokenizer directory).")
    dst_path = Path(dst).expanduser().absolute()  # absolute: the verification process runs in another directory
    src_dir, src_repo = resolve_source(src, revision=src_revision, token=token)
    check_destination(dst_path, src_dir, overwrite, progress)
    layout, source_config = detect_layout(src_dir)
    device = resolve_device(device)
    implementations = {k: v for k, v in (("attn_implementation", attn_implementation),
                                         ("experts_implementation", experts_implementation)) if v}

    progress(f"Loading {src} ({layout} layout)")
    model = load_model(src_dir, layout, source_config, **implementations)
    input_ids = fixed_batch(model.config.vocab_size, mask_token_id if mask_token_id is not None else model.config.mask_token_id)
    source_logits = model_logits(model.to(device), input_ids)
    cast = dtype != "auto" and DTYPES[dtype] != model.dtype
    if cast:
        # Load SRC again directly in the output dtype (as from_pretrained would for a user; RoPE tables stay
        # float32): DST must reproduce this model exactly, and the source in its own dtype within tolerance.
        progress(f"Loading {src} again in {dtype}")
        del model
        model = load_model(src_dir, layout, source_config, dtype=DTYPES[dtype], **implementations)
    reference_logits = model_logits(model.to(device), input_ids) if cast else source_logits
    model.to("cpu")

    with StagingDir(dst_path, purpose="llada-moe convert") as staging:
        tmp = staging.path
        progress(f"Writing into {tmp} (moved to {dst_path} once verified)")
        tokenizer_ids = convert_tokenizer(Path(tokenizer).expanduser() if tokenizer else src_dir, tmp,
                                          explicit=tokenizer is not None)
        stored, dropped = source_generation_config(src_dir)
        if dropped:
            progress(f"generation_config.json: dropped {dropped} (autoregressive settings, unused by diffusion "
                     "sampling)")
        settings = generation_settings(model.config, tokenizer_ids, mask_token_id, stored)
        if model.config.mask_token_id is None and settings.get("mask_token_id") is not None and not to_original:
            model.config.mask_token_id = settings["mask_token_id"]
        write_checkpoint(model, tmp, fused=fused_experts, max_shard_size=max_shard_size)
        if to_original:
            rewrite_as_original(tmp, model, src_dir, layout, source_config)
        if not (to_original and (src_dir / "generation_config.json").is_file()):  # else SRC's was copied
            write_generation_config(tmp, settings)

        # Verification: bit-identical tensors where names and dtype are unchanged, then logits in a fresh process.
        progress("Verifying: comparing tensor checksums with the source")
        converted_sums = tensor_checksums(weight_files(tmp), desc="Hashing converted tensors")
        compared = 0 if cast else compare_tensors(tensor_checksums(weight_files(src_dir), desc="Hashing source tensors"), converted_sums)
        mode = "package" if to_original else "remote"
        progress("Verifying: loading the output in a fresh Python process "
                 + ("as custom code (trust_remote_code)" if mode == "remote" else "with llada-moe-hf")
                 + " and comparing its logits (the longest step)")
        logits, loaded = logits_in_fresh_process(
            tmp, input_ids, mode=mode, attn=model.config._attn_implementation,
            experts=model.config._experts_implementation or "eager", device=device, heartbeat=progress,
        )
        report = compare_logits(logits, reference_logits, source_logits if cast else None,
                                relative_tolerance=max_cast_error, min_top1=min_cast_top1)
        out_dtype = str(model.dtype).replace("torch.", "")
        verification = (
            f"logits on a fixed batch identical to the source's in {out_dtype}"
            + (f" (cast from {str(source_logits.dtype).replace('torch.', '')}: relative max error "
               f"{report['cast_relative_max_error']:.2e}, top-1 agreement {report['cast_top1_agreement']:.3f})" if cast else "")
            + ("; loaded as custom code (trust_remote_code) in a fresh process" if mode == "remote" else "")
        )
        if not to_original:
            kind = card_kind(card, src_repo or str(src_dir))
            card_base = base_model or default_base_model(kind, model.config, src_repo)
            write_card(tmp, kind, model=model, base_model=card_base,
                       repo_id=repo_id or dst_path.name, source=src_repo or src_dir.name, layout=layout,
                       dtype=out_dtype, fused=fused_experts, settings=settings,
                       sampler_source=sampler_origin(stored, settings), token_ids=tokenizer_ids,
                       verification=verification)
        conversion = dict(source=src_repo or str(src_dir), source_layout=layout,
                          output_layout="release" if to_original else ("llada_moe fused" if fused_experts else "llada_moe per-expert"),
                          dtype=out_dtype, tensors_identical_to_source=compared, loaded_as=loaded, verification=report)
        write_manifest(tmp, weight_files(tmp), conversion)
        progress(f"Verified; moving into place: {dst_path}")
        try:
            staging.commit(overwrite)
        except FileExistsError as err:
            raise ConversionError(f"{err} Pass --overwrite to replace it.") from None
    return dst_path


# ----------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("src", nargs="?", help="checkpoint directory or Hub repo id (release, dInfer or llada_moe layout)")
    parser.add_argument("dst", nargs="?", help="output directory (must not exist unless --overwrite)")
    add_runtime_arguments(parser, device_default="cpu")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--fused-experts", action="store_true",
                        help="store experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]) instead of per expert")
    parser.add_argument("--to-original", action="store_true",
                        help="write the release's layout (model_type llada, per-expert tensors, original config keys)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST once the new one is verified")
    parser.add_argument("--tokenizer", help="take the tokenizer from this directory instead of SRC")
    parser.add_argument("--mask-token-id", type=int, help="mask id when the tokenizer does not declare <|mask|>")
    parser.add_argument("--card", default="auto", choices=["auto", "base", "instruct", "other"],
                        help="what the model card says the model is (auto: instruct or base when SRC's name says so, "
                             "else other)")
    parser.add_argument("--base-model", help="base_model of the model card (default: SRC's Hub id; for a local SRC of "
                                             "the release's shape, the release; else none)")
    parser.add_argument("--src-revision", help="revision of SRC when it is a Hub repo id")
    cast = parser.add_argument_group("verification of a --dtype cast")
    cast.add_argument("--max-cast-error", type=float, default=CAST_RELATIVE_TOLERANCE,
                      help="largest logit change accepted, relative to the largest |logit| (default: %(default)s)")
    cast.add_argument("--min-cast-top1", type=float, default=CAST_MIN_TOP1_AGREEMENT,
                      help="smallest share of positions whose top-1 token must not change (default: %(default)s)")
    hub = parser.add_argument_group("pushing to the Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="upload DST to this Hub repository in one commit")
    hub.add_argument("--push-only", metavar="DST", help="push an existing converted DST (checked against its manifest)")
    hub.add_argument("--private", action="store_true", help="create the repository as private")
    hub.add_argument("--revision", help="branch to commit to (created if missing)")
    hub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    hub.add_argument("--token", help="Hub token (default: the saved login / HF_TOKEN)")
    hub.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")


def interrupted_message(err: KeyboardInterrupt, stage: str, retry: str | None) -> str:
    what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
    if stage == "push":
        return (f"llada-moe convert: {what} during the push; the local output is complete and untouched. "
                f"Re-run the push: {retry}")
    return (f"llada-moe convert: {what}: stopped before DST was written and removed its temporary directory; "
            "DST, if it existed, is as it was.")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stage, retry = "convert", None
    try:
        if args.push_only:
            if args.src or args.dst:
                raise ConversionError("--push-only DST takes no SRC/DST arguments.")
            if not args.push_to_hub:
                raise ConversionError("--push-only needs --push-to-hub REPO_ID.")
            dst = Path(args.push_only)
            if not dst.is_dir():
                raise ConversionError(f"--push-only {dst}: no such directory.")
            check_manifest(dst)
        else:
            if not (args.src and args.dst):
                raise ConversionError("Give SRC and DST (or --push-only DST --push-to-hub REPO_ID).")
            dst = convert(
                args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                fused_experts=args.fused_experts, to_original=args.to_original, overwrite=args.overwrite,
                tokenizer=args.tokenizer, mask_token_id=args.mask_token_id, card=args.card,
                base_model=args.base_model, repo_id=args.push_to_hub, src_revision=args.src_revision,
                token=args.token, device=args.device, attn_implementation=args.attn_implementation,
                experts_implementation=args.experts_implementation, max_cast_error=args.max_cast_error,
                min_cast_top1=args.min_cast_top1, progress=Progress(),
            )
            print(f"Converted and verified: {dst}")
        if args.push_to_hub:
            stage, retry = "push", push_only_command(dst, args.push_to_hub, private=args.private,
                                                     revision=args.revision, create_pr=args.create_pr,
                                                     endpoint=args.endpoint)
            url = push_folder(dst, args.push_to_hub, private=args.private, revision=args.revision,
                              create_pr=args.create_pr, token=args.token, endpoint=args.endpoint,
                              retry_command=retry, token_given=args.token is not None)
            print(f"Pushed {dst} to {args.push_to_hub}: {url}")
    except PushError as err:
        print(f"llada-moe convert: error: {err}", file=sys.stderr)
        return 3
    except (ValueError, VerificationError) as err:
        print(f"llada-moe convert: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(interrupted_message(err, stage, retry), file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llada-moe convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_interruptible("llada-moe convert", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
