"""Fetch the installed transformers version's common model tests (its PyPI source distribution's tests/*.py) for
modeling_tests/test_hf_common.py.

    python .ci/fetch_transformers_tests.py            # prints the directory; the test finds it there

Downloads with pip (`pip download --no-binary :all: --no-deps transformers==<installed>`), keeps `PKG-INFO` and
`tests/`, and stores them in $LLADA_CI_CACHE (default ~/.cache/llada-moe-hf-ci)/transformers-<version>/, written
to a temporary directory first and moved in complete. Does nothing when that directory already exists.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LLADA_CI_CACHE") or Path.home() / ".cache" / "llada-moe-hf-ci")


def fetch(version: str) -> Path:
    dest = cache_root() / f"transformers-{version}"
    if (dest / "tests" / "test_modeling_common.py").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.tmp-") as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
             f"transformers=={version}", "-d", str(tmp / "download")],
            check=True,
        )
        archive = next((tmp / "download").glob(f"transformers-{version}.tar.gz"))
        prefix = f"transformers-{version}/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and (m.name == prefix + "PKG-INFO" or m.name.startswith(prefix + "tests/"))]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4 / 3.12
            tar.extractall(tmp / "unpacked", members=members, **safe)
        if not (tmp / "unpacked" / prefix / "tests" / "test_modeling_common.py").is_file():
            sys.exit(f"transformers {version}'s sdist has no tests/test_modeling_common.py")
        os.replace(tmp / "unpacked" / prefix, dest)
    return dest


def main():
    import transformers

    print(fetch(transformers.__version__))


if __name__ == "__main__":
    main()
