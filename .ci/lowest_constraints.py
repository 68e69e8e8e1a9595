"""Print pip constraints pinning every floor of pyproject.toml's [project].dependencies and of the `eval` extra
(lm-eval, whose adapter is version-sensitive): `name>=X` -> `name==X`.

    python .ci/lowest_constraints.py > lowest.txt && pip install -e ".[test]" -c lowest.txt

torch is left out: CI installs the CPU wheel torch==2.13.0 first in every environment. A dependency without a
floor is left to pip. Exits non-zero on a specifier it does not understand, so that CI never tests less than it says.
"""

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    dependencies = project["dependencies"] + project["optional-dependencies"]["eval"]
    result = {}
    for requirement in dependencies:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*", requirement)
        if not match:
            sys.exit(f"lowest_constraints.py: cannot pin {requirement!r} (only 'name' and 'name>=X' are handled)")
        name, floor = match.groups()
        if floor and name.lower() not in SKIP:
            result[name] = floor
    return result


if __name__ == "__main__":
    for name, floor in floors(Path(__file__).resolve().parent.parent / "pyproject.toml").items():
        print(f"{name}=={floor}")
