"""Hub I/O of a conversion: resolving a Hub repo id as SRC, and pushing a converted directory in one commit."""

import shlex
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download

from llada_moe_hf.cli_common import check_source
# What a conversion needs from a source repository (weights, config, tokenizer, code, card).
SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.jinja", "*.txt", "*.model", "*.tiktoken", "README.md"]


class PushError(RuntimeError):
    """The upload failed; the local directory is untouched and the push can be re-run."""


def resolve_source(src: str, revision: str | None = None, token: str | None = None) -> tuple[Path, str | None]:
    """(local directory, Hub repo id or None). A Hub id is downloaded (weights and tokenizer files only)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path, None
    check_source(src, "SRC")  # a missing path, or a Hub id that cannot be reached: a clear error, no retries
    try:
        local = snapshot_download(repo_id=src, revision=revision, token=token, allow_patterns=SOURCE_PATTERNS)
    except Exception as err:
        raise ValueError(f"Could not download {src} from the Hub ({type(err).__name__}: {err}). Check the repo id, "
                         "your network and token, or download it yourself and pass the directory.") from err
    return Path(local), src


def push_only_command(folder, repo_id: str, *, private: bool = False, revision: str | None = None,
                      create_pr: bool = False, endpoint: str | None = None) -> str:
    """The exact `llada-moe convert --push-only` command for these push settings, quoted for a POSIX shell. The
    token is never printed: the command relies on HF_TOKEN or the saved login."""
    argv = ["llada-moe", "convert", "--push-only", str(folder), "--push-to-hub", repo_id]
    argv += ["--private"] if private else []
    argv += ["--revision", revision] if revision else []
    argv += ["--create-pr"] if create_pr else []
    argv += ["--endpoint", endpoint] if endpoint else []
    return shlex.join(argv)


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, token: str | None = None, endpoint: str | None = None,
                commit_message: str | None = None, retry_command: str | None = None, token_given: bool = False) -> str:
    """Create `repo_id` if needed and upload every file of `folder` in a single commit. Returns the commit URL
    (or the pull request URL). Raises PushError, leaving `folder` as it was; its message ends with the command
    that retries the push with the same settings (`retry_command`, default: built from these arguments)."""
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
        retry = retry_command or push_only_command(folder, repo_id, private=private, revision=revision,
                                                   create_pr=create_pr, endpoint=endpoint)
        token_note = (" (the token is not repeated: add --token TOKEN, or set HF_TOKEN)" if token_given or token
                      else "")
        raise PushError(
            f"Push to {repo_id} failed while trying to {step}: {type(err).__name__}: {err}\n"
            f"The converted checkpoint in {folder} is complete and untouched. Fix the cause (token with write "
            f"access: --token, HF_TOKEN or `hf auth login`; network) and re-run{token_note}:\n    {retry}"
        ) from err
    return info.pr_url or info.commit_url
