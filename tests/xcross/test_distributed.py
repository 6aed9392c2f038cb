"""X-Cross training under torchrun (DDP, gloo): 2 processes with half the batch each train the same
integrators, head and LoRA (the LoRA is outside the DDP module: its gradients are averaged by hand)
as 1 process with the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import xkern
from tests.helpers import tiny_model
from xkern.data.prompts import next_item_prompt, pointwise_prompt
from xkern.data.synthetic import SyntheticConfig, make_synthetic
from xkern.data.tokenizer import word_tokenizer
from xkern.xcross import XCrossModel, train

domains = make_synthetic(SyntheticConfig(n_users=80, n_themes=4, n_tiers=2, items_per_cell=4, seed=0))
texts = [t for d in domains.values() for t in d.titles]
texts += [pointwise_prompt(["x"], "y", d) for d in domains] + [next_item_prompt(["x"], d) for d in domains]
texts += [str(i) for i in range(20)]
tok = word_tokenizer(texts)
base = tiny_model("llama", seed=3, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
xm = xkern.load_model(base, dtype=torch.float32, progress=False)
for i in range(2):
    xm.add_adapter(f"a{{i}}", r=4, seed=i, init_lora_weights=False)
xc = XCrossModel(xm, ["a0", "a1"], tokenizer=tok, max_history=3{xc_kwargs})
import os
if os.environ.get("RANK", "0") == "0":
    xm.save_adapter("a1", {out!r} + "/a1-init")
extra = xm.adapter_parameters("a1") if {parallel!r} == "ddp" else []
train(xc, domains["Tools"], n_neg=3, max_steps=4, batch_size={bs}, lr=1e-2, max_train_users=32, max_val_users=8,
      val_neg=3, progress=False, output_dir={out!r}, extra_params=extra, extra_lr=1e-2,
      keep_best=False, parallel={parallel!r}{train_kwargs})
if torch.distributed.is_initialized():
    torch.distributed.barrier()
xm.save_adapter("a1", {out!r} + "/a1")
"""


def _run(cmd, tmp_path, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _ddp_and_one(tmp_path, port: int, xc_kwargs: str = "", train_kwargs: str = "") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    for name, bs in (("ddp", 4), ("one", 8)):
        (tmp_path / f"{name}.py").write_text(SCRIPT.format(tests=str(REPO), bs=bs, out=str(tmp_path / name),
                                                           parallel="ddp", xc_kwargs=xc_kwargs,
                                                           train_kwargs=train_kwargs))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
          str(tmp_path / "ddp.py")], tmp_path, env)
    _run([sys.executable, str(tmp_path / "one.py")], tmp_path, env)


def test_two_processes_train_what_one_process_trains(tmp_path):
    _ddp_and_one(tmp_path, 29547)
    ddp_log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    one_log = json.loads((tmp_path / "one" / "train_log.json").read_text())
    assert (ddp_log["world_size"], one_log["world_size"]) == (2, 1)
    assert ddp_log["steps"] == one_log["steps"] == 4
    torch.testing.assert_close(torch.tensor(ddp_log["train_loss"]), torch.tensor(one_log["train_loss"]),
                               atol=1e-5, rtol=1e-4)
    ddp = load_file(str(tmp_path / "ddp" / "xcross" / "xcross.safetensors"))
    one = load_file(str(tmp_path / "one" / "xcross" / "xcross.safetensors"))
    assert ddp.keys() == one.keys()
    # the head's output bias shifts every candidate's score alike, so the cross-entropy's gradient for it is
    # zero up to rounding, and Adam turns that rounding into full steps: it is the one parameter left out
    for k in sorted(set(one) - {"head.out.bias"}):  # tolerance as in the LoRA DDP test (Adam, float order)
        torch.testing.assert_close(ddp[k], one[k], atol=5e-5, rtol=1e-4)
    a_ddp = load_file(str(tmp_path / "ddp" / "a1" / "adapter_model.safetensors"))
    a_one = load_file(str(tmp_path / "one" / "a1" / "adapter_model.safetensors"))
    init = load_file(str(tmp_path / "one" / "a1-init" / "adapter_model.safetensors"))
    for k in a_one:
        torch.testing.assert_close(a_ddp[k], a_one[k], atol=5e-5, rtol=1e-4)
    assert any(not torch.equal(a_one[k], init[k]) for k in a_one)  # the LoRA did train


def test_two_processes_train_the_calibrated_likelihood_mix_as_one_process(tmp_path):
    """--calibrate runs two forwards per step (the history and the empty-history prompts) through the DDP
    module before one backward: the gradients are still reduced once and match one process."""
    _ddp_and_one(tmp_path, 29553, xc_kwargs=', scoring="likelihood", integrator_norm="rms"',
                 train_kwargs=", calibrate=True")
    ddp_log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    one_log = json.loads((tmp_path / "one" / "train_log.json").read_text())
    assert ddp_log["world_size"] == 2 and ddp_log["config"]["calibrate"]
    torch.testing.assert_close(torch.tensor(ddp_log["train_loss"]), torch.tensor(one_log["train_loss"]),
                               atol=1e-5, rtol=1e-4)
    ddp = load_file(str(tmp_path / "ddp" / "xcross" / "xcross.safetensors"))
    one = load_file(str(tmp_path / "one" / "xcross" / "xcross.safetensors"))
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=5e-5, rtol=1e-4)


def test_fsdp_trains_the_integrators_one_process_trains(tmp_path):
    """--parallel fsdp on X-Cross shards its own parameters (integrators, w, head); the base stays replicated."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    for name, bs, parallel in (("fsdp", 4, "fsdp"), ("one", 8, "fsdp")):  # one process: fsdp is a no-op there
        (tmp_path / f"{name}.py").write_text(SCRIPT.format(tests=str(REPO), bs=bs, out=str(tmp_path / name),
                                                           parallel=parallel, xc_kwargs="", train_kwargs=""))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29549",
          str(tmp_path / "fsdp.py")], tmp_path, env)
    _run([sys.executable, str(tmp_path / "one.py")], tmp_path, env)
    logs = [json.loads((tmp_path / n / "train_log.json").read_text()) for n in ("fsdp", "one")]
    assert [g["world_size"] for g in logs] == [2, 1] and logs[0]["config"]["parallel"] == "fsdp"
    torch.testing.assert_close(torch.tensor(logs[0]["train_loss"]), torch.tensor(logs[1]["train_loss"]),
                               atol=1e-5, rtol=1e-4)
    fsdp = load_file(str(tmp_path / "fsdp" / "xcross" / "xcross.safetensors"))
    one = load_file(str(tmp_path / "one" / "xcross" / "xcross.safetensors"))
    assert fsdp.keys() == one.keys()
    for k in sorted(set(one) - {"head.out.bias"}):  # as above: the head's output bias has no real gradient
        torch.testing.assert_close(fsdp[k], one[k], atol=5e-5, rtol=1e-4)
    assert any(torch.count_nonzero(one[k]) for k in one if k.startswith("w_concat"))  # the integrators did train
