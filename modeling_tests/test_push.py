"""Issue 5: pushing a converted checkpoint, against a loopback stand-in for the Hub (fake_hub.py)."""

import hashlib
import shutil

import pytest

from llada_moe_hf.conversion.convert import main

from conftest import FIXTURE_DIR
from fake_hub import fake_hub


TOKEN = "hf_fake_write_token"


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Convert and push in one command; the hub records what arrived."""
    src = tmp_path_factory.mktemp("src") / "tiny"
    shutil.copytree(FIXTURE_DIR, src, ignore=shutil.ignore_patterns("golden*"))
    dst = tmp_path_factory.mktemp("out") / "tiny-hub"
    with fake_hub(token=TOKEN) as hub:
        code = main([str(src), str(dst), "--push-to-hub", "me/tiny", "--private", "--token", TOKEN,
                     "--endpoint", hub.endpoint])
    return code, dst, hub


def test_every_file_arrives_byte_identical_in_one_commit(pushed):
    code, dst, hub = pushed
    assert code == 0
    assert len(hub.commits) == 1 and hub.repos["me/tiny"]["private"]
    remote = hub.files("me/tiny")
    local = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert remote.keys() == local.keys() and "model.safetensors" in remote and "README.md" in remote
    for name in local:
        assert remote[name] == local[name], name
    assert all(host.startswith("/api/") for _, host, _ in hub.requests)


@pytest.mark.parametrize("fail, token, status", [({"commit": 500}, TOKEN, "500"), ({}, "hf_wrong", "401")])
def test_server_error_leaves_dst_intact_and_rerun_continues(pushed, capsys, fail, token, status):
    _, dst, _ = pushed
    before = snapshot(dst)
    with fake_hub(token=TOKEN, fail=fail) as hub:
        code = main(["--push-only", str(dst), "--push-to-hub", "me/tiny", "--token", token, "--endpoint", hub.endpoint])
    err = capsys.readouterr().err
    assert code == 3 and status in err and "untouched" in err and f"--push-only {dst}" in err
    assert not hub.commits and snapshot(dst) == before
    with fake_hub(token=TOKEN) as hub:  # the re-run from the same DST
        assert main(["--push-only", str(dst), "--push-to-hub", "me/tiny", "--token", TOKEN, "--endpoint", hub.endpoint]) == 0
    assert set(hub.files("me/tiny")) == set(before)


def test_create_pr_and_revision(pushed):
    _, dst, _ = pushed
    with fake_hub(token=TOKEN) as hub:
        assert main(["--push-only", str(dst), "--push-to-hub", "me/tiny", "--create-pr", "--token", TOKEN,
                     "--endpoint", hub.endpoint]) == 0
        assert main(["--push-only", str(dst), "--push-to-hub", "me/tiny", "--revision", "bf16", "--token", TOKEN,
                     "--endpoint", hub.endpoint]) == 0
    assert len(hub.commits) == 2 and hub.commits[0]["create_pr"]
    assert hub.branches == [("me/tiny", "bf16")] and hub.commits[1]["revision"] == "bf16"
    assert set(hub.files("me/tiny", revision="bf16")) == set(snapshot(dst))


def test_modified_dst_is_not_pushed(pushed, tmp_path, capsys):
    _, dst, _ = pushed
    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with fake_hub(token=TOKEN) as hub:
        assert main(["--push-only", str(copy), "--push-to-hub", "me/tiny", "--token", TOKEN, "--endpoint", hub.endpoint]) == 2
    assert "no longer matches" in capsys.readouterr().err and not hub.requests
