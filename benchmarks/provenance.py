"""Which code a benchmark measured (the git commit of the repository and whether the work tree had changes),
and writing its JSON.

Every benchmark script writes `git_state()` into its JSON under "git", so that a result can be tied to a commit
(and a result measured on uncommitted code says so). `write_json` writes a result the safe way (most scripts
use it).
"""

import json
import os
import subprocess


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30).stdout


def git_state() -> dict:
    """{"commit": full sha, "dirty": True if tracked files differ from it, "changed": up to 20 such paths}.

    Outside a git checkout (or without git) the commit is None and "error" says why."""
    try:
        commit = _git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    except (OSError, subprocess.SubprocessError) as error:
        return {"commit": None, "dirty": None, "error": f"{type(error).__name__}: {error}"[:300]}
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:20]}


def write_json(report: dict, path: str | None) -> None:
    """Write REPORT to PATH through a temporary file beside it, so an interrupted run leaves PATH as it was; without
    a path nothing is written (running a README command never overwrites the committed results)."""
    if not path:
        print("results not written (pass --out PATH to write the JSON)")
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {path}")


if __name__ == "__main__":
    print(git_state())
