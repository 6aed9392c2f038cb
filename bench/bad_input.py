"""What a user gets for each mistake of the bad-input list (docs/errors.md), measured: every case runs as its
own process in an empty folder, and the exit code, the message, a traceback if any, the seconds and what was left on
disk are recorded in ``bench/results/bad-input.json`` (``docs/errors.md`` shows it; ``tests/test_bad_input.py``
re-runs the cases in-process and fails when a message or exit code drifts from the JSON).

    python bench/bad_input.py            # writes bench/results/bad-input.json

``before`` is what the issue reported for the code before this work (not re-measured here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "bad-input.json"

# a package outside a source checkout: what a wheel install sees (no ../shared next to site-packages)
WHEEL = ("import sys, pathlib, xkern.data.domain as d; d.REPO_ROOT = pathlib.Path('/site-packages-like'); "
         "from xkern.cli import main; sys.exit(main(sys.argv[1:]))")
CLI = "import sys; from xkern.cli import main; sys.exit(main(sys.argv[1:]))"
SCALE = ("import torch, xkern; from xkern.ops import lora_linear; "
         "w = xkern.quantize_nf4(torch.randn(8, 64)); "
         "lora_linear(torch.randn(2, 64), w, torch.zeros(1, 4, 64), torch.zeros(1, 8, 4), '2', "
         "torch.zeros(2, dtype=torch.long))")

CASES: list[dict] = [
    dict(id="model-typo", argv=["train-lora", "--model", "smollm3", "--domain", "Tools", "--data", "synthetic"],
         before="48 s of network retries to a model hub, then an 85-line traceback (OSError: We couldn't connect ...)"),
    dict(id="model-missing-path",
         argv=["train-lora", "--model", "./nonexistent", "--domain", "Tools", "--data", "synthetic"],
         before="78-line traceback (Repo id must be in the form 'repo_name' ...)"),
    dict(id="model-not-a-model", setup="notmodel",
         argv=["train-lora", "--model", "./notmodel", "--domain", "Tools", "--data", "synthetic"],
         before="misleading: \"You need to have sentencepiece or tiktoken installed\""),
    dict(id="eval-into-head", pipe_lines=1,
         argv=["eval", "--domain", "Tools", "--data", "synthetic", "--max-users", "50", "--out", "eval.json",
               "--no-progress"],
         before="BrokenPipeError traceback, exit 1, and the JSON report not written"),
    dict(id="demo-bad-flag", argv=["demo", "--bogus-flag"], before="the top-level usage, not demo's"),
    dict(id="version", argv=["--version"], before="\"the following arguments are required: COMMAND\""),
    dict(id="scale-string", python=SCALE, argv=[], before="accepted silently"),
    dict(id="extra-and-no-models", argv=["demo", "--extra", "foo", "--no-models"], before="accepted silently"),
    dict(id="demo-unknown-extra", argv=["demo", "--extra", "foo"],
         before="(not in the issue's list) the table's header printed first, then the error"),
    dict(id="fractions-zero", argv=["demo", "--fractions", "0"],
         before="the error came only after a progress bar had started"),
    dict(id="data-stats-missing-folder", argv=["data", "stats", "--data", "./nonexistent"],
         before="a different error style and exit code (1) from the other commands (2)"),
    dict(id="wheel-install-data-root", python=WHEEL, argv=["eval", "--domain", "Tools"],
         before="default data root <venv>/lib/python3.11/shared/data/amazon-xcross"),
    dict(id="xcross-missing-adapter", setup="notmodel",
         argv=["train-xcross", "--model", "minilm", "--adapter", "toys=./no-adapter", "--target", "Tools",
               "--data", "synthetic"],
         before="(not in the issue's list)"),
    dict(id="data-unknown-domain", argv=["eval", "--domain", "Tool", "--data", "synthetic"],
         before="(not in the issue's list)"),
]


def _setup(case: dict, cwd: Path) -> None:
    if case.get("setup") == "notmodel":
        (cwd / "notmodel").mkdir()
        (cwd / "notmodel" / "readme.txt").write_text("not a model\n")


def _files(cwd: Path) -> set[str]:
    return {str(p.relative_to(cwd)) for p in cwd.rglob("*")}


def command(case: dict) -> str:
    if case.get("python") == SCALE:
        return "python: lora_linear(..., scale='2')"
    where = "  (installed as a wheel, XKERN_DATA unset)" if case.get("python") == WHEEL else ""
    return "xkern " + " ".join(case["argv"]) + where


def run_case(case: dict) -> dict:
    """Run one case as a process in an empty folder; what it printed, its exit code and what it left."""
    env = {k: v for k, v in os.environ.items() if k not in ("XKERN_DATA", "XKERN_DEBUG")}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        _setup(case, cwd)
        before = _files(cwd)
        cmd = [sys.executable, "-c", case.get("python", CLI), *case["argv"]]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if case.get("pipe_lines"):  # `| head -N`: read N lines, then close the pipe as head does
            stdout = "".join(proc.stdout.readline() for _ in range(case["pipe_lines"]))
            proc.stdout.close()
            stderr = proc.stderr.read()
            code = proc.wait()
        else:
            stdout, stderr = proc.communicate()
            code = proc.returncode
        seconds = time.perf_counter() - start
        left = sorted(_files(cwd) - before)
    err_lines = [line for line in stderr.splitlines() if line.strip()]
    message = err_lines[-1] if err_lines else (stdout.splitlines()[0] if stdout.strip() else "")
    return {
        "id": case["id"],
        "command": command(case),
        "before": case["before"],
        "after": message,
        "exit_code": code,
        "stderr_lines": len(err_lines),
        "traceback": "Traceback (most recent call last)" in stderr,
        "seconds": round(seconds, 1),
        "files_left": left,
    }


def main() -> int:
    from tqdm import tqdm

    records = [run_case(c) for c in tqdm(CASES, desc="cases")]
    load = os.getloadavg()[0]
    OUT.write_text(json.dumps({"machine": "2-core CPU VM", "load_average_at_end": round(load, 2),
                               "cases": records}, indent=2) + "\n")
    for r in records:
        print(f"{r['id']:<28} exit {r['exit_code']:>3}  {r['seconds']:>5.1f} s  {r['after'][:100]}")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
