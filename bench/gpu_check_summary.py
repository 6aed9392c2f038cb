"""The summary of ``bench/gpu_check.sh``, rewritten after every step so a run cut short still reports.

Reads the steps recorded so far (``name<TAB>rc<TAB>seconds<TAB>log``) and the tests' outcomes written as
each test ended (JSON lines from tests/conftest.py's ``XKERN_TEST_LOG``), writes ``gpu-check-summary.json``
atomically. Standard library only: it must run even where the build step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# as in gpu_check.sh: they sum to the budget minus 60 s
STEP_LIMITS = {"env": 20, "wheels": 40, "build": 110, "bench_lora_linear": 55, "bench_runtime": 40,
               "bench_xcross": 40, "bench_serve": 40, "pytest_gpu": 75}
OPTIONAL = {"quality_gpu"}  # runs in what is left of the budget; a timeout there is expected, not a failure


def read_steps(path: Path) -> list[dict]:
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, secs, log = line.split("\t", 3)
        tail = Path(log).read_text(errors="replace")[-3000:] if Path(log).is_file() else log
        steps.append({"step": name, "rc": None if rc == "skipped" else int(rc), "skipped": rc == "skipped",
                      "seconds": int(secs), "limit_s": STEP_LIMITS.get(name), "log_tail": tail})
    return steps


def read_tests(path: Path) -> list[dict]:
    """One record per test, the last outcome written for it (setup errors and skips included)."""
    tests: dict[str, dict] = {}
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a killed run
            continue
        if isinstance(rec, dict) and "test" in rec:
            tests[rec["test"]] = rec
    return list(tests.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=Path, required=True)
    ap.add_argument("--tests", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", default="0")
    ap.add_argument("--start", type=int, required=True)
    ap.add_argument("--budget", type=int, required=True)
    args = ap.parse_args(argv)
    steps, tests = read_steps(args.steps), read_tests(args.tests)
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    doc = {"kind": "xkern-gpu-check", "dry_run": args.dry_run == "1", "budget_s": args.budget,
           "step_limits_s": STEP_LIMITS, "wall_s": int(time.time() - args.start), "steps": steps,
           "pytest_gpu_counts": counts, "pytest_gpu": tests,
           "ok": all(s["rc"] == 0 for s in steps if not s["skipped"] and s["step"] not in OPTIONAL)
           and not counts.get("failed")
           and not counts.get("error")}
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"[gpu_check] summary {args.out}: {len(steps)} steps, tests {counts}, ok={doc['ok']}, {doc['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
