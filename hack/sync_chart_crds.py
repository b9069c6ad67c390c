"""Copies the CRDs from crds/ into the Helm chart's crds/ folder, byte for byte.

Helm installs every file under a chart's crds/ before the templates. The chart's
top-level crds/*.yaml must equal the repository's crds/*.yaml exactly; the chart's
crds/kopf/ folder (Kopf's peering CRDs) belongs to the chart and is left alone.

    python hack/sync_chart_crds.py            # copy (and remove chart CRDs gone from crds/)
    python hack/sync_chart_crds.py --check    # exit 1, naming each file, if they differ
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "crds"
CHART_CRDS = ROOT / "charts" / "gpucloud" / "crds"


def drift(source: Path = SOURCE, target: Path = CHART_CRDS) -> list[str]:
    """What differs, one line per file; empty when the chart is in sync."""
    src = {p.name: p.read_bytes() for p in sorted(source.glob("*.yaml"))}
    dst = {p.name: p.read_bytes() for p in sorted(target.glob("*.yaml"))}
    out = [f"missing in chart: {n}" for n in sorted(src.keys() - dst.keys())]
    out += [f"not in crds/: {n}" for n in sorted(dst.keys() - src.keys())]
    out += [f"differs: {n}" for n in sorted(src.keys() & dst.keys()) if src[n] != dst[n]]
    return out


def sync(source: Path = SOURCE, target: Path = CHART_CRDS) -> list[str]:
    """Make target's top-level *.yaml equal source's; returns what changed."""
    changes = drift(source, target)
    target.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in source.glob("*.yaml")}
    for stale in target.glob("*.yaml"):
        if stale.name not in names:
            stale.unlink()
    for name in sorted(names):
        shutil.copyfile(source / name, target / name)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, change nothing")
    args = parser.parse_args(argv)
    if not SOURCE.is_dir() or not any(SOURCE.glob("*.yaml")):
        print(f"sync_chart_crds: no CRDs in {SOURCE}", file=sys.stderr)
        return 2
    if args.check:
        problems = drift()
        for line in problems:
            print(f"charts/gpucloud/crds: {line} (run: python hack/sync_chart_crds.py)")
        return 1 if problems else 0
    for line in sync():
        print(f"synced: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
