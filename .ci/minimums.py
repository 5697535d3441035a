"""Pin every runtime dependency of pyproject.toml at its floor, and check the pins took.

``python minimums.py pyproject.toml`` prints pip constraints (``name==floor``);
``make check-minimums`` installs with them, so the floors we declare are floors we
test: a floor the code has outgrown fails there. Every runtime dependency must
name a floor (``name>=X``); anything else is refused, so none slips through untested.
``python minimums.py --check pyproject.toml``, run by the interpreter of that
environment, prints what is installed and fails unless every floor is.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# name, optional extras, then the floor: ">=X", possibly with an upper bound after a comma.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*>=\s*([^,;\s]+)\s*(,[^;]*)?(;.*)?$")


def floors(pyproject: Path) -> list[str]:
    """``name==floor`` for each runtime dependency."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for requirement in dependencies:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"{pyproject}: dependency {requirement!r} has no floor (name>=version)")
        name, _extras, floor, _upper, marker = match.groups()
        pins.append(f"{name}=={floor}{marker or ''}")
    return pins


def _same(installed: str, floor: str) -> bool:
    # "3.14" and "3.14.0" are one version.
    def key(text: str) -> tuple[str, ...]:
        parts = text.split(".")
        while len(parts) > 1 and parts[-1] == "0":
            parts.pop()
        return tuple(parts)

    return key(installed) == key(floor)


def check(pyproject: Path) -> int:
    """Print each dependency's installed version; 1 if any is not its floor."""
    wrong = 0
    for pin in floors(pyproject):
        name, floor = pin.split(";")[0].split("==")
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "(not installed)"
        ok = _same(installed, floor)
        wrong += not ok
        print(f"{name}: floor {floor}, installed {installed}{'' if ok else '  <-- not the floor'}")
    return 1 if wrong else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--check"]:
        sys.exit(check(Path(args[1] if len(args) > 1 else "pyproject.toml")))
    print("\n".join(floors(Path(args[0] if args else "pyproject.toml"))))
