"""Issue 12, items 7, 8 (convert, LoRA push) and 9 (permissions): a conversion interrupted by Ctrl-C, SIGTERM or
SIGKILL leaves nothing behind (or the next run cleans it), errors name the file and the fix, the output keeps
the source's generation_config, its card describes what was converted, and outputs get the umask's permissions."""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from llada_moe_hf.conversion import convert as convert_module
from llada_moe_hf.conversion.convert import main
from llada_moe_hf.conversion.verify import MANIFEST_NAME, VerificationError, compare_logits
from llada_moe_hf.demo import TINY_ASSET_DIR
from llada_moe_hf.generation_llada_moe import DiffusionGenerationConfig
from llada_moe_hf.model_cards import validate_card
from llada_moe_hf.staging import LOCK_NAME, clean_leftovers

from conftest import FIXTURE_DIR
from fake_hub import fake_hub


TOKEN = "hf_fake_write_token"


@contextlib.contextmanager
def umask(value):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """The embedded tiny model (release layout, tokenizer, generation_config 16/8/16) cast to bfloat16, with the
    cast check widened by its flag; run with relative paths from the output's parent, umask 022."""
    work = tmp_path_factory.mktemp("convert")
    shutil.copytree(TINY_ASSET_DIR, work / "tiny")
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with umask(0o022), contextlib.redirect_stderr(err):
            code = main(["tiny", "tiny-bf16", "--dtype", "bfloat16", "--max-cast-error", "0.2"])
    finally:
        os.chdir(cwd)
    assert code == 0, err.getvalue()[-3000:]
    return work / "tiny-bf16", err.getvalue()


def test_source_generation_config_is_kept(tiny_bf16):
    dst, _ = tiny_bf16
    config = DiffusionGenerationConfig.from_pretrained(dst)
    assert (config.max_new_tokens, config.steps, config.block_length) == (16, 16, 8)  # not 128/128/32
    assert config.eos_token_id == [27, 29] and config.mask_token_id == 28


def test_card_describes_what_was_converted(tiny_bf16):
    dst, _ = tiny_bf16
    card = validate_card((dst / "README.md").read_text())
    assert "base_model" not in card.data.to_dict()  # not derived from the 7B release
    text = card.text
    assert "7B" not in text and "1.85M parameters" in text
    assert "| layers | 4 (4 MoE, 0 dense) |" in text and "8 per MoE layer, top-2" in text
    assert "`tiny` (the release's layout)" in text and "bfloat16" in text
    assert "kept from the source's generation_config.json" in text and "| `steps` | `16` |" in text
    assert "not stated" in text  # neither "base" nor "instruct" in the source's name


@pytest.mark.slow  # a fresh Python process (10-20 s on the busy 2-core machine)
def test_card_snippets_run(tiny_bf16, tmp_path):
    """Every python block of the generated card runs against the converted directory (offline)."""
    dst, _ = tiny_bf16
    blocks = re.findall(r"```python\n(.*?)```", (dst / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 2
    script = "\n".join(f"exec({b.replace('tiny-bf16', str(dst))!r}, {{}})" for b in blocks)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_outputs_get_the_umask_permissions(tiny_bf16):
    dst, _ = tiny_bf16
    assert stat.S_IMODE(dst.stat().st_mode) == 0o755  # mkdtemp's 0700 is not kept
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in dst.iterdir()}
    assert set(modes.values()) == {0o644}, modes  # model.safetensors included (written 0600)


def test_progress_during_verification(tiny_bf16):
    _, err = tiny_bf16
    assert "Verifying: loading the output in a fresh Python process" in err
    assert re.search(r"\[\s*\d+\.\d s\] Verified; moving into place", err)


def test_cast_error_explains_and_names_the_override(tiny_bf16):
    dst, _ = tiny_bf16
    report = json.loads((dst / MANIFEST_NAME).read_text())["conversion"]["verification"]
    assert report["cast_tolerance"]["relative"] == 0.2 and report["cast_relative_max_error"] > 0.05
    reference = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]]])
    moved = reference.clone()
    moved[0, 1] = torch.tensor([0.0, 7.0, 9.0])  # one position switched: a 0.9 relative error, top-1 changed
    with pytest.raises(VerificationError) as error:
        compare_logits(moved, moved, reference)
    message = str(error.value)
    assert "--max-cast-error 0.9" in message and "--min-cast-top1 0.5" in message
    assert "router" in message and "random token ids" in message
    assert compare_logits(moved, moved, reference, relative_tolerance=0.9, min_top1=0.5)["cast_top1_agreement"] == 0.5


def test_failed_push_prints_the_exact_command(tiny_bf16, capsys):
    dst, _ = tiny_bf16
    with fake_hub(token=TOKEN, fail={"commit": 500}) as hub:
        code = main(["--push-only", str(dst), "--push-to-hub", "me/tiny", "--private", "--revision", "dev",
                     "--token", TOKEN, "--endpoint", hub.endpoint])
    err = capsys.readouterr().err
    assert code == 3
    command = err.strip().splitlines()[-1].strip()
    assert shlex.split(command) == ["llada-moe", "convert", "--push-only", str(dst), "--push-to-hub", "me/tiny",
                                    "--private", "--revision", "dev", "--endpoint", hub.endpoint]
    assert TOKEN not in err and "--token" in err  # the token is never printed; the user is told to add it


# ------------------------------------------------------------------------------------------ interruptions


def source_copy(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE_DIR, src, ignore=shutil.ignore_patterns("golden.*"))
    return src


def start_conversion(src, dst):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "llada_moe_hf.conversion.convert", str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_staging(parent, proc, timeout=240):
    """The staging directory's lock file exists: the conversion is writing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        locks = list(parent.glob(f".*.tmp-*/{LOCK_NAME}"))
        if locks:
            return locks[0].parent
        time.sleep(0.1)
    raise AssertionError(f"no staging directory appeared (exit code {proc.poll()})")


@pytest.mark.slow  # a fresh Python process (10-20 s on the busy 2-core machine)
def test_sigterm_cleans_up(tmp_path):
    src, out = source_copy(tmp_path), tmp_path / "out"
    out.mkdir()
    proc = start_conversion(src, out / "dst")
    staging = wait_for_staging(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "Traceback" not in err and "terminated (SIGTERM)" in err.strip().splitlines()[-1]
    assert not staging.exists() and list(out.iterdir()) == []


@pytest.mark.slow  # a fresh Python process (10-20 s on the busy 2-core machine)
def test_sigkill_leftover_is_removed_by_the_next_run(tmp_path, capsys):
    src, out = source_copy(tmp_path), tmp_path / "out"
    out.mkdir()
    proc = start_conversion(src, out / "dst")
    staging = wait_for_staging(out, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert staging.is_dir()  # SIGKILL cannot be caught: the partial output stays ...
    (out / "dst").mkdir()  # ... and the next run, even one that fails at once, deals with it first
    assert main([str(src), str(out / "dst")]) == 2
    err = capsys.readouterr().err
    assert f"Removed {staging}" in err and "killed" in err and f"pid {proc.pid}" in err
    assert not staging.exists()


def test_leftovers_without_a_lock_are_reported_not_removed(tmp_path):
    dst = tmp_path / "dst"
    unknown, old = tmp_path / ".dst.tmp-abc", tmp_path / ".dst.old-xyz"
    unknown.mkdir()
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"x" * 10)
    messages = []
    remaining = clean_leftovers(dst, messages.append)
    assert {e["kind"] for e in remaining} == {"unknown", "old"} and unknown.is_dir() and old.is_dir()
    assert any(f"rm -rf {unknown}" in m for m in messages)
    assert any(f"mv {old} {dst}" in m for m in messages)  # DST is gone: the old one can be put back


def test_ctrl_c_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_checkpoint", interrupted)
    src = source_copy(tmp_path)
    assert main([str(src), str(tmp_path / "dst")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("llada-moe convert: interrupted (Ctrl-C)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------------------------------------------------------ bad input


def test_truncated_shard_is_named(tmp_path, capsys):
    src = source_copy(tmp_path)
    shard = src / "model-00002-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    assert main([str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "SafetensorError" not in err
    assert str(shard) in err and "truncated" in err and "download it again" in err


def test_tokenizer_flag_without_a_tokenizer(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(source_copy(tmp_path)), str(tmp_path / "dst"), "--tokenizer", str(tmp_path / "empty")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_lora_push_without_network_says_what_failed(tmp_path):
    from llada_moe_hf.lora import AdapterPushError, get_lora_model, push_lora_adapter_to_hub, save_adapter_with_card
    from llada_moe_hf.modeling_llada_moe import LLaDAMoEForDiffusionLM

    from conftest import tiny_config

    torch.manual_seed(0)
    peft_model = get_lora_model(LLaDAMoEForDiffusionLM(tiny_config()), r=2)
    with pytest.raises(AdapterPushError) as error:
        push_lora_adapter_to_hub(peft_model, "me/tiny-lora", base_model="inclusionAI/LLaDA-MoE-7B-A1B-Instruct",
                                 token="hf_x", endpoint="http://127.0.0.1:9")  # nothing listens there
    message = str(error.value)
    assert "create the repository" in message and "127.0.0.1:9" in message and "network" in message
    assert "save_adapter_with_card" in message
    with umask(0o022):
        folder = save_adapter_with_card(peft_model, tmp_path / "adapter",
                                        base_model="inclusionAI/LLaDA-MoE-7B-A1B-Base")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}
