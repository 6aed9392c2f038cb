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

TINY_LORA = ["--data", "synthetic", "--domain", "Tools", "--model", "tiny", "--max-steps", "1"]

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
    # the file-system and data mistakes of the robustness review
    dict(id="out-is-a-file", setup="file-out", argv=["train-lora", *TINY_LORA, "--out", "taken"],
         before="a traceback with exit 1 after the model had loaded"),
    dict(id="rank-zero", argv=["train-lora", *TINY_LORA, "--r", "0"], before="ZeroDivisionError traceback, exit 1"),
    dict(id="rank-negative", argv=["train-lora", *TINY_LORA, "--r", "-2"], before="a traceback, exit 1"),
    dict(id="meta-is-a-list", setup="meta-list", argv=["eval", "--data", "root", "--domain", "Tools"],
         before="AttributeError traceback ('list' object has no attribute 'get'), exit 1"),
    dict(id="deeply-nested-json", setup="deep-json", argv=["eval", "--data", "root", "--domain", "Tools"],
         before="RecursionError traceback, exit 1"),
    dict(id="phantom-items", setup="smap-gaps", argv=["eval", "--data", "root", "--domain", "Tools"],
         before="loaded silently: 66% of candidates were items without an id or a title"),
    dict(id="domain-outside-root", setup="meta-list", argv=["eval", "--data", "root", "--domain", "../root/Tools"],
         before="read outside the data root (and wrote outside runs/eval)"),
    dict(id="truncated-gzip", setup="torn-gz",
         argv=["data", "convert", "--release", "2018", "--reviews", "reviews.json.gz", "--out", "out"],
         before="EOFError traceback, exit 1"),
    dict(id="too-few-items", setup="few-items",
         argv=["train-lora", "--data", "root", "--domain", "Tools", "--model", "tiny", "--eval-users", "5",
               "--max-steps", "1"],
         before="trained first, then refused (\"need 29 negatives\"), leaving an adapter and no summary"),
    dict(id="no-titles", setup="no-meta",
         argv=["train-lora", "--data", "root", "--domain", "Tools", "--model", "tiny", "--max-steps", "1"],
         before="trained and reported HR@10 0.0 for base and LoRA, with no warning that no item had a title"),
    dict(id="symlinked-checkpoint", setup="symlinked-checkpoint", argv=["train-lora", *TINY_LORA, "--out", "run"],
         before="\"Cannot call rmtree on a symbolic link\" after training: the results were lost"),
    dict(id="plot-results-string", setup="results-string", argv=["plot", "bad.json", "--out", "plots"],
         before="a traceback, exit 1"),
    dict(id="empty-domain", setup="empty-domain",
         argv=["train-lora", "--data", "root", "--domain", "Tools", "--model", "tiny", "--max-steps", "1"],
         before="IndexError traceback (train/tiny.py), exit 1"),
]


def _domain_folder(cwd: Path, n_items: int = 40, meta: object = "titles") -> Path:
    """A small processed domain folder ``root/Tools`` (by-user split, titled items unless told otherwise)."""
    folder = cwd / "root" / "Tools"
    folder.mkdir(parents=True)
    seqs = {str(u): [(u * 7 + k * 3) % n_items for k in range(5)] for u in range(40)}

    def dump(name: str, obj: object) -> None:
        (folder / name).write_text(json.dumps(obj))

    dump("train.json", {u: s for u, s in seqs.items() if int(u) < 30})
    dump("test.json", {u: s for u, s in seqs.items() if int(u) >= 30})
    dump("smap.json", {f"item{i}": i for i in range(n_items)})
    dump("umap.json", {f"user{u}": int(u) for u in seqs})
    if meta == "titles":
        dump("meta_data.json", {f"item{i}": f"red drill kit {i}" for i in range(n_items)})
    elif meta is not None:
        dump("meta_data.json", meta)
    return folder


def _setup(case: dict, cwd: Path) -> None:
    kind = case.get("setup")
    if kind == "notmodel":
        (cwd / "notmodel").mkdir()
        (cwd / "notmodel" / "readme.txt").write_text("not a model\n")
    elif kind == "file-out":
        (cwd / "taken").write_text("")
    elif kind == "meta-list":
        _domain_folder(cwd, meta=["a", "list"])
    elif kind == "deep-json":
        (_domain_folder(cwd) / "meta_data.json").write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "smap-gaps":
        folder = _domain_folder(cwd)
        (folder / "smap.json").write_text(json.dumps({f"item{i}": 3 * i for i in range(40)}))
    elif kind == "torn-gz":
        import gzip

        with gzip.open(cwd / "reviews.json.gz", "wt") as f:
            for i in range(3000):
                f.write(json.dumps({"reviewerID": f"u{i % 300}", "asin": f"i{i % 97}", "unixReviewTime": i}) + "\n")
        data = (cwd / "reviews.json.gz").read_bytes()
        (cwd / "reviews.json.gz").write_bytes(data[:-300])
    elif kind == "few-items":
        _domain_folder(cwd, n_items=10)
    elif kind == "no-meta":
        _domain_folder(cwd, meta=None)
    elif kind == "symlinked-checkpoint":
        (cwd / "elsewhere").mkdir()
        (cwd / "run").mkdir()
        (cwd / "run" / "checkpoint").symlink_to(cwd / "elsewhere")
    elif kind == "results-string":
        (cwd / "bad.json").write_text(json.dumps({"kind": "xkern-eval", "results": "not a list"}))
    elif kind == "empty-domain":
        folder = _domain_folder(cwd)
        for name in ("train.json", "test.json"):
            (folder / name).write_text("{}")


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
