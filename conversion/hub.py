"""Hub I/O of a conversion: resolving a Hub repo id as SRC, and pushing a converted directory in one commit."""

import re
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a conversion needs from a source repository (weights, config, tokenizer, code, card).
SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.jinja", "*.txt", "*.model", "*.tiktoken", "README.md"]


class PushError(RuntimeError):
    """The upload failed; the local directory is untouched and the push can be re-run."""


def resolve_source(src: str, revision: str | None = None, token: str | None = None) -> tuple[Path, str | None]:
    """(local directory, Hub repo id or None). A Hub id is downloaded (weights and tokenizer files only)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise ValueError(f"SRC {src} is a file; give the checkpoint's directory or a Hub repo id.")
    if not REPO_ID.match(src):
        raise ValueError(f"SRC {src!r} is neither an existing directory nor a Hub repo id like 'org/name'.")
    try:
        local = snapshot_download(repo_id=src, revision=revision, token=token, allow_patterns=SOURCE_PATTERNS)
    except Exception as err:
        raise ValueError(f"Could not download {src} from the Hub ({type(err).__name__}: {err}). Check the repo id, "
                         "your network and token, or download it yourself and pass the directory.") from err
    return Path(local), src


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, token: str | None = None, endpoint: str | None = None,
                commit_message: str | None = None) -> str:
    """Create `repo_id` if needed and upload every file of `folder` in a single commit. Returns the commit URL
    (or the pull request URL). Raises PushError, leaving `folder` as it was."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".git" not in p.relative_to(folder).parts)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "upload the files"
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload LLaDA-MoE checkpoint converted with llada-moe-hf ({len(files)} files)",
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as err:  # network, auth and server errors all leave the local copy as it is
        raise PushError(
            f"Push to {repo_id} failed while trying to {step}: {type(err).__name__}: {err}\n"
            f"The converted checkpoint in {folder} is complete and untouched. Fix the cause (token with write "
            f"access: --token or `hf auth login`; network) and re-run: "
            f"llada-moe convert --push-only {folder} --push-to-hub {repo_id}"
        ) from err
    return info.pr_url or info.commit_url
