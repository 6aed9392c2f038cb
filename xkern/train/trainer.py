"""``train_lora``: train one adapter of an :class:`~xkern.nn.XkernModel`, base frozen.

The loop is :func:`xkern.train.loop.fit` (AdamW, warm-up + linear decay, accumulation, clipping,
activation checkpointing, bf16 autocast on GPU, DDP under ``torchrun``); this module adds what is
specific to one adapter of a model: its parameters, an objective over token examples, and
checkpoints that resume to the same result (the adapter in PEFT format, optimizer, step, losses and
RNG state), plus the final adapter and a JSON loss log in ``output_dir``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xkern.adapters.peft_format import load_adapter as read_adapter
from xkern.errors import InputError, InputKeyError, InputTypeError
from xkern.fileio import atomic_write_text
from xkern.nn.model import XkernModel
from xkern.train.checkpoint import STATE_NAME, DirectoryCheckpoint, resumable_checkpoint
from xkern.train.loop import DrawnData, StaticData, TrainConfig, dist_setup, fit, with_overrides
from xkern.train.objectives import OBJECTIVES, Objective, model_pad_id

CHECKPOINT_DIR = "checkpoint"
__all__ = ["STATE_NAME", "AdapterCheckpoint", "TrainResult", "evaluate_loss", "resumable_checkpoint", "train_lora"]
LOG_NAME = "train_log.json"


@dataclass
class TrainResult:
    steps: int
    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0  # this call's
    log_path: str | None = None
    start_step: int = 0  # the step this call resumed from
    seconds_total: float | None = None  # every call's (None: resumed from a checkpoint that did not keep them)

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_loss[-1][1] if self.eval_loss else None


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


# training options a resumed run may set anew: they do not change what a step computes (activation checkpointing
# recomputes the same forward). How a step's examples are laid out (processes x batch x accumulation, DDP or FSDP)
# may change too; fit checks their product is the same.
NOT_IDENTITY = ("progress", "save_every", "log_every", "eval_every", "patience", "max_steps", "epochs",
                "batch_size", "grad_accum", "parallel", "grad_checkpointing")


class AdapterCheckpoint(DirectoryCheckpoint):
    """Checkpoints of one adapter under ``ckpt``: its PEFT files, the optimizer and RNG state, the loop's position."""

    def __init__(self, model: XkernModel, adapter: str, ckpt: Path, cfg: TrainConfig, resume: bool,
                 identity: dict[str, Any] | None = None) -> None:
        super().__init__(ckpt, resume, identity)
        self.model, self.adapter, self.cfg = model, adapter, cfg

    def save(self, state: dict[str, Any]) -> None:
        super().save({**state, "config": asdict(self.cfg)})

    def write_params(self, folder: Path) -> None:
        self.model.save_adapter(self.adapter, folder / "adapter")

    def read_params(self, folder: Path) -> None:
        self.model.set_adapter_weights(self.adapter, read_adapter(folder / "adapter"), f"checkpoint {folder}")


def train_lora(model: XkernModel, adapter_name: str, dataset: Sequence[dict[str, Any]] | DrawnData, *,
               objective: str | Objective = "causal_lm", eval_dataset: Sequence[dict[str, Any]] | None = None,
               output_dir: str | os.PathLike | None = None, resume: bool = True, config: TrainConfig | None = None,
               stop_after: int | None = None, callback: Callable[[int, float], None] | None = None,
               identity: dict[str, Any] | None = None, **overrides: Any) -> TrainResult:
    """Train adapter ``adapter_name`` (create it first with ``model.add_adapter``) on ``dataset``: examples, the
    same every epoch, or a :class:`~xkern.train.loop.DrawnData` that draws each epoch's.

    ``objective``: ``"causal_lm"``, ``"candidates"`` (see :mod:`xkern.train.objectives`) or an object
    with ``collate`` and ``loss``. ``output_dir``: where the checkpoint (``checkpoint/``, PEFT adapter
    + optimizer + state), the final adapter (``adapter/``) and ``train_log.json`` go; an existing
    checkpoint there is resumed when ``resume`` and when it was written by the same run: ``identity``
    (what the caller says makes the run, e.g. the command, model, data and domains) plus the training
    and adapter config must equal the checkpoint's, else it is refused naming the fields.
    ``stop_after``: stop after that many optimizer steps of this call (an interruption, for tests).
    Keyword overrides set :class:`TrainConfig` fields.
    """
    cfg = with_overrides(config or TrainConfig(), overrides)
    if not isinstance(model, XkernModel):
        raise InputTypeError(f"model must be an XkernModel (xkern.load_model), got {type(model).__name__}")
    if adapter_name not in model.list_adapters():
        raise InputKeyError(f"unknown adapter {adapter_name!r}: create it with model.add_adapter first")
    cfg.validate()
    if not isinstance(dataset, DrawnData) and len(dataset) == 0:  # a DrawnData's first epoch: fit checks it
        raise InputError("the training dataset is empty")
    data = dataset if isinstance(dataset, DrawnData) else StaticData(dataset, cfg.seed)
    obj = OBJECTIVES[objective]() if isinstance(objective, str) else objective
    rank, world = dist_setup()
    device = model.device
    pad = model_pad_id(model)
    params = model.train_only(adapter_name)
    out_dir = Path(output_dir) if output_dir is not None else None
    run = {**(identity or {}), "adapter_config": model.adapter_configs.get(adapter_name),
           "train": {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}}
    checkpointer = AdapterCheckpoint(model, adapter_name, out_dir / CHECKPOINT_DIR, cfg, resume, run) \
        if out_dir is not None else None

    def loss_fn(module: torch.nn.Module, examples: Sequence[dict[str, Any]]) -> torch.Tensor:
        return obj.loss(module, _move(obj.collate(list(examples), pad), device), adapter_name)

    def validate() -> dict[str, float]:
        return {"loss": evaluate_loss(model, adapter_name, eval_dataset, obj, cfg.batch_size)}

    res = fit(model, [{"params": params, "lr": cfg.lr}], data, loss_fn, cfg,
              validate=validate if eval_dataset is not None else None, checkpointer=checkpointer,
              hf_model=model.model, desc=f"train {adapter_name}", callback=callback, stop_after=stop_after)
    evals = [(int(e["step"]), float(e["loss"])) for e in res.evals]
    result = TrainResult(steps=res.steps, train_loss=res.train_loss, eval_loss=evals, seconds=res.seconds,
                         start_step=res.start_step, seconds_total=res.seconds_total)
    finished = res.steps >= res.total_steps
    if out_dir is not None and rank == 0:
        if finished:
            model.save_adapter(adapter_name, out_dir / "adapter")
        log = {"adapter": adapter_name, "config": asdict(cfg), "world_size": world, "total_steps": res.total_steps,
               "steps": res.steps, "finished": finished, "seconds_this_run": result.seconds,
               "seconds_total": res.seconds_total,
               "train_loss": [{"step": i + 1, "loss": v} for i, v in enumerate(res.train_loss)],
               "eval_loss": [{"step": s, "loss": v} for s, v in evals]}
        atomic_write_text(out_dir / LOG_NAME, json.dumps(log, indent=2) + "\n")
        result.log_path = str(out_dir / LOG_NAME)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result
