"""Verification of a converted checkpoint: tensor checksums and logits in a fresh process."""

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


MANIFEST_NAME = "tensors.sha256.json"
MANIFEST_FORMAT = "llada-moe-hf tensor manifest v1: sha256 of each tensor's raw bytes as stored in safetensors"
# A cast (e.g. float32 -> bfloat16) may change logits by at most this fraction of the largest |logit|, and the
# top-1 prediction must agree on at least this share of positions. Same dtype: identical, no tolerance.
CAST_RELATIVE_TOLERANCE = 5e-2
CAST_MIN_TOP1_AGREEMENT = 0.9


class VerificationError(RuntimeError):
    """The converted checkpoint does not reproduce the source; nothing was written to the destination."""


# ------------------------------------------------------------------------------------------- checksums


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def tensor_checksums(files, desc="Hashing tensors") -> dict:
    """{name: {"sha256", "dtype", "shape", "file"}} for every tensor of the given safetensors files, hashed from
    the bytes on disk (exact for every dtype, bfloat16 included), with a progress bar over tensors."""
    entries = []
    for path in map(Path, files):
        header, data_start = _safetensors_header(path)
        entries.extend((path, name, info, data_start) for name, info in header.items())
    result = {}
    handles = {}
    try:
        for path, name, info, data_start in tqdm(entries, desc=desc, unit="tensor"):
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            digest, remaining = hashlib.sha256(), end - begin
            while remaining:
                chunk = f.read(min(remaining, 64 << 20))
                if not chunk:
                    raise VerificationError(f"{path} is truncated: tensor {name} ends past the end of the file.")
                digest.update(chunk)
                remaining -= len(chunk)
            if name in result:
                raise VerificationError(f"Tensor {name} is stored twice ({result[name]['file']} and {path.name}).")
            result[name] = dict(sha256=digest.hexdigest(), dtype=info["dtype"], shape=info["shape"], file=path.name)
    finally:
        for f in handles.values():
            f.close()
    return dict(sorted(result.items()))


def write_manifest(directory: Path, files, conversion: dict) -> dict:
    manifest = dict(format=MANIFEST_FORMAT, conversion=conversion, tensors=tensor_checksums(files))
    (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_manifest(directory: Path) -> dict:
    """Re-hash a converted directory's tensors and compare with its manifest (before a push, for instance)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise VerificationError(
            f"{directory} has no {MANIFEST_NAME}: it is not a finished `llada-moe convert` output. Convert again."
        )
    manifest = json.loads(path.read_text())
    files = sorted({directory / entry["file"] for entry in manifest["tensors"].values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise VerificationError(f"{directory} is missing weight file(s) {missing} listed in {MANIFEST_NAME}.")
    actual = tensor_checksums(files, desc="Checking tensors")
    changed = sorted(n for n in manifest["tensors"] if actual.get(n, {}).get("sha256") != manifest["tensors"][n]["sha256"])
    if changed or set(actual) != set(manifest["tensors"]):
        raise VerificationError(
            f"{directory} no longer matches its {MANIFEST_NAME} (changed: {changed[:10]}): the files were modified "
            "after conversion. Convert again."
        )
    return manifest


def compare_tensors(source: dict, converted: dict) -> int:
    """Tensors stored under the same name in the source and the output (same dtype) must be bit-identical.
    Returns how many were compared."""
    shared = [n for n in source if n in converted and source[n]["dtype"] == converted[n]["dtype"]]
    differing = [n for n in shared if source[n]["sha256"] != converted[n]["sha256"]]
    if differing:
        raise VerificationError(
            f"{len(differing)} tensor(s) differ from the source although neither name nor dtype changed: "
            f"{differing[:10]}."
        )
    return len(shared)


# ------------------------------------------------------------------------------------------- logits


def fixed_batch(vocab_size: int, mask_token_id: int | None, batch_size: int = 2, length: int = 24) -> torch.Tensor:
    """Deterministic input ids; with a mask id, every third position of the second half is masked (the inputs a
    diffusion sampler feeds the model)."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, vocab_size, (batch_size, length), generator=generator)
    if mask_token_id is not None:
        input_ids[:, length // 2 :: 3] = mask_token_id
    return input_ids


@torch.no_grad()
def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids.to(device)).logits.cpu()


# Runs in a fresh interpreter. "remote": llada_moe_hf must not be importable; the checkpoint's own code loads
# it (trust_remote_code). "package": this package's loader (the release layout, whose code is not shipped).
CHILD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    checkpoint, batch_file, out_file, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    torch.set_num_threads(options["threads"])
    kwargs = dict(attn_implementation=options["attn"], experts_implementation=options["experts"], dtype="auto")
    if options["mode"] == "remote":
        sys.modules["llada_moe_hf"] = None
        from transformers import AutoModel
        model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, **kwargs)
        where = type(model).__module__
        assert where.startswith("transformers_modules."), f"not loaded as custom code: {where}"
    else:
        from llada_moe_hf import LLaDAMoEForDiffusionLM
        model = LLaDAMoEForDiffusionLM.from_pretrained(checkpoint, **kwargs)
    model = model.to(options["device"]).eval()
    input_ids = load_file(batch_file)["input_ids"].to(options["device"])
    with torch.no_grad():
        logits = model(input_ids).logits.cpu()
    save_file({"logits": logits.contiguous()}, out_file)
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "dtype": str(model.dtype)}))
    """
)


def logits_in_fresh_process(checkpoint: Path, input_ids, *, mode: str, attn: str, experts: str, device: str = "cpu",
                            timeout: int = 3600, heartbeat=None, every: float = 15.0) -> tuple[torch.Tensor, dict]:
    """Load `checkpoint` in a new Python process and return its logits on `input_ids`. While it runs,
    `heartbeat(message)` is called every `every` seconds."""
    with tempfile.TemporaryDirectory(prefix="llada-moe-verify-") as work:
        work = Path(work)
        save_file({"input_ids": input_ids.contiguous()}, work / "batch.safetensors")
        options = dict(mode=mode, attn=attn, experts=experts, device=device, threads=torch.get_num_threads())
        env = dict(os.environ, HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1")
        # The child runs in `work`: a relative checkpoint path would be read as a Hub repo id there.
        proc = run_with_heartbeat(
            [sys.executable, "-c", CHILD_SCRIPT, str(Path(checkpoint).absolute()), str(work / "batch.safetensors"),
             str(work / "logits.safetensors"), json.dumps(options)],
            cwd=work, env=env, timeout=timeout, heartbeat=heartbeat, every=every,
        )
        if proc.returncode != 0:
            how = "as custom code (trust_remote_code, without llada_moe_hf)" if mode == "remote" else "with llada_moe_hf"
            raise VerificationError(
                f"The converted checkpoint does not load {how} in a fresh process:\n{proc.stderr[-3000:]}"
            )
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        return load_file(work / "logits.safetensors")["logits"], info


def run_with_heartbeat(argv, *, cwd, env, timeout, heartbeat=None, every=15.0) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True), calling `heartbeat` every `every` seconds while it runs.
    The child is killed if this process is interrupted (Ctrl-C, SIGTERM) or the timeout passes."""
    start = time.monotonic()
    with subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            while True:
                try:
                    stdout, stderr = proc.communicate(timeout=every)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - start
                    if elapsed > timeout:
                        raise
                    if heartbeat is not None:
                        heartbeat(f"  ... still loading and running the output in the fresh process ({elapsed:.0f} s)")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def compare_logits(converted: torch.Tensor, same_dtype_reference: torch.Tensor, source_reference: torch.Tensor | None,
                   relative_tolerance: float = CAST_RELATIVE_TOLERANCE, min_top1: float = CAST_MIN_TOP1_AGREEMENT):
    """Identical to the source model in the output dtype; within the cast tolerance of the source in its own dtype.
    Returns a report dict."""
    report = {"identical_to_source_in_output_dtype": bool(torch.equal(converted, same_dtype_reference))}
    if not report["identical_to_source_in_output_dtype"]:
        diff = (converted.float() - same_dtype_reference.float()).abs().max().item()
        raise VerificationError(
            f"Converted logits differ from the source's (same dtype {converted.dtype}): max |diff| = {diff:.3e}; "
            "they must be identical. A tensor was changed or lost in conversion."
        )
    if source_reference is not None:
        ref = source_reference.float()
        scale = ref.abs().max().item() or 1.0
        relative = (converted.float() - ref).abs().max().item() / scale
        agreement = (converted.float().argmax(-1) == ref.argmax(-1)).float().mean().item()
        per_position = (converted.float() - ref).abs().amax(-1) / scale
        over = int((per_position > relative_tolerance).sum())
        report.update(cast_relative_max_error=relative, cast_top1_agreement=agreement,
                      cast_positions_over_tolerance=over, cast_positions=per_position.numel(),
                      cast_tolerance=dict(relative=relative_tolerance, top1=min_top1))
        if relative > relative_tolerance or agreement < min_top1:
            raise VerificationError(cast_error_message(converted.dtype, source_reference.dtype, report))
    return report


def cast_error_message(dtype, source_dtype, report: dict) -> str:
    """Why a cast was refused, why a MoE model can move that far, and the flags that accept it."""
    relative, agreement = report["cast_relative_max_error"], report["cast_top1_agreement"]
    limits = report["cast_tolerance"]
    flags = []
    if relative > limits["relative"]:
        flags.append(f"--max-cast-error {math.ceil(round(relative * 100, 6)) / 100:g}")
    if agreement < limits["top1"]:
        flags.append(f"--min-cast-top1 {math.floor(round(agreement * 100, 6)) / 100:g}")
    return (
        f"After the cast to {dtype} the logits moved too far from the source's ({source_dtype}): relative max "
        f"error {relative:.3e} (limit {limits['relative']}; {report['cast_positions_over_tolerance']} of "
        f"{report['cast_positions']} positions over it), top-1 agreement {agreement:.3f} (minimum {limits['top1']}). "
        "Rounding the weights can flip a router's choice between two experts that score almost the same; the "
        "positions that switch experts get quite different logits, while the others stay close. The check runs on "
        "a batch of random token ids, where a small model (few experts, few layers) is far from what it was "
        "trained on and such near-ties are common, so a small or test model can exceed the limit although the "
        "cast is fine on real text. To accept this cast, re-run with " + " ".join(flags) + " (the measured "
        "errors are then recorded in tensors.sha256.json and the model card); or keep the source's dtype "
        "(--dtype auto)."
    )
