"""The images' requirement files, from pyproject.toml's extras.

    image_requirements.py --key        a hash of every extra's dependencies
    image_requirements.py --out DIR    DIR/requirements-<extra>.txt and DIR/all.txt
    image_requirements.py --pin DIR    pin each line to the wheel found in DIR

An extra naming another (``gpucloud[ledger]``) is expanded, so each file installs
without the project itself; the project wheel is installed after, with ``--no-deps``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("operator", "api", "gateway", "agent")
_SELF = re.compile(r"^gpucloud\[([a-z,]+)\]$")


def _expand(project: dict, extra: str) -> list[str]:
    extras = project["optional-dependencies"]
    out = list(project["dependencies"])
    for line in extras[extra]:
        m = _SELF.match(line.replace(" ", ""))
        if m:
            for inner in m.group(1).split(","):
                out += [r for r in _expand(project, inner) if r not in out]
        elif line not in out:
            out.append(line)
    return out


def requirements() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {extra: _expand(project, extra) for extra in EXTRAS}


def _name(line: str) -> str:
    return re.split(r"[\s<>=!~\[;]", line, maxsplit=1)[0].lower().replace("_", "-")


def pin(folder: Path) -> None:
    """Replace each requirement by name==version of its wheel in ``folder``."""
    versions = {}
    for whl in folder.glob("*-*.whl"):
        name, version = whl.name.split("-")[:2]
        versions[name.lower().replace("_", "-")] = version
    for req in folder.glob("requirements-*.txt"):
        lines = []
        for line in req.read_text().splitlines():
            name = _name(line)
            extras = re.search(r"\[[^\]]+\]", line.split(";")[0])
            if name not in versions:
                sys.exit(f"{req.name}: no wheel for {name}")
            lines.append(f"{name}{extras.group(0) if extras else ''}=={versions[name]}")
        req.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--key", action="store_true")
    g.add_argument("--out", type=Path)
    g.add_argument("--pin", type=Path)
    args = p.parse_args()
    reqs = requirements()
    if args.key:
        blob = "\n".join(f"{e}: {' '.join(r)}" for e, r in sorted(reqs.items()))
        print(hashlib.sha256(f"{sys.version_info[:2]}\n{blob}".encode()).hexdigest()[:12])
    elif args.out:
        every: list[str] = []
        for extra, lines in reqs.items():
            (args.out / f"requirements-{extra}.txt").write_text("\n".join(lines) + "\n")
            every += [r for r in lines if r not in every]
        (args.out / "all.txt").write_text("\n".join(every) + "\n")
    else:
        pin(args.pin)


if __name__ == "__main__":
    main()
