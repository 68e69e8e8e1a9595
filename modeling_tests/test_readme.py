"""README.md is the user's manual: every ```python and ```bash block in it runs here, offline, on the CPU.

Convention (for whoever edits the README):

* Each ```python block runs as its own script (a fresh `python` process) and each ```bash block as a
  `bash -e -o pipefail` script, in README order, in one scratch directory (so a block may use a file an earlier
  block wrote there). `python` and the console scripts (`llada-moe`) are this virtual environment's. Write
  blocks that stand alone and take seconds.
* Before running, the block's text is changed by plain substitution (`substitutions()` below):
      inclusionAI/LLaDA-MoE-7B-A1B-Instruct -> a copy of llada_moe_hf/assets/tiny (the embedded trained tiny model,
                                               release layout, with its tokenizer) whose max_position_embeddings is
                                               the release's 8192, so that the 7B's lengths fit
      inclusionAI/LLaDA-MoE-7B-A1B-Base     -> modeling_tests/fixtures/llada-moe-tiny (release layout, no tokenizer)
      me/LLaDA-MoE-7B-A1B-Instruct-hf       -> a custom-code repo saved from that copy (as `llada-moe convert`
                                               writes one: our .py files, auto_map, custom_pipelines, tokenizer)
      device_map="cuda"                     -> device_map="cpu"
      bf16=True                             -> use_cpu=True (TrainingArguments: bf16 mixed precision needs a GPU)
  The stand-ins are made once per test session.
  The scratch directory holds `my.jsonl` (8 lines of examples/data/sft_tiny.jsonl, the `{"prompt", "response"}`
  file the LoRA examples read) and links to the repository's top-level folders (`benchmarks/`, `examples/`, ...),
  so that `python examples/x.py` works; whatever a block writes stays in the scratch directory.
  HF_HUB_OFFLINE=1: nothing reaches the network.
* A block that cannot run here (it needs a GPU, the 7B, the network, or minutes) gets, on the line right above
  its opening fence:
      <!-- readme-test: skip (REASON) -->
  REASON must be non-empty. Skipped blocks are reported by pytest with their line and reason (`-ra`, the
  default here; `python -m pytest modeling_tests/test_readme.py -q -rs` lists only them).
* A block fails if it exits non-zero or prints a warning (a Python warning, or a transformers warning such as a
  deprecation): the manual's code must run cleanly. KNOWN_NOISE lists the exceptions being fixed elsewhere.
* A block that needs newer versions than the lowest that pyproject declares (the README says so beside it) gets
      <!-- readme-test: requires (transformers>=5.20 peft>=0.21) -->
  instead: it runs where the installed versions meet every requirement, and is a skip with the reason elsewhere
  (CI's lowest-versions environment).
* Only `python` and `bash` blocks run. Other fences must name their language (`text`, `json`, ...); the shell
  and Python aliases (`sh`, `shell`, `console`, `py`, ...) are refused so that no command escapes this test.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FIXTURE_DIR, REPO_ROOT


README = REPO_ROOT / "README.md"
ASSET_DIR = REPO_ROOT / "llada_moe_hf" / "assets" / "tiny"
RUN_LANGUAGES = ("python", "bash")
REFUSED_LANGUAGES = {"sh", "shell", "console", "shell-session", "zsh", "py", "python3", "pycon", "ipython"}
SKIP_MARKER = re.compile(r"^<!-- readme-test: skip \((?P<reason>.*\S.*)\) -->$")
REQUIRES_MARKER = re.compile(r"^<!-- readme-test: requires \((?P<requirements>[^()]*\S[^()]*)\) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
CONVERTED_REPO_ID = "me/LLaDA-MoE-7B-A1B-Instruct-hf"
# Lines of output that are warnings. Progress bars and the programs' own output are not.
NOISE = re.compile(r"(\w*Warning\b|\bdeprecated\b|You are using a model of type)")
# (message, text of the blocks it is tolerated in, why): warnings being fixed elsewhere or not ours to fix.
KNOWN_NOISE = [
    # transformers 5.24 renamed TrainingArguments(gradient_checkpointing=) to activation_checkpointing=, which 5.17
    # (our floor) does not have: the README keeps the name both versions accept.
    ("`gradient_checkpointing` is deprecated", "gradient_checkpointing=True", "renamed in transformers 5.24"),
    ("warnings.warn(f\"`{old}` is deprecated", "gradient_checkpointing=True", "the line Python prints under it"),
    # torch.compile (torch 2.13) imports a torch.jit helper that warns; only shown under -W default, as here.
    ("`torch.jit.script_method` is deprecated", 'cache_implementation="static"', "torch's own, from torch.compile"),
]


@dataclass
class Block:
    line: int  # line of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None  # the reason, for a skipped block
    requires: str | None = None  # requirements such as "transformers>=5.20 peft>=0.21"

    @property
    def id(self):
        return f"L{self.line}-{self.lang}"


def parse_readme(text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown text, and the problems with its readme-test markers and fences."""
    lines = text.splitlines()
    blocks, problems = [], []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            if lines[i].lstrip().startswith("<!--") and "readme-test" in lines[i]:  # prose may name the marker
                marker = SKIP_MARKER.match(lines[i].strip()) or REQUIRES_MARKER.match(lines[i].strip())
                below = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                if not marker:
                    problems.append(f"line {i + 1}: malformed marker {lines[i]!r}; write "
                                    "<!-- readme-test: skip (REASON) --> with a non-empty REASON, or "
                                    "<!-- readme-test: requires (transformers>=5.20 ...) -->")
                elif below is None or below["lang"] not in RUN_LANGUAGES:
                    problems.append(f"line {i + 1}: a marker must sit right above a ```python or ```bash fence")
                elif "requirements" in marker.groupdict() and (error := requirement_problem(marker["requirements"])):
                    problems.append(f"line {i + 1}: {error}")
            i += 1
            continue
        lang, start = match["lang"], i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            problems.append(f"line {start + 1}: code fence never closed")
            break
        if lang == "" or lang in REFUSED_LANGUAGES:
            problems.append(f"line {start + 1}: fence language {lang!r}: use python or bash for code that runs, "
                            "or name another language (text, json, ...)")
        previous = lines[start - 1].strip() if start else ""
        marker = SKIP_MARKER.match(previous)
        requires = REQUIRES_MARKER.match(previous)
        blocks.append(Block(start + 1, lang, "\n".join(lines[start + 1:end]) + "\n",
                            marker["reason"].strip() if marker else None,
                            requires["requirements"].strip() if requires else None))
        i = end + 1
    return blocks, problems


def requirement_problem(requirements: str) -> str | None:
    """Why a requires marker's text is not a list of requirements (None when it is)."""
    from packaging.requirements import InvalidRequirement, Requirement

    for item in requirements.split():
        try:
            Requirement(item)
        except InvalidRequirement as error:
            return f"requires marker: {item!r} is not a requirement such as transformers>=5.20 ({error})"
    return None


def unmet_requirements(requirements: str) -> list[str]:
    """The requirements the installed packages do not meet, each with the installed version."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    unmet = []
    for item in requirements.split():
        requirement = Requirement(item)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{item} (installed: {installed or 'none'})")
    return unmet


BLOCKS, PROBLEMS = parse_readme(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.lang in RUN_LANGUAGES]


def substitutions(stand_ins: Path) -> list[tuple[str, str]]:
    return [
        (CONVERTED_REPO_ID, str(stand_ins / "converted-instruct")),
        ("inclusionAI/LLaDA-MoE-7B-A1B-Instruct", str(stand_ins / "instruct")),
        ("inclusionAI/LLaDA-MoE-7B-A1B-Base", str(FIXTURE_DIR)),
        ('device_map="cuda"', 'device_map="cpu"'),
        ("bf16=True", "use_cpu=True"),
    ]


def make_stand_ins(stand_ins: Path):
    """The embedded model with the release's 8192 positions, and a custom-code repo saved from it."""
    import json

    from transformers import AutoTokenizer

    from llada_moe_hf import LLaDAMoEForDiffusionLM

    instruct = stand_ins / "instruct"
    shutil.copytree(ASSET_DIR, instruct)
    config = json.loads((instruct / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (instruct / "config.json").write_text(json.dumps(config, indent=2))
    model = LLaDAMoEForDiffusionLM.from_pretrained(instruct)
    model.save_pretrained(stand_ins / "converted-instruct")
    AutoTokenizer.from_pretrained(instruct, config=model.config).save_pretrained(stand_ins / "converted-instruct")


def substitute(code: str, table) -> str:
    for old, new in table:
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The directory the blocks run in, and the substitution table."""
    root = tmp_path_factory.mktemp("readme")
    make_stand_ins(root / "stand-ins")
    work = root / "work"
    work.mkdir()
    for name in ("benchmarks", "examples", "modeling_tests", "llada_moe_hf", "conversion", "model_cards"):
        (work / name).symlink_to(REPO_ROOT / name)
    sample = (REPO_ROOT / "examples" / "data" / "sft_tiny.jsonl").read_text().splitlines()[:8]
    (work / "my.jsonl").write_text("\n".join(sample) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="default",
               HF_MODULES_CACHE=str(root / "modules"), HF_HOME=str(root / "hf-home"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("PYTHONPATH", None)
    return work, substitutions(root / "stand-ins"), env


def test_readme_markers_and_fences_are_well_formed():
    assert PROBLEMS == []
    assert len(RUNNABLE) >= 10, "the README lost its code blocks?"


def test_readme_substitution_is_complete():
    """Every Hub id a runnable block names is one the runner can replace with a local stand-in."""
    known = {old for old, _ in substitutions(Path("x"))}
    hub_id = re.compile(r"[\"' ](inclusionAI/[\w.-]+|me/LLaDA[\w.-]+)")
    for block in RUNNABLE:
        if block.skip is None:
            for name in hub_id.findall(block.code):
                assert name in known, f"README line {block.line}: {name} has no local stand-in in SUBSTITUTIONS"


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_readme_block(block, scratch):
    if block.skip is not None:
        pytest.skip(f"README line {block.line}: {block.skip}")
    if block.requires and (unmet := unmet_requirements(block.requires)):
        pytest.skip(f"README line {block.line}: needs {', '.join(unmet)}")
    work, table, env = scratch
    code = substitute(block.code, table)
    script = work / f"readme_{block.id}.{'py' if block.lang == 'python' else 'sh'}"
    script.write_text(code)
    command = [sys.executable, script.name] if block.lang == "python" else ["bash", "-e", "-o", "pipefail", script.name]
    proc = subprocess.run(command, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"README line {block.line} ({block.lang}) failed:\n{code}\n--- output ---\n{output[-4000:]}")
    noise = [line for line in output.splitlines() if NOISE.search(line) and not any(
        message in line and where in block.code for message, where, _ in KNOWN_NOISE)]
    assert noise == [], f"README line {block.line} printed warnings:\n" + "\n".join(noise)


# ------------------------------------------------------------------------------ the runner's own behaviour


def test_parser_reads_markers_and_refuses_bad_ones():
    text = "\n".join([
        "<!-- readme-test: skip (needs a GPU) -->",
        "```python",
        "print(1)",
        "```",
        "```bash",
        "echo hi",
        "```",
        "<!-- readme-test: skip () -->",
        "```bash",
        "echo no reason",
        "```",
        "<!-- readme-test: skip (orphan) -->",
        "",
        "```sh",
        "echo alias",
        "```",
    ])
    blocks, problems = parse_readme(text)
    assert [(b.lang, b.skip) for b in blocks] == [("python", "needs a GPU"), ("bash", None), ("bash", None),
                                                 ("sh", None)]
    assert [p.split(":")[0] for p in problems] == ["line 8", "line 12", "line 14"]
    assert "non-empty REASON" in problems[0] and "right above" in problems[1] and "'sh'" in problems[2]


def test_requires_marker_runs_a_block_only_where_the_versions_meet_it():
    text = "\n".join([
        "<!-- readme-test: requires (transformers>=5.0 torch>=2.0) -->",
        "```bash",
        "echo new",
        "```",
        "<!-- readme-test: requires (transformers>=99) -->",
        "```python",
        "print(1)",
        "```",
        "<!-- readme-test: requires (not a requirement!) -->",
        "```bash",
        "echo bad",
        "```",
    ])
    blocks, problems = parse_readme(text)
    assert [b.requires for b in blocks] == ["transformers>=5.0 torch>=2.0", "transformers>=99", "not a requirement!"]
    assert len(problems) == 1 and problems[0].startswith("line 9:") and "not a requirement" in problems[0]
    assert unmet_requirements(blocks[0].requires) == []
    [unmet] = unmet_requirements(blocks[1].requires)
    assert unmet.startswith("transformers>=99 (installed: 5.")
    assert unmet_requirements("no-such-package-here>=1") == ["no-such-package-here>=1 (installed: none)"]


def test_substitution_replaces_hub_ids_and_cuda():
    table = substitutions(Path("/tmp/stand-ins"))
    code = ('m = X.from_pretrained("inclusionAI/LLaDA-MoE-7B-A1B-Instruct", device_map="cuda")\n'
            'p = pipeline(model="me/LLaDA-MoE-7B-A1B-Instruct-hf")\n')
    out = substitute(code, table)
    assert '"/tmp/stand-ins/instruct"' in out and 'device_map="cpu"' in out
    assert '"/tmp/stand-ins/converted-instruct"' in out
    assert "inclusionAI" not in out and "cuda" not in out
