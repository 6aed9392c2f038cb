"""Run the README's quickstart command as a user would and keep its table with the wall time it took.

    python bench/run_quickstart.py            # `xkern demo`        -> bench/results/quickstart-quick.json
    python bench/run_quickstart.py --full     # `xkern demo --full` -> bench/results/quickstart-full.json

The command runs in a subprocess (its imports included in the time); the JSON is the demo's own
``results.json`` plus ``run``: the command, its wall seconds, the load average just before it and the
machine. ``python bench/docs_tables.py`` then rewrites the quickstart tables of the docs from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the long profile (xkern demo --full)")
    args = ap.parse_args(argv)
    xkern = shutil.which("xkern")
    if xkern is None:
        print("the xkern command is not installed (pip install --no-build-isolation -e .)", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="xkern-quickstart-"))
    cmd = ["xkern", "demo", *(["--full"] if args.full else []), "--out", str(out)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([xkern, *cmd[1:]], check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"{' '.join(cmd)} failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    result = json.loads((out / "results.json").read_text())
    result["run"] = {"command": " ".join(c for c in cmd if not c.startswith(str(out)) and c != "--out"),
                     "command_seconds": round(wall, 1), "load_before": round(load, 2),
                     "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                     "date": time.strftime("%Y-%m-%d")}
    dest = RESULTS / f"quickstart-{'full' if args.full else 'quick'}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    print(f"{wall:.1f} s wall; wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
