"""``xkern recommend``: JSONL in, JSONL out in input order; a bad line is answered with its error, the rest go on."""

from __future__ import annotations

import io
import json
import sys

import pytest

import xkern
from xkern.cli import main


@pytest.fixture(scope="module")
def rec(lora_run):
    return xkern.load_recommender(lora_run)


LINES = [
    json.dumps({"history": ["SYN-Tools-00003", "SYN-Tools-00007"], "candidates": [1, 2, "SYN-Tools-00009"]}),
    "",  # blank lines are skipped
    json.dumps({"history": [3, 7], "k": 3}),
    "{broken",
    json.dumps({"history": ["no such item"], "candidates": [1]}),
    json.dumps([1, 2]),
    json.dumps({"history": [1], "candidates": [2, 3], "colour": "red"}),
    json.dumps({"history": [], "k": 2}),
    json.dumps({"history": [4, 5, 6], "candidates": [10, 11], "k": 1}),
]


def test_every_line_answered_in_order_bad_ones_with_their_error(lora_run, rec, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(LINES) + "\n")
    assert main(["recommend", lora_run, "--input", str(src), "--out", str(out), "--batch-size", "2",
                 "--no-progress"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 4, 5, 6, 7, 8, 9]
    first = rec.rank([3, 7], [1, 2, 9]).to_dict()["items"]  # alone, where the file scored it with another user
    assert [x["item"] for x in rows[0]["items"]] == [x["item"] for x in first]
    assert [x["score"] for x in rows[0]["items"]] == pytest.approx([x["score"] for x in first], abs=1e-4)
    assert len(rows[1]["items"]) == 3 and rows[1]["retriever"] == "popularity"
    assert "malformed JSON" in rows[2]["error"]
    assert "not in the Tools catalogue" in rows[3]["error"] and "'no such item'" in rows[3]["error"]
    assert "JSON object" in rows[4]["error"]
    assert "unknown field(s) ['colour']" in rows[5]["error"]
    assert rows[6]["fallback"] is True and len(rows[6]["items"]) == 2
    assert len(rows[7]["items"]) == 1
    assert rows[7]["items"][0]["item"] == rec.rank([4, 5, 6], [10, 11]).to_dict()["items"][0]["item"]
    assert capsys.readouterr().err == ""


def test_stdin_to_stdout_with_progress_on_stderr(lora_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"history": [1, 2]}\n\xff\xfe\n')))
    assert main(["recommend", lora_run, "--k", "4"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(x) for x in captured.out.splitlines()]
    assert len(rows) == 2 and len(rows[0]["items"]) == 4 and "not UTF-8" in rows[1]["error"]
    assert "1 user(s) answered, 1 line(s) with an error" in captured.err


def test_a_folder_that_is_not_a_run_is_one_line_before_anything_loads(tmp_path, capsys):
    assert main(["recommend", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xkern recommend: error:") and "run.json not found" in err[0]
    assert main(["recommend", str(tmp_path), "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl not found" in capsys.readouterr().err


def test_serve_flags_are_checked_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--max-queue", "0"])
    assert e.value.code == 2 and "--max-queue" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--timeout-s", "0"]) == 2
    assert "--timeout-s" in capsys.readouterr().err
