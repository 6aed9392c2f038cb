"""train_lora: learning, freezing, accumulation, checkpointing/resume, activation checkpointing, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xkern
from tests.helpers import memorizable_examples, tiny_model
from xkern.train import TrainConfig, evaluate_loss, train_lora
from xkern.train.loop import DrawnData

REPO = Path(__file__).resolve().parents[2]


def _model(seed: int = 0):
    # initializer_range 0.2: with the default 0.02 the tied-off lm_head cannot produce peaked logits at all
    xm = xkern.load_model(tiny_model("llama", seed=seed, initializer_range=0.2), dtype=torch.float32,
                          progress=False)
    xm.add_adapter("a", r=8, lora_alpha=16, seed=1)
    xm.add_adapter("other", r=4, init_lora_weights=False, seed=2)
    return xm


def _weights(xm, name):
    return {k: v.detach().clone() for k, v in xm.state_dict().items() if f".{name}" in k}


def test_loss_goes_down_and_only_the_adapter_moves(tmp_path):
    xm = _model()
    frozen = {k: v.clone() for k, v in xm.state_dict().items()}
    train, val = memorizable_examples(32), memorizable_examples(8, seed=9)
    before = evaluate_loss(xm, "a", val)
    res = train_lora(xm, "a", train, eval_dataset=val, output_dir=tmp_path, lr=2e-2, batch_size=8, epochs=4,
                     progress=False)
    assert res.steps == 16 and len(res.train_loss) == 16
    assert res.final_eval_loss < 0.5 * before
    state = xm.state_dict()
    for k, v in frozen.items():
        if "lora_A.a" in k or "lora_B.a" in k:
            continue
        assert torch.equal(state[k], v), k
    assert not any(p.requires_grad for p in xm.parameters())
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["finished"] and len(log["train_loss"]) == 16 and log["eval_loss"][-1]["loss"] == res.final_eval_loss
    from xkern.plot import learning_curve  # what `xkern plot train_log.json` draws

    curve = learning_curve(log)
    assert curve["train loss"] == [(i + 1, pytest.approx(v)) for i, v in enumerate(res.train_loss)]
    assert curve["val loss"] == [(s, pytest.approx(v)) for s, v in res.eval_loss]
    fresh = _model()
    fresh.delete_adapter("a")
    fresh.load_adapter(tmp_path / "adapter", "a")
    assert evaluate_loss(fresh, "a", val) == pytest.approx(res.final_eval_loss, rel=1e-5)


def test_gradient_accumulation_equals_the_large_batch():
    a, b = _model(), _model()
    data = memorizable_examples(16)
    train_lora(a, "a", data, batch_size=8, grad_accum=1, max_steps=2, lr=1e-2, progress=False)
    train_lora(b, "a", data, batch_size=4, grad_accum=2, max_steps=2, lr=1e-2, progress=False)
    wa, wb = _weights(a, "a"), _weights(b, "a")
    # Adam divides by |g|: entries whose gradient is ~0 amplify float-order noise, so allow 0.5% of lr
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, checkpointing):
    cfg = dict(batch_size=4, grad_accum=2, epochs=3, lr=5e-3, warmup_steps=2, grad_checkpointing=checkpointing,
               progress=False)
    data = memorizable_examples(24)
    full = _model()
    res_full = train_lora(full, "a", data, **cfg)
    part = _model()
    first = train_lora(part, "a", data, output_dir=tmp_path, stop_after=4, **cfg)
    assert first.steps == 4 and not json.loads((tmp_path / "train_log.json").read_text())["finished"]
    resumed_model = _model()  # a new process would start from scratch and find the checkpoint
    res = train_lora(resumed_model, "a", data, output_dir=tmp_path, **cfg)
    assert res.steps == res_full.steps == 9
    assert res.train_loss == pytest.approx(res_full.train_loss, rel=1e-6)
    wf, wr = _weights(full, "a"), _weights(resumed_model, "a")
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], atol=1e-7, rtol=1e-6)


def test_drawn_data_trains_on_each_epochs_draw_and_resumes_to_the_same_result(tmp_path):
    pools = [memorizable_examples(16, seed=s) for s in range(3)]
    drawn: list[int] = []

    def draw(epoch: int) -> list[dict]:
        drawn.append(epoch)
        return pools[epoch]

    cfg = dict(batch_size=4, epochs=3, lr=5e-3, progress=False)
    full = _model()
    res_full = train_lora(full, "a", DrawnData(draw, seed=0), **cfg)
    assert res_full.steps == 12 and set(drawn) == {0, 1, 2}
    static = _model()  # epoch 0 is the same draw, so its steps equal StaticData's; the later ones do not
    res_static = train_lora(static, "a", pools[0], **cfg)
    assert res_static.train_loss[:4] == pytest.approx(res_full.train_loss[:4], rel=1e-6)
    assert res_static.train_loss[4:] != pytest.approx(res_full.train_loss[4:], rel=1e-3)
    first = train_lora(_model(), "a", DrawnData(draw), output_dir=tmp_path, stop_after=6, **cfg)
    assert first.steps == 6
    resumed = _model()
    res = train_lora(resumed, "a", DrawnData(draw), output_dir=tmp_path, **cfg)
    assert res.train_loss == pytest.approx(res_full.train_loss, rel=1e-6)
    for k, v in _weights(full, "a").items():
        torch.testing.assert_close(_weights(resumed, "a")[k], v, atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="epoch 1 has 8 training examples, the first had 16"):
        train_lora(_model(), "a", DrawnData(lambda e: pools[0] if e == 0 else pools[1][:8]), **cfg)


def test_a_resumed_run_counts_every_invocations_seconds(tmp_path):
    """Training seconds add up across an interruption (kept in the checkpoint): the resumed call's total is
    the first call's seconds plus its own; a checkpoint that never recorded them gives an unknown total (None),
    not the last call's seconds passed off as the run's."""
    cfg = dict(batch_size=4, epochs=2, lr=5e-3, progress=False, save_every=1)
    data = memorizable_examples(16)
    first = train_lora(_model(), "a", data, output_dir=tmp_path / "run", stop_after=3, **cfg)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert first.start_step == 0 and first.seconds_total == pytest.approx(first.seconds, abs=0.2)
    assert state["seconds"] >= first.seconds - 0.1
    res = train_lora(_model(), "a", data, output_dir=tmp_path / "run", **cfg)
    assert res.start_step == 3 and res.steps == 8
    assert res.seconds_total >= state["seconds"] + res.seconds - 0.1 and res.seconds_total > res.seconds
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["seconds_total"] == res.seconds_total
    train_lora(_model(), "a", data, output_dir=tmp_path / "old", stop_after=3, **cfg)
    ckpt = tmp_path / "old" / "checkpoint" / "state.json"  # as a checkpoint written before the total was kept
    ckpt.write_text(json.dumps({k: v for k, v in json.loads(ckpt.read_text()).items() if k != "seconds"}))
    old = train_lora(_model(), "a", data, output_dir=tmp_path / "old", **cfg)
    assert old.start_step == 3 and old.seconds > 0 and old.seconds_total is None


def test_activation_checkpointing_gives_the_same_gradients():
    data = memorizable_examples(8)
    runs = []
    for ckpt in (False, True):
        xm = _model()
        train_lora(xm, "a", data, batch_size=8, max_steps=1, lr=1e-2, grad_checkpointing=ckpt, progress=False)
        runs.append(_weights(xm, "a"))
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], atol=1e-7, rtol=1e-6)


def test_candidate_scoring_objective_learns():
    xm = _model()
    data = []
    g = torch.Generator().manual_seed(0)
    for _ in range(24):
        s = int(torch.randint(3, 90, (1,), generator=g))
        prompt = [s, s + 1, s + 2]
        cands = [[s + 3, s + 4], [s + 7, 3], [5, s], [s + 1, s]]
        data.append({"prompt_ids": prompt, "candidates": cands, "target": 0})
    before = evaluate_loss(xm, "a", data, objective="candidates")
    train_lora(xm, "a", data, objective="candidates", batch_size=4, epochs=3, lr=1e-2, progress=False)
    assert evaluate_loss(xm, "a", data, objective="candidates") < 0.5 * before


def test_bad_arguments():
    xm = _model()
    with pytest.raises(KeyError, match="add_adapter"):
        train_lora(xm, "missing", memorizable_examples(4), progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_lora(xm, "a", [], progress=False)
    with pytest.raises(TypeError, match="unknown training option"):
        train_lora(xm, "a", memorizable_examples(4), learning_rate=1.0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        train_lora(xm, "a", [{"input_ids": [5]}], batch_size=1, progress=False)
    with pytest.raises(ValueError, match="bf16"):
        train_lora(xm, "a", memorizable_examples(4), bf16=True, progress=False)
    assert isinstance(TrainConfig().lr, float)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import xkern
from tests.helpers import memorizable_examples, tiny_model
from xkern.train import train_lora
xm = xkern.load_model(tiny_model("llama", initializer_range=0.2), dtype=torch.float32, progress=False)
xm.add_adapter("a", r=8, lora_alpha=16, seed=1)
train_lora(xm, "a", memorizable_examples(16), batch_size={bs}, max_steps=3, lr=1e-2, output_dir={out!r}, progress=False)
"""


def test_torchrun_ddp_two_processes_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO), bs=4, out=str(tmp_path / "ddp")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", str(script)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single.py"
    single.write_text(DDP_SCRIPT.format(tests=str(REPO), bs=8, out=str(tmp_path / "single")))
    proc = subprocess.run([sys.executable, str(single)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from xkern.adapters import load_adapter

    # same global batch of 8 (2 ranks x 4 vs 1 x 8); tolerance as in the accumulation test (Adam on ~0 gradients)
    ddp, one = load_adapter(tmp_path / "ddp" / "adapter"), load_adapter(tmp_path / "single" / "adapter")
    assert json.loads((tmp_path / "ddp" / "train_log.json").read_text())["world_size"] == 2
    for module in one.modules:
        torch.testing.assert_close(ddp.modules[module].A, one.modules[module].A, atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(ddp.modules[module].B, one.modules[module].B, atol=5e-5, rtol=1e-4)


def test_commands_derive_their_training_flags_from_the_config():
    """A TrainConfig field is a flag of `xkern train-lora` (and, through XCrossTrainConfig, of train-xcross)."""
    import dataclasses

    from xkern.cli import build_parser
    from xkern.train.loop import TrainConfig, config_from_args
    from xkern.xcross.train import XCrossTrainConfig

    parser = build_parser()
    args = parser.parse_args(["train-lora", "--domain", "Tools", "--warmup-steps", "3", "--schedule", "constant",
                              "--keep-best", "--max-grad-norm", "none", "--seed", "5"])
    cfg = config_from_args(TrainConfig, args, seed=args.seed)
    assert (cfg.warmup_steps, cfg.schedule, cfg.keep_best, cfg.max_grad_norm, cfg.seed) == (3, "constant", True,
                                                                                             None, 5)
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True) and f.name != "seed":
            assert hasattr(args, f.name), f"train-lora has no flag for {f.name}"
    xargs = parser.parse_args(["train-xcross", "--model", "m", "--adapter", "a=b", "--target", "Tools",
                               "--n-neg", "7", "--patience", "none"])
    xcfg = config_from_args(XCrossTrainConfig, xargs)
    assert (xcfg.n_neg, xcfg.patience, xcfg.lr, xcfg.keep_best) == (7, None, 1e-3, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["train-lora", "--domain", "Tools", "--warmup-steps", "three"])


def test_a_loss_that_stops_being_finite_stops_training_before_the_update():
    """No silent NaN weights: the loop raises at the first non-finite loss; the parameters keep their last values."""
    from xkern.train.loop import StaticData, TrainingDivergedError, fit

    module = torch.nn.Linear(3, 1)
    seen: list[torch.Tensor] = []

    def loss_fn(mod, batch):
        seen.append(mod.weight.detach().clone())
        x = torch.ones(len(batch), 3)
        out = mod(x).pow(2).mean()
        return out * float("nan") if len(seen) == 3 else out

    cfg = TrainConfig(batch_size=2, max_steps=5, lr=1e-2, progress=False)
    with pytest.raises(TrainingDivergedError, match="training diverged at step 3") as err:
        fit(module, [{"params": list(module.parameters())}], StaticData(list(range(8))), loss_fn, cfg,
            distributed=False)
    assert isinstance(err.value, FloatingPointError)
    assert torch.equal(module.weight.detach(), seen[2]) and torch.isfinite(module.weight).all()


def test_fit_is_a_plain_adamw_loop():
    """fit's losses and parameters equal a loop written from first principles: the same micro-batches in the
    seeded order (accumulation across an epoch boundary), warm-up then linear decay, clipping, AdamW."""
    from xkern.train.loop import StaticData, fit
    from xkern.train.objectives import CausalLM

    data = memorizable_examples(12, seed=3)
    cfg = TrainConfig(lr=1e-2, batch_size=4, grad_accum=2, max_steps=4, warmup_steps=2, max_grad_norm=0.05,
                      weight_decay=0.01, progress=False, seed=5)
    obj = CausalLM()

    def loss_fn(module, batch):
        return obj.loss(module, obj.collate(batch, 0), "a")

    a, b = _model(), _model()
    pa, pb = a.train_only("a"), b.train_only("a")
    res = fit(a, [{"params": pa}], StaticData(data, cfg.seed), loss_fn, cfg, distributed=False)

    opt = torch.optim.AdamW(pb, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = len(data) // cfg.batch_size  # 3 micro-batches an epoch: step 1 straddles epochs 0 and 1
    losses = []
    for step in range(cfg.max_steps):
        factor = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else \
            1.0 - (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
        opt.param_groups[0]["lr"] = cfg.lr * factor
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(cfg.grad_accum):
            epoch, pos = divmod(step * cfg.grad_accum + k, per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
            batch = [data[i] for i in order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size].tolist()]
            loss = loss_fn(b, batch) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(pb, cfg.max_grad_norm)
        opt.step()
        losses.append(total)
    assert res.train_loss == losses and res.steps == cfg.max_steps
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
