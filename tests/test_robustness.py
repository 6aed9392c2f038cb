"""What a careless user or a planted file cannot do: resume another run, share a run folder, lose a run to Ctrl-C,
read a lying data folder, or get a traceback from a file-system mistake."""

from __future__ import annotations

import gzip
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import xkern
from tests.helpers import memorizable_examples, tiny_model
from xkern.cli import main
from xkern.data.domain import DataFormatError, check_usable, load_processed, write_processed
from xkern.errors import InputError
from xkern.train import train_lora
from xkern.train.checkpoint import RunLock
from xkern.train.loop import TrainingInterrupted

LORA = ["train-lora", "--data", "synthetic", "--model", "tiny", "--max-steps", "2", "--lr", "1e-2",
        "--batch-size", "8", "--max-train-users", "16", "--max-val-users", "4", "--no-progress"]


# ---- runs: identity, lock, interruption -------------------------------------------------------------

def test_another_runs_checkpoint_is_refused_naming_what_differs(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main([*LORA, "--domain", "Tools", "--out", out]) == 0
    capsys.readouterr()
    # the same folder for another domain and learning rate: refused, nothing trained
    assert main([*LORA, "--domain", "Toys", "--lr", "5e-2", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run's checkpoint" in err[0] and "target" in err[0] and "--overwrite" in err[0]
    assert json.loads((Path(out) / "summary.json").read_text())["target"] == "Tools"
    assert main([*LORA, "--domain", "Toys", "--lr", "5e-2", "--out", out, "--overwrite"]) == 0
    assert json.loads((Path(out) / "summary.json").read_text())["target"] == "Toys"
    assert not (Path(out) / RunLock.NAME).exists()


def test_two_runs_cannot_write_one_folder(tmp_path):
    with RunLock(tmp_path):  # this process holds it, and is alive
        with pytest.raises(InputError, match=f"process {os.getpid()}"):
            RunLock(tmp_path).__enter__()
    (tmp_path / RunLock.NAME).write_text("999999999\n")  # a lock whose process is gone is taken over
    with RunLock(tmp_path):
        assert (tmp_path / RunLock.NAME).read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resumes_to_the_uninterrupted_result(tmp_path, sig):
    cfg = dict(batch_size=4, epochs=2, lr=5e-3, warmup_steps=1, progress=False)

    def model():
        xm = xkern.load_model(tiny_model("llama", seed=0, initializer_range=0.2), dtype=torch.float32,
                              progress=False)
        xm.add_adapter("a", r=8, lora_alpha=16, seed=1)
        return xm

    data = memorizable_examples(16)
    whole = model()
    full = train_lora(whole, "a", data, **cfg)

    def signal_at_step_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), sig)  # the handler only notes it: the step finishes, then fit stops

    handler_before = signal.getsignal(sig)  # SIG_IGN for SIGINT where a shell started us in the background
    with pytest.raises(TrainingInterrupted) as stop:
        train_lora(model(), "a", data, output_dir=tmp_path, callback=signal_at_step_3, **cfg)
    assert stop.value.step == 3 and stop.value.saved
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 3
    assert signal.getsignal(sig) == handler_before  # the caller's handler is back, whatever it was
    resumed = model()
    res = train_lora(resumed, "a", data, output_dir=tmp_path, **cfg)
    assert res.train_loss == pytest.approx(full.train_loss, rel=1e-5)
    for p, q in zip(resumed.adapter_parameters("a"), whole.adapter_parameters("a"), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_command_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import xkern.recipes as recipes

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted(7, saved=True)

    monkeypatch.setattr(recipes, "train_lora_on_domains", interrupted)
    argv = [*LORA, "--domain", "Tools", "--out", str(tmp_path / "run")]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "interrupted after step 7" in err and "resume with: xkern train-lora" in err and str(tmp_path) in err


def test_a_symlinked_checkpoint_is_refused_before_training(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint").symlink_to(tmp_path / "elsewhere")
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("a", r=4, seed=1)
    with pytest.raises(InputError, match="symbolic link"):
        train_lora(xm, "a", memorizable_examples(8), output_dir=tmp_path / "run", max_steps=1, progress=False)


# ---- the command line: file-system mistakes are one line --------------------------------------------

def test_an_out_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main([*LORA, "--domain", "Tools", "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    assert main(["eval", "--data", "synthetic", "--domain", "Tools", "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err


# ---- data that cannot lie -------------------------------------------------------------------------

def _folder(tmp_path: Path, **edits) -> Path:
    from tests.helpers import titled_domain

    root = tmp_path / "root"
    d = titled_domain("Tools")
    write_processed(root / "Tools", {**d.train, **d.val}, d.test, d.titles)
    for name, value in edits.items():
        (root / "Tools" / name).write_text(json.dumps(value))
    return root


def test_non_contiguous_item_indices_and_other_lies_are_refused(tmp_path):
    root = _folder(tmp_path)
    smap = json.loads((root / "Tools" / "smap.json").read_text())
    (root / "Tools" / "smap.json").write_text(json.dumps({k: 3 * v for k, v in smap.items()}))
    with pytest.raises(DataFormatError, match="each once .index 1 is missing"):
        load_processed(root, "Tools")
    root = _folder(tmp_path / "b", **{"meta_data.json": ["a", "list"]})
    with pytest.raises(DataFormatError, match="expected an object of item id -> title, got a list"):
        load_processed(root, "Tools")
    (root / "Tools" / "meta_data.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataFormatError, match="nested too deeply"):
        load_processed(root, "Tools")
    for bad in ("../Tools", "/etc", ".."):
        with pytest.raises(InputError, match="name of a folder inside the data root"):
            load_processed(root, bad)


def test_a_domain_the_command_cannot_use_is_refused_before_training(tmp_path):
    from tests.helpers import titled_domain

    d = titled_domain("Tools", n_items=10)
    with pytest.raises(InputError, match="has 10 items; ranking needs 30"):
        check_usable(d, candidates=30)
    untitled = titled_domain("Tools")
    untitled.titles = [""] * untitled.n_items
    with pytest.raises(InputError, match="no item has a title"):
        check_usable(untitled, titles=True)
    empty = titled_domain("Tools")
    empty.train = {}
    with pytest.raises(InputError, match="no training users"):
        check_usable(empty)


def test_a_truncated_gzip_release_is_one_error(tmp_path):
    from xkern.data.amazon import iter_records

    path = tmp_path / "reviews.json.gz"
    with gzip.open(path, "wt") as f:
        for i in range(2000):
            f.write(json.dumps({"reviewerID": f"u{i}", "asin": f"i{i}", "unixReviewTime": i}) + "\n")
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataFormatError, match="ends early or is damaged"):
        list(iter_records(path))


# ---- the demo's worker process: stopped with its parent -------------------------------------------------

def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from /proc (Linux)")
@pytest.mark.parametrize("how", ["term", "kill"])
def test_a_stopped_demo_leaves_no_worker_and_no_temporary_folder(tmp_path, how):
    """SIGTERM unwinds the demo (exit 130, worker stopped, hand-off folder removed); after SIGKILL of the
    parent, the worker notices and exits instead of living on under init holding the caller's pipes."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "xkern.cli", "demo", "--threads", "2", "--no-progress",
                             "--out", str(tmp_path / "out")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while time.monotonic() < deadline and not (workers and list(tmp_path.glob("xkern-demo-*"))):
        time.sleep(0.2)
        workers = _children(proc.pid)
        assert proc.poll() is None, proc.stderr.read()
    assert workers, "the demo did not start its worker process within 60 s"
    proc.send_signal(signal.SIGTERM if how == "term" else signal.SIGKILL)
    rc = proc.wait(timeout=60)
    gone = time.monotonic() + 15
    while time.monotonic() < gone and any(_alive(w) for w in workers):
        time.sleep(0.2)
    leftover = [w for w in workers if _alive(w)]
    for w in leftover:
        os.kill(w, signal.SIGKILL)
    assert not leftover, f"worker processes {leftover} outlived the demo"
    if how == "term":
        assert rc == 130, proc.stderr.read()
        assert "terminated" in proc.stderr.read()
        assert not list(tmp_path.glob("xkern-demo-*"))
    else:
        assert rc == -signal.SIGKILL
