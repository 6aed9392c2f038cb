"""train_lora beyond one process (gloo, 2 processes under torchrun): FSDP trains what one process trains,
checkpoints resume under another world size when the examples per step agree (and are refused, saying
how, when they do not), and a rank killed mid-run ends the job without costing the last whole checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from xkern.adapters import load_adapter
from xkern.train.trainer import resumable_checkpoint

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
import xkern
from tests.helpers import memorizable_examples, tiny_model
from xkern.train import train_lora

bs, out, parallel, stop_after, kill = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
xm = xkern.load_model(tiny_model("llama", seed=0, initializer_range=0.2), dtype=torch.float32, progress=False)
xm.add_adapter("a", r=8, lora_alpha=16, seed=1)
rank = int(os.environ.get("RANK", "0"))

def callback(step, loss):
    if kill != "-" and rank == int(kill.split(":")[0]) and step == int(kill.split(":")[1]):
        os.kill(os.getpid(), signal.SIGKILL)

res = train_lora(xm, "a", memorizable_examples(16), batch_size=bs, max_steps=4, lr=1e-2, output_dir=out,
                 progress=False, parallel=parallel, save_every=1, callback=callback,
                 stop_after=None if stop_after == "-" else int(stop_after))
if rank == 0:
    print("LOSSES", res.train_loss)
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(script: Path, procs: int, *args: str, port: int = 29561, ok: bool = True) -> subprocess.CompletedProcess:
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(procs), "--master_port", str(port)]
    proc = subprocess.run([*launch, str(script), *args], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=script.parent)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[float]:
    return [e["loss"] for e in json.loads((out / "train_log.json").read_text())["train_loss"]]


def _assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_adapter(a / "adapter"), load_adapter(b / "adapter")
    assert x.modules.keys() == y.modules.keys()
    for m in x.modules:  # tolerance as in the DDP test: Adam on near-zero gradients, another summation order
        torch.testing.assert_close(x.modules[m].A, y.modules[m].A, atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(x.modules[m].B, y.modules[m].B, atol=5e-5, rtol=1e-4)


def test_fsdp_and_resume_under_another_world_size(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(REPO)))
    one, fsdp, cut = tmp_path / "one", tmp_path / "fsdp", tmp_path / "cut"
    _run(script, 1, "8", str(one), "ddp", "-", "-")
    _run(script, 2, "4", str(fsdp), "fsdp", "-", "-")
    log = json.loads((fsdp / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["config"]["parallel"] == "fsdp" and log["finished"]
    torch.testing.assert_close(torch.tensor(_losses(fsdp)), torch.tensor(_losses(one)), atol=1e-5, rtol=1e-4)
    _assert_same_adapter(fsdp, one)

    # 2 FSDP processes stop after 2 of 4 steps; the checkpoint (gathered from the shards) resumes in 1 process
    _run(script, 2, "4", str(cut), "fsdp", "2", "-")
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["world_size"], state["examples_per_step"]) == (2, 2, 8)
    refused = _run(script, 1, "4", str(cut), "ddp", "-", "-", ok=False)  # 4 examples per step, not 8
    assert refused.returncode != 0
    assert "8 examples per optimizer step" in refused.stderr and "batch_size=8" in refused.stderr
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 2  # the refusal wrote nothing
    _run(script, 1, "8", str(cut), "ddp", "-", "-")
    torch.testing.assert_close(torch.tensor(_losses(cut)), torch.tensor(_losses(one)), atol=1e-5, rtol=1e-4)
    _assert_same_adapter(cut, one)


def test_a_killed_rank_ends_the_job_and_leaves_a_whole_checkpoint(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(REPO)))
    one, run = tmp_path / "one", tmp_path / "run"
    _run(script, 1, "8", str(one), "ddp", "-", "-")
    killed = _run(script, 2, "4", str(run), "ddp", "-", "1:3", port=29563, ok=False)  # rank 1 dies after step 3
    assert killed.returncode != 0
    assert "rank: 1" in killed.stderr and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert not (run / "adapter").exists() and not (run / "train_log.json").exists()  # nothing of an unfinished run
    found = resumable_checkpoint(run / "checkpoint")
    assert found is not None
    step = json.loads((found / "state.json").read_text())["step"]
    assert 2 <= step <= 3  # rank 0 may or may not have written step 3 before it was stopped
    _run(script, 1, "8", str(run), "ddp", "-", "-")  # and it resumes, here in one process, to the same result
    _assert_same_adapter(run, one)
    torch.testing.assert_close(torch.tensor(_losses(run)), torch.tensor(_losses(one)), atol=1e-5, rtol=1e-4)


def test_a_command_that_succeeds_destroys_its_process_group(monkeypatch, capsys):
    """Left to interpreter exit, gloo's worker threads can abort a run that succeeded (SIGABRT, "terminate called
    without an active exception"); the command line destroys the group once its command returns."""
    import socket

    import torch.distributed as dist

    from xkern import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert cli.main(["env"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "torch" in capsys.readouterr().out


def test_a_process_group_xkern_starts_is_destroyed_at_exit(monkeypatch):
    """A script that trains under torchrun through the library (not the command line) exits with its group
    destroyed: dist_setup registers the teardown when it starts the group, and only then."""
    import atexit

    import torch.distributed as dist

    from xkern import distributed

    started, registered = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: started.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.dist_setup() == (0, 1) and registered == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.dist_setup() == (0, 2) and distributed.dist_setup() == (0, 2)
    assert started == ["gloo"] and registered == [distributed.dist_teardown]
