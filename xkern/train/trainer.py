"""``train_lora``: train one adapter of an :class:`~xkern.nn.XkernModel`, base frozen.

AdamW over that adapter's A/B only, gradient accumulation, optional activation checkpointing, bf16
autocast on GPU, a linear-warmup schedule, checkpoints that resume to the same result (adapter,
optimizer, step, data position and RNG state), a tqdm bar and a JSON loss log. Under ``torchrun``
(``WORLD_SIZE > 1``) it runs DistributedDataParallel: each rank takes its share of every global
batch and gradients are averaged across ranks (gloo on the CPU, nccl on GPUs).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from xkern.adapters.peft_format import load_adapter as read_adapter
from xkern.nn.model import XkernModel
from xkern.nn.routing import checkpoint_context_fn
from xkern.train.objectives import OBJECTIVES, Objective, model_pad_id

CHECKPOINT_DIR = "checkpoint"
LOG_NAME = "train_log.json"


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_lora` (all have working defaults)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    warmup_steps: int = 0
    schedule: str = "linear"  # "linear" decay to 0 after warm-up, or "constant"
    max_grad_norm: float | None = 1.0
    grad_checkpointing: bool = False
    bf16: str | bool = "auto"  # autocast to bf16 on CUDA
    seed: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 1
    progress: bool = True


@dataclass
class TrainResult:
    steps: int
    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    log_path: str | None = None

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_loss[-1][1] if self.eval_loss else None


def _dist_setup() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "linear":
        span = max(total - cfg.warmup_steps, 1)
        return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)
    raise ValueError(f"schedule must be 'linear' or 'constant', got {cfg.schedule!r}")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_loss(model: XkernModel, adapter: str, dataset: Sequence[dict[str, Any]],
                  objective: str | Objective = "causal_lm", batch_size: int = 8) -> float:
    """Mean loss of ``adapter`` over ``dataset`` (no gradients, eval mode), weighted by batch size."""
    obj = OBJECTIVES[objective]() if isinstance(objective, str) else objective
    pad = model_pad_id(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            chunk = dataset[i : i + batch_size]
            loss = obj.loss(model, _move(obj.collate(chunk, pad), model.device), adapter)
            total += float(loss) * len(chunk)
            count += len(chunk)
    model.train(was_training)
    return total / max(count, 1)


def train_lora(model: XkernModel, adapter_name: str, dataset: Sequence[dict[str, Any]], *,
               objective: str | Objective = "causal_lm", eval_dataset: Sequence[dict[str, Any]] | None = None,
               output_dir: str | os.PathLike | None = None, resume: bool = True, config: TrainConfig | None = None,
               stop_after: int | None = None, callback: Callable[[int, float], None] | None = None,
               **overrides: Any) -> TrainResult:
    """Train adapter ``adapter_name`` (create it first with ``model.add_adapter``) on ``dataset``.

    ``objective``: ``"causal_lm"``, ``"candidates"`` (see :mod:`xkern.train.objectives`) or an object
    with ``collate`` and ``loss``. ``output_dir``: where the checkpoint (``checkpoint/``, PEFT adapter
    + optimizer + state), the final adapter (``adapter/``) and ``train_log.json`` go; an existing
    checkpoint there is resumed when ``resume``. ``stop_after``: stop after that many optimizer steps
    of this call (an interruption, for tests). Keyword overrides set :class:`TrainConfig` fields.
    """
    cfg = config or TrainConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"unknown training option {key!r}")
        setattr(cfg, key, value)
    if not isinstance(model, XkernModel):
        raise TypeError(f"model must be an XkernModel (xkern.load_model), got {type(model).__name__}")
    if adapter_name not in model.list_adapters():
        raise KeyError(f"unknown adapter {adapter_name!r}: create it with model.add_adapter first")
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("batch_size and grad_accum must be >= 1")
    obj = OBJECTIVES[objective]() if isinstance(objective, str) else objective
    rank, world = _dist_setup()
    device = model.device
    pad = model_pad_id(model)

    params = model.train_only(adapter_name)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    global_batch = cfg.batch_size * world
    batches_per_epoch = max(len(dataset) // global_batch, 1)
    steps_per_epoch = max(batches_per_epoch // cfg.grad_accum, 1)
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(int(math.ceil(cfg.epochs * steps_per_epoch)), 1)

    out_dir = Path(output_dir) if output_dir is not None else None
    step, history, evals = 0, [], []
    ckpt = out_dir / CHECKPOINT_DIR if out_dir is not None else None
    if ckpt is not None and resume and (ckpt / "state.json").is_file():
        step, history, evals = _load_checkpoint(model, adapter_name, opt, ckpt)

    wrapped: torch.nn.Module = model
    if world > 1:
        # the frozen NF4 base is identical on every rank: sync only the adapter's gradients
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if cfg.grad_checkpointing:
        ckpt_kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn}
        if hasattr(model.model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    use_bf16 = device.type == "cuda" and cfg.bf16 in ("auto", True)
    if cfg.bf16 is True and device.type != "cuda":
        raise ValueError("bf16 autocast needs a CUDA device")
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {adapter_name}", disable=not cfg.progress or rank != 0)
    stop_at = total_steps if stop_after is None else min(total_steps, step + stop_after)
    try:
        while step < stop_at:
            micro = step * cfg.grad_accum  # global micro-batch index
            epoch, within = divmod(micro, batches_per_epoch)
            order = _epoch_order(len(dataset), cfg.seed, epoch)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(cfg, step, total_steps)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for k in range(cfg.grad_accum):
                b = (within + k) % batches_per_epoch
                if within + k >= batches_per_epoch:  # accumulation crossing an epoch boundary
                    order = _epoch_order(len(dataset), cfg.seed, epoch + 1)
                idx = order[b * global_batch + rank * cfg.batch_size : b * global_batch + (rank + 1) * cfg.batch_size]
                batch = _move(obj.collate([dataset[i] for i in idx], pad), device)
                sync = contextlib.nullcontext() if world == 1 or k == cfg.grad_accum - 1 else wrapped.no_sync()
                amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
                with sync, amp:
                    loss = obj.loss(wrapped, batch, adapter_name) / cfg.grad_accum
                    loss.backward()
                step_loss += float(loss.detach())
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            step += 1
            if world > 1:
                t = torch.tensor([step_loss], device=device)
                dist.all_reduce(t)
                step_loss = float(t) / world
            history.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if callback is not None:
                callback(step, step_loss)
            if eval_dataset is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                evals.append((step, evaluate_loss(model, adapter_name, eval_dataset, obj, cfg.batch_size)))
                model.train()
            if ckpt is not None and rank == 0 and cfg.save_every and step % cfg.save_every == 0:
                _save_checkpoint(model, adapter_name, opt, ckpt, step, history, evals, cfg)
    finally:
        bar.close()
        if cfg.grad_checkpointing:
            disable = getattr(model.model, "activation_checkpointing_disable", None) or \
                model.model.gradient_checkpointing_disable
            disable()
    finished = step >= total_steps
    if finished and eval_dataset is not None:
        evals.append((step, evaluate_loss(model, adapter_name, eval_dataset, obj, cfg.batch_size)))
    model.eval()
    for p in params:
        p.requires_grad_(False)
    result = TrainResult(steps=step, train_loss=history, eval_loss=evals, seconds=time.perf_counter() - start)
    if out_dir is not None and rank == 0:
        _save_checkpoint(model, adapter_name, opt, ckpt, step, history, evals, cfg)
        if finished:
            model.save_adapter(adapter_name, out_dir / "adapter")
        log = {"adapter": adapter_name, "config": asdict(cfg), "world_size": world, "total_steps": total_steps,
               "steps": step, "finished": finished, "seconds_this_run": result.seconds,
               "train_loss": [{"step": i + 1, "loss": v} for i, v in enumerate(history)],
               "eval_loss": [{"step": s, "loss": v} for s, v in evals]}
        (out_dir / LOG_NAME).write_text(json.dumps(log, indent=2) + "\n")
        result.log_path = str(out_dir / LOG_NAME)
    if world > 1:
        dist.barrier()
    return result


def _save_checkpoint(model: XkernModel, adapter: str, opt: torch.optim.Optimizer, ckpt: Path, step: int,
                     history: list[float], evals: list[tuple[int, float]], cfg: TrainConfig) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_adapter(adapter, tmp / "adapter")
    torch.save({"optimizer": opt.state_dict(), "rng": _rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "train_loss": history, "eval_loss": evals,
                                                "config": asdict(cfg)}, indent=2) + "\n")
    if ckpt.exists():  # replace atomically enough: never leave a half-written checkpoint behind
        old = ckpt.with_name(ckpt.name + ".old")
        ckpt.rename(old)
        tmp.rename(ckpt)
        shutil.rmtree(old)
    else:
        tmp.rename(ckpt)


def _load_checkpoint(model: XkernModel, adapter: str, opt: torch.optim.Optimizer,
                     ckpt: Path) -> tuple[int, list[float], list[tuple[int, float]]]:
    state = json.loads((ckpt / "state.json").read_text())
    saved = read_adapter(ckpt / "adapter")
    layers = model.nf4_layers
    mine = {m for m, lay in layers.items() if adapter in lay.lora_A}
    if set(saved.modules) != mine:
        raise ValueError(f"checkpoint {ckpt} holds an adapter for other modules than {adapter!r}")
    with torch.no_grad():
        for module, w in saved.modules.items():
            lay = layers[module]
            if lay.lora_A[adapter].shape != w.A.shape or lay.lora_B[adapter].shape != w.B.shape:
                raise ValueError(f"checkpoint {ckpt}: {module} has other shapes than adapter {adapter!r}")
            lay.lora_A[adapter].copy_(w.A)
            lay.lora_B[adapter].copy_(w.B)
    blob = torch.load(ckpt / "optimizer.pt", weights_only=False)
    opt.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])
    return int(state["step"]), list(state["train_loss"]), [tuple(e) for e in state["eval_loss"]]
