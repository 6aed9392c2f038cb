"""A training process killed (SIGKILL) in the middle of a checkpoint write leaves a checkpoint that
resumes to exactly the result of an uninterrupted run.

The child process trains with a checkpoint after every step and kills itself at one chosen instant
of its third checkpoint write: half-way through the adapter weights, half-way through the optimizer
file, between stepping the old checkpoint aside and moving the new one in, or while removing the old
one. The parent then resumes from whatever is on disk and compares with a run that was never killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xkern
from tests.helpers import PicklePayload, memorizable_examples, tiny_model
from xkern.errors import FormatError
from xkern.train import train_lora
from xkern.train.trainer import resumable_checkpoint

REPO = Path(__file__).resolve().parents[2]
CFG = dict(batch_size=4, grad_accum=1, epochs=2, lr=5e-3, warmup_steps=1, save_every=1, progress=False)
KILL_AT_SAVE = 3  # the third checkpoint write (steps 1 and 2 are whole on disk by then)

CHILD = r"""
import os, pathlib, shutil, signal, sys
sys.path.insert(0, {tests!r})
import torch
import safetensors.torch as st
from tests.helpers import memorizable_examples, tiny_model
import xkern
from xkern.errors import FormatError
from xkern.train import train_lora

POINT, OUT, KILL_AT = {point!r}, pathlib.Path({out!r}), {kill_at}
saves = {{"n": 0}}

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def in_kill_save():
    return saves["n"] == KILL_AT

real_save_file, real_torch_save = st.save_file, torch.save
real_rename, real_rmtree = pathlib.Path.rename, shutil.rmtree

def save_file(tensors, filename, metadata=None):
    if "checkpoint.tmp" in str(filename) and "adapter" in str(filename):
        saves["n"] += 1
        if in_kill_save() and POINT == "adapter-weights":
            real_save_file(tensors, filename, metadata=metadata)
            data = pathlib.Path(filename).read_bytes()
            pathlib.Path(filename).write_bytes(data[: len(data) // 2])  # a torn file, then death
            die()
    out = real_save_file(tensors, filename, metadata=metadata)
    if "checkpoint.tmp" in str(filename) and "optimizer" in str(filename) and in_kill_save() \
            and POINT == "optimizer":
        data = pathlib.Path(filename).read_bytes()
        pathlib.Path(filename).write_bytes(data[: len(data) // 2])  # the optimizer state torn, then death
        die()
    return out

def torch_save(obj, f, *a, **k):  # nothing of a checkpoint is pickled any more: a torch.save is a regression
    raise AssertionError(f"torch.save({{f}}) during training")

def rename(self, target):
    out = real_rename(self, target)
    if in_kill_save() and POINT == "between-renames" and str(target).endswith("checkpoint.old"):
        die()
    return out

def rmtree(path, *a, **k):
    if in_kill_save() and POINT == "cleanup" and str(path).endswith("checkpoint.old"):
        victims = sorted(pathlib.Path(path).rglob("*"))
        for v in victims[: len(victims) // 2]:  # part of the old checkpoint is gone
            if v.is_file():
                v.unlink()
        die()
    return real_rmtree(path, *a, **k)

st.save_file, torch.save, pathlib.Path.rename, shutil.rmtree = save_file, torch_save, rename, rmtree
xm = xkern.load_model(tiny_model("llama", seed=0, initializer_range=0.2), dtype=torch.float32, progress=False)
xm.add_adapter("a", r=8, lora_alpha=16, seed=1)
train_lora(xm, "a", memorizable_examples(24), output_dir=OUT, **{cfg!r})
print("finished without being killed")
"""


def _model():
    xm = xkern.load_model(tiny_model("llama", seed=0, initializer_range=0.2), dtype=torch.float32, progress=False)
    xm.add_adapter("a", r=8, lora_alpha=16, seed=1)
    return xm


def _weights(xm):
    return {k: v.detach().clone() for k, v in xm.state_dict().items() if ".a" in k and "lora" in k}


@pytest.fixture(scope="module")
def uninterrupted():
    xm = _model()
    res = train_lora(xm, "a", memorizable_examples(24), **CFG)
    return res, _weights(xm)


@pytest.mark.parametrize("point", ["adapter-weights", "optimizer", "between-renames", "cleanup"])
def test_killed_during_checkpoint_write_resumes_to_the_uninterrupted_result(tmp_path, point, uninterrupted):
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(REPO), point=point, out=str(out), kill_at=KILL_AT_SAVE,
                                   cfg=CFG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])

    found = resumable_checkpoint(out / "checkpoint")
    assert found is not None, sorted(p.name for p in out.iterdir())
    step = json.loads((found / "state.json").read_text())["step"]
    # killed while writing step 3's checkpoint: step 2's survives, or step 3's once it is in place
    assert step == (KILL_AT_SAVE if point == "cleanup" else KILL_AT_SAVE - 1)

    full_res, full_weights = uninterrupted
    xm = _model()  # a new process: fresh model, finds the checkpoint
    res = train_lora(xm, "a", memorizable_examples(24), output_dir=out, **CFG)
    assert res.steps == full_res.steps
    assert res.train_loss == pytest.approx(full_res.train_loss, rel=1e-6)
    got = _weights(xm)
    assert got.keys() == full_weights.keys() and got
    for k in full_weights:
        torch.testing.assert_close(got[k], full_weights[k], atol=1e-7, rtol=1e-6)
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.old").exists()


@pytest.mark.parametrize("part", ["optimizer.safetensors", "optimizer.json"])
def test_a_damaged_checkpoint_is_named_not_crashed_on(tmp_path, part):
    xm = _model()
    train_lora(xm, "a", memorizable_examples(8), output_dir=tmp_path, stop_after=1, **CFG)
    damaged = tmp_path / "checkpoint" / part
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(FormatError, match="optimizer.safetensors / .json is damaged"):
        train_lora(_model(), "a", memorizable_examples(8), output_dir=tmp_path, **CFG)


def test_a_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path):
    """A checkpoint of an older xkern (or a planted one) holding optimizer.pt: refused by name, its pickle never
    loaded, so a __reduce__ payload in it cannot run."""
    xm = _model()
    train_lora(xm, "a", memorizable_examples(8), output_dir=tmp_path, stop_after=1, **CFG)
    ckpt = tmp_path / "checkpoint"
    for name in ("optimizer.safetensors", "optimizer.json"):
        (ckpt / name).unlink()
    marker = tmp_path / "ran"
    torch.save({"payload": PicklePayload(str(marker))}, ckpt / "optimizer.pt")
    with pytest.raises(FormatError, match="older xkern .* pickled in optimizer.pt"):
        train_lora(_model(), "a", memorizable_examples(8), output_dir=tmp_path, **CFG)
    assert not marker.exists()


def test_checkpoint_structure_round_trips_without_pickle():
    import random

    import numpy as np

    from xkern.train.checkpoint import join_tensors, split_tensors

    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": None}]},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
             "best": [torch.ones(2)]}
    skeleton, tensors = split_tensors(state)
    back = join_tensors(json.loads(json.dumps(skeleton)), tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999) and 0 in back["optimizer"]["state"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["rng"]["python"] == state["rng"]["python"]
    assert back["rng"]["numpy"][0] == "MT19937" and np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    with pytest.raises(ValueError, match="unexpected node"):
        join_tensors({"code": "import os"}, {})


