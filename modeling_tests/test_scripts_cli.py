"""Issue 12, item 9: the example and benchmark scripts behave as command-line tools.

- `examples/build_tiny_tokenizer.py --help` prints help (it used to create a directory named `--help`), refuses to
  replace a non-empty directory without --overwrite, and writes through a temporary directory;
- the benchmarks write their JSON only to a path given on the command line, so running a command from the README
  never overwrites the committed results in benchmarks/results/.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


HELPER_MODULES = {"provenance.py"}  # imported by the benchmarks, not run
BENCHMARKS = sorted(p for p in (REPO_ROOT / "benchmarks").glob("*.py") if p.name not in HELPER_MODULES)
RESULTS = REPO_ROOT / "benchmarks" / "results"


def run(args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_build_tiny_tokenizer_help_creates_nothing(tmp_path):
    proc = run([REPO_ROOT / "examples" / "build_tiny_tokenizer.py", "--help"], tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "output_dir" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_build_tiny_tokenizer_writes_and_refuses_to_clobber(tmp_path):
    script = REPO_ROOT / "examples" / "build_tiny_tokenizer.py"
    proc = run([script, "tok"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "tok").stat().st_mode & 0o777 == 0o777 & ~umask  # the user's usual mode, not mkdtemp's 0700
    again = run([script, "tok"], tmp_path)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert run([script, "tok", "--overwrite"], tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary directory left behind


HELP_SCRIPT = """
import contextlib, io, json, os, runpy, sys
found = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path.insert(0, os.path.dirname(path))  # as `python path` does: the benchmarks import provenance
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exit:
            code = exit.code
        else:
            code = "no exit"
    found[path] = [code, out.getvalue()]
print("HELP" + json.dumps(found))
"""


def test_benchmark_help_names_the_output_option(tmp_path):
    """Every benchmark has --help and an --out option (one process for all: each would import torch again)."""
    assert len(BENCHMARKS) >= 5
    proc = run(["-c", HELP_SCRIPT, *BENCHMARKS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.split("HELP", 1)[1])
    for script in BENCHMARKS:
        code, text = found[str(script)]
        assert code == 0 and "usage:" in text and "--out" in text, (script.name, code, text[-500:])
    assert list(tmp_path.iterdir()) == []


def results_digest():
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_benchmarks_write_json_only_where_told(tmp_path):
    """Small runs of the CPU benchmarks from the repository root: without --out nothing is written; with it the
    JSON holds the machine, versions and results."""
    before = results_digest()
    forward = [REPO_ROOT / "benchmarks" / "forward.py", "--layers", "1", "--tokens", "8", "--reps", "1"]
    generate = [REPO_ROOT / "benchmarks" / "generate.py", "--modes", "exact", "--gen-length", "8", "--block-length",
                "8", "--prompt-length", "8", "--layers", "1", "--threads", "1"]
    for args in (forward, generate):
        proc = run(args, REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "results not written (pass --out PATH" in proc.stdout
    assert results_digest() == before
    out = tmp_path / "nested" / "generate.json"
    proc = run([*generate, "--out", out], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"machine", "versions", "shapes", "results"} <= report.keys()
    assert not (tmp_path / "nested" / "generate.json.tmp").exists()


def test_readme_benchmark_commands_do_not_write_committed_results():
    """A command of the README that runs a benchmark names its output, and (in a code block, which a reader
    copies as it is) not a file under benchmarks/results/."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()
                if re.search(r"benchmarks/\w+\.py", line) and not line.lstrip().startswith("#")]
    assert commands, "the README shows no benchmark command"
    for command in commands:
        match = re.search(r"--(?:out|json)[ =](\S+)", command)
        assert match, f"README benchmark command without --out: {command}"
        assert "benchmarks/results" not in match.group(1), command
