"""The cases of bench/bad_input.py, re-run in-process: each gives the message and exit code recorded in
bench/results/bad-input.json (the table in docs/errors.md), so neither the code nor the doc can drift."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script
from xkern.cli import main

BENCH = load_script("bench/bad_input.py")
RECORDED = {c["id"]: c for c in json.loads(BENCH.OUT.read_text())["cases"]}


class _Head:
    """A pipe read by ``head -1``: the first line goes through, the next write finds the reader gone."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        if "\n" in self.text:
            raise BrokenPipeError(32, "Broken pipe")
        self.text += text
        return len(text)

    def flush(self) -> None:
        if self.text.count("\n") > 1:
            raise BrokenPipeError(32, "Broken pipe")

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("no file descriptor")

    encoding = "utf-8"


def _run(case: dict, monkeypatch, capsys) -> tuple[int, str, str]:
    if case.get("python") == BENCH.SCALE:
        with pytest.raises(Exception) as err:
            exec(case["python"], {})
        return 1, "", f"{type(err.value).__module__}.{type(err.value).__name__}: {err.value}"
    if case.get("python") == BENCH.WHEEL:
        import xkern.data.domain as domain

        monkeypatch.setattr(domain, "REPO_ROOT", Path("/site-packages-like"))
    head = _Head() if case.get("pipe_lines") else None
    if head is not None:
        monkeypatch.setattr(sys, "stdout", head)
    try:
        code = main(list(case["argv"]))
    except SystemExit as e:  # argparse: usage errors and --version
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, head.text if head is not None else out, err


@pytest.mark.parametrize("case", BENCH.CASES, ids=[c["id"] for c in BENCH.CASES])
def test_each_mistake_gives_the_recorded_message_and_exit_code(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XKERN_DATA", raising=False)
    monkeypatch.delenv("XKERN_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    BENCH._setup(case, tmp_path)
    before = BENCH._files(tmp_path)
    code, out, err = _run(case, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    message = lines[-1] if lines else (out.splitlines()[0] if out.strip() else "")
    recorded = RECORDED[case["id"]]
    assert (code, message) == (recorded["exit_code"], recorded["after"])
    assert "Traceback" not in err
    left = sorted(BENCH._files(tmp_path) - before)
    assert left == recorded["files_left"]
    if code == 2 and not case.get("python"):
        assert message.startswith("xkern ") and ": error: " in message


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        main(["data", "stats", "--data", "./nonexistent", "--debug"])


def test_under_torchrun_the_error_names_the_rank(monkeypatch, capsys):
    """A rank that stops on bad input says which process of the job it is (torchrun starts all with the same argv)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["data", "stats", "--data", "./nonexistent"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("xkern data stats (rank 1 of 2): error:") and "nonexistent" in err
