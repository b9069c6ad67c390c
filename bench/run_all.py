"""`make bench`: runs every benchmark script in bench/ and prints its figure lines.

Each script prints one `name: value unit` line per figure; this runner passes them
through and fails if a script fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("*_bench.py")):
        print(f"# {script.name}", flush=True)
        proc = subprocess.run([sys.executable, str(script), *sys.argv[1:]], check=False)
        if proc.returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"# failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
