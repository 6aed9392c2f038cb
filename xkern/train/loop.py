"""The one training loop of xkern, and the config it reads (from which the commands derive their flags).

:func:`fit` trains the parameters of any adapter-style task: next-item LoRAs (:func:`xkern.train.train_lora`),
X-Cross's integrators and head (:func:`xkern.xcross.train`), WeaveRec's adapters. A task gives

- an :class:`EpochData`: the examples of each epoch (fixed, or freshly drawn negatives every epoch)
  and their order (a seeded permutation of (seed, epoch));
- a ``loss(module, examples) -> Tensor`` (collate + forward: the objective);
- optionally ``validate() -> {"loss": ..., ...}`` (early stopping and keep-best read ``"loss"``) and a
  :class:`Checkpointer` (resumable state).

The loop does the rest the same way for all: AdamW over parameter groups, linear warm-up then
linear decay or constant, gradient accumulation (across epoch boundaries), clipping, bf16 autocast
on CUDA, DistributedDataParallel under ``torchrun`` (each rank takes its share of every global
batch), activation checkpointing, validation every ``eval_every`` steps and at the end, early
stopping after ``patience`` validations without improvement, restoring the best state, checkpoints
every ``save_every`` steps, a progress bar and a callback per step.

Adding a training option: a field of :class:`TrainConfig` (with its ``help``) and its use here; the
``xkern`` commands take it as a flag through :func:`add_config_arguments`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from xkern.distributed import dist_setup
from xkern.errors import InputError, InputTypeError, XkernError
from xkern.train.checkpoint import rng_state, set_rng_state
from xkern.train.sharding import (
    like,
    load_optimizer_state,
    optimizer_state,
    release,
    set_gradient_sync,
    shard,
    whole,
    whole_parameters,
)


def option(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Options of the training loop (all have working defaults)."""

    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(8, "examples per process per micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    epochs: float = option(1.0, "passes over the training examples")
    max_steps: int | None = option(None, "optimizer steps (overrides epochs)")
    warmup_steps: int = option(0, "linear warm-up steps")
    schedule: str = option("linear", "after warm-up: 'linear' decay to 0 or 'constant'",
                         choices=("linear", "constant"))
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (None: off)")
    grad_checkpointing: bool = option(False, "recompute activations in backward (less memory)")
    bf16: str | bool = option("auto", "bf16 autocast: 'auto' (on CUDA), True or False", cli=False)
    seed: int = option(0, "seed of the data order and of sampled negatives")
    eval_every: int | None = option(None, "optimizer steps between validations (always at the end)")
    patience: int | None = option(None, "stop after this many validations without improvement (None: never)")
    keep_best: bool = option(False, "restore the parameters of the best validation at the end")
    save_every: int | None = option(None, "optimizer steps between checkpoints (None: at the end, and when "
                                           "interrupted)")
    log_every: int = option(1, "steps between log entries", cli=False)
    progress: bool = option(True, "show a progress bar", cli=False)
    parallel: str = option("ddp", "under torchrun: 'ddp' (every rank holds the trainable parameters) or 'fsdp' "
                           "(FSDP2: parameters, gradients and optimizer state sharded per transformer block)",
                           choices=("ddp", "fsdp"))

    def validate(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise InputError("batch_size and grad_accum must be >= 1")
        if self.schedule not in ("linear", "constant"):
            raise InputError(f"schedule must be 'linear' or 'constant', got {self.schedule!r}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise InputError(f"lr must be a positive number, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise InputError(f"epochs must be > 0, got {self.epochs}")
        if self.parallel not in ("ddp", "fsdp"):
            raise InputError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """``cfg`` with keyword overrides applied (an unknown key is a TypeError naming it)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for key in overrides:
        if key not in names:
            raise InputTypeError(f"unknown training option {key!r}")
    return dataclasses.replace(cfg, **overrides)


# --------------------------------------------------------------------------------------------- CLI flags

def _flag_type(f: dataclasses.Field, default: Any) -> Callable[[str], Any] | None:
    text = str(f.type)
    if "bool" in text and "str" not in text:
        return None
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type = TrainConfig,
                         defaults: dict[str, Any] | None = None, skip: Sequence[str] = ()) -> None:
    """One flag per field of ``cls`` (``--lr``, ``--batch-size``, ...), except ``cli=False`` fields and ``skip``."""
    inst = cls()
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        default = (defaults or {}).get(f.name, getattr(inst, f.name))
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default {default})"
        kind = _flag_type(f, default)
        if kind is None:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            def parse(text: str, kind=kind, name=flag) -> Any:
                if text.lower() == "none":
                    return None
                try:
                    return kind(text)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{name} takes a {kind.__name__}, got {text!r}") from None

            parser.add_argument(flag, dest=f.name, type=parse, default=default, help=help_text,
                                choices=f.metadata.get("choices"))


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """An instance of ``cls`` from the flags :func:`add_config_arguments` added (plus ``extra``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    cfg = cls(**{**values, **extra})
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------- the loop

class EpochData(Protocol):
    def examples(self, epoch: int) -> Sequence[Any]: ...

    def order(self, epoch: int, n: int) -> list[int]: ...


def seeded_order(seed: int, epoch: int, n: int) -> list[int]:
    """A ``torch.randperm`` of ``n`` seeded by (seed, epoch): a resumed run replays the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class StaticData:
    """The same examples every epoch, in a seeded order per epoch."""

    data: Sequence[Any]
    seed: int = 0

    def examples(self, epoch: int) -> Sequence[Any]:
        return self.data

    def order(self, epoch: int, n: int) -> list[int]:
        return seeded_order(self.seed, epoch, n)


@dataclass
class DrawnData:
    """Examples drawn anew for each epoch by ``draw(epoch)`` (deterministic, so a resumed run redraws the same
    ones; every epoch as many as the first), in a seeded order per epoch."""

    draw: Callable[[int], Sequence[Any]]
    seed: int = 0

    def examples(self, epoch: int) -> Sequence[Any]:
        return self.draw(epoch)

    def order(self, epoch: int, n: int) -> list[int]:
        return seeded_order(self.seed, epoch, n)


class Checkpointer(Protocol):
    """Resumable state of one run (see :class:`xkern.train.checkpoint.DirectoryCheckpoint`)."""

    def load(self) -> dict[str, Any] | None:
        """Restore the trained parameters; return the loop state (``step``, ``train_loss``, ``evals``,
        ``optimizer``, ``rng``, ``examples_per_step``, ...) or ``None`` when there is nothing to resume."""
        ...

    def save(self, state: dict[str, Any]) -> None:
        """Write the loop state and the trained parameters (rank 0 only; the parameters are whole)."""
        ...


@dataclass
class FitResult:
    steps: int
    total_steps: int
    train_loss: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", ...}
    best_step: int | None = None
    best_loss: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0  # this call's
    world_size: int = 1
    rank: int = 0
    start_step: int = 0  # where this call began (a resumed run: its checkpoint's step)
    # every call's seconds up to the last checkpoint plus this call's; None when resumed from a checkpoint that
    # did not record them (the time of the steps before it is unknown)
    seconds_total: float | None = None

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps or self.stopped_early


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total - cfg.warmup_steps, 1)
    return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)


def _grad_checkpointing(model: torch.nn.Module | None, on: bool) -> contextlib.AbstractContextManager:
    @contextlib.contextmanager
    def scope():
        if not on or model is None:
            yield
            return
        from xkern.nn.routing import checkpoint_context_fn

        kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        try:
            yield
        finally:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()

    return scope()


class _Run:
    """One call of :func:`fit`: the optimizer, the schedule and the bookkeeping, one method per part of a step."""

    def __init__(self, module: torch.nn.Module, param_groups: Sequence[dict[str, Any]], data: EpochData,
                 cfg: TrainConfig, checkpointer: Checkpointer | None, distributed: bool,
                 hf_model: torch.nn.Module | None) -> None:
        cfg.validate()
        self.module, self.data, self.cfg, self.checkpointer = module, data, cfg, checkpointer
        self.rank, self.world = dist_setup() if distributed else (0, 1)
        self.fsdp = self.world > 1 and cfg.parallel == "fsdp"
        self.first = data.examples(0)
        if len(self.first) == 0:
            raise InputError("the training dataset is empty")
        self.examples_per_step = cfg.batch_size * self.world * cfg.grad_accum
        self.loaded = checkpointer.load() if checkpointer is not None else None  # whole parameters, before sharding
        if self.loaded is not None:
            _check_resume(self.loaded, cfg, self.world, self.examples_per_step)
        owned = {id(p) for p in module.parameters()}
        self.outside = [p for g in param_groups for p in g["params"] if id(p) not in owned]  # trained, not the module's
        self.by_name = not self.outside  # optimizer state keyed by parameter name: loads under any sharding
        self.device = next((p.device for g in param_groups for p in g["params"]), torch.device("cpu"))
        self.use_bf16 = self.device.type == "cuda" and cfg.bf16 in ("auto", True)
        if cfg.bf16 is True and self.device.type != "cuda":
            raise InputError("bf16 autocast needs a CUDA device")
        if self.fsdp:
            param_groups = shard(module, hf_model, param_groups, bf16=self.use_bf16)
        self.params = [p for g in param_groups for p in g["params"]]
        self.base_lrs = [float(g.get("lr", cfg.lr)) for g in param_groups]
        self.opt = torch.optim.AdamW([{"params": list(g["params"]), "lr": lr}
                                      for g, lr in zip(param_groups, self.base_lrs, strict=True)],
                                     lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.global_batch = cfg.batch_size * self.world
        self.batches_per_epoch = max(len(self.first) // self.global_batch, 1)
        steps_per_epoch = max(self.batches_per_epoch // cfg.grad_accum, 1)
        self.total = cfg.max_steps if cfg.max_steps is not None else max(int(math.ceil(cfg.epochs * steps_per_epoch)),
                                                                          1)
        self.result = FitResult(steps=0, total_steps=self.total, world_size=self.world, rank=self.rank)
        self.best: list[torch.Tensor] | None = None
        self.bad = 0  # validations since the best one
        self.last_saved: int | None = None  # step of the last checkpoint written (or resumed from)
        self.prior_seconds: float | None = 0.0  # training seconds of earlier calls, up to their last checkpoint
        self.started = time.perf_counter()  # restarted when fit's loop begins: this call's training seconds
        self.wrapped = module
        self._epoch: dict[int, tuple[Sequence[Any], list[int]]] = {}

    # ---- resume ---------------------------------------------------------------------------------

    def resume(self) -> None:
        """The optimizer, RNG, losses, validations, early-stopping count and best state of the checkpoint."""
        loaded, result, cfg = self.loaded, self.result, self.cfg
        if loaded is not None:
            keys = loaded.get("optimizer_keys", "index")
            if keys != ("names" if self.by_name else "index"):
                raise InputError(f"checkpoint {loaded.get('path')} keys its optimizer state by {keys}, this run by "
                                 f"{'names' if self.by_name else 'index'} (other trained parameters); remove it to "
                                 "start over")
            load_optimizer_state(self.module, self.opt, loaded["optimizer"], self.by_name)
            set_rng_state(loaded["rng"])
            result.steps = result.start_step = int(loaded["step"])
            seconds = loaded.get("seconds")
            self.prior_seconds = float(seconds) if seconds is not None else (0.0 if result.steps == 0 else None)
            result.train_loss = list(loaded["train_loss"])
            result.evals = [dict(e) for e in loaded["evals"]]
            self.last_saved = result.steps
        self.best = [p.detach().clone() for p in self.params] if cfg.keep_best else None
        for e in result.evals:  # where early stopping and keep-best stood when the checkpoint was written
            if result.best_loss is None or e["loss"] < result.best_loss:
                result.best_loss, result.best_step, self.bad = e["loss"], int(e["step"]), 0
            else:
                self.bad += 1
        if loaded is not None and cfg.keep_best and loaded.get("best") is not None:
            self.best = [like(b, p) for b, p in zip(loaded["best"], self.params, strict=True)]

    def wrap(self) -> None:
        """DDP around the module under torchrun (FSDP shards it instead)."""
        if self.world > 1 and not self.fsdp:
            # the frozen NF4 base is identical on every rank: sync only the trainable gradients
            with warnings.catch_warnings():  # broadcast_buffers=False: also no sync at init (the NF4 base is big)
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.wrapped = torch.nn.parallel.DistributedDataParallel(
                    self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    broadcast_buffers=False)

    # ---- one optimizer step ---------------------------------------------------------------------

    def epoch(self, e: int) -> tuple[Sequence[Any], list[int]]:
        """Epoch ``e``'s examples and order (one epoch kept: accumulation may straddle two)."""
        if e not in self._epoch:
            self._epoch.clear()
            examples = self.first if e == 0 else self.data.examples(e)
            if len(examples) != len(self.first):  # the step -> example map assumes epochs of one size
                raise InputError(f"epoch {e} has {len(examples)} training examples, the first had {len(self.first)}")
            self._epoch[e] = (examples, self.data.order(e, len(examples)))
        return self._epoch[e]

    def micro_batches(self, step: int, loss_fn: Callable[[torch.nn.Module, Sequence[Any]], torch.Tensor]) -> float:
        """Forward and backward of this rank's share of every micro-batch of optimizer step ``step``; its loss."""
        cfg = self.cfg
        micro = step * cfg.grad_accum  # global micro-batch index
        step_loss = 0.0
        for k in range(cfg.grad_accum):
            e, b = divmod(micro + k, self.batches_per_epoch)
            examples, order = self.epoch(e)
            lo = b * self.global_batch + self.rank * cfg.batch_size
            batch = [examples[i] for i in order[lo:lo + cfg.batch_size]]
            last = k == cfg.grad_accum - 1
            if self.fsdp:
                set_gradient_sync(self.module, last)
            sync = contextlib.nullcontext() if self.world == 1 or self.fsdp or last else self.wrapped.no_sync()
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()
            with sync, amp:
                loss = loss_fn(self.wrapped, batch) / cfg.grad_accum
                loss.backward()
            step_loss += float(loss.detach())
        return step_loss

    def agree(self, flag: bool) -> bool:
        """``flag`` of any rank, on every rank (one collective a step under torchrun)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def sync_outside(self, step_loss: float) -> float:
        """Average the gradients DDP does not own (trained parameters outside the module) and the loss over
        ranks: the same mean as over one big batch, and every rank stops alike."""
        if self.world == 1:
            return step_loss
        for p in self.outside:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)
        t = torch.tensor([step_loss], device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def clip_and_check(self, step: int, step_loss: float) -> None:
        """Clip the gradients; a loss or norm that is not finite stops training before the update."""
        cfg = self.cfg
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        if not math.isfinite(step_loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise TrainingDivergedError(
                f"training diverged at step {step + 1}: loss {step_loss}, gradient norm {grad_norm}; the "
                f"parameters were not updated (last checkpoint: step {self.last_saved}). Lower the learning "
                f"rate (now {cfg.lr:g}) or add warm-up steps")

    # ---- validation and checkpoints ---------------------------------------------------------------

    def validate(self, validate: Callable[[], dict[str, float]], step: int) -> bool:
        """Validate, track the best; True when early stopping says stop."""
        result, cfg = self.result, self.cfg
        v = validate()
        result.evals.append({"step": step, **v})
        if result.best_loss is None or v["loss"] < result.best_loss:
            result.best_loss, result.best_step, self.bad = v["loss"], step, 0
            if cfg.keep_best:
                self.best = [p.detach().clone() for p in self.params]
            return False
        self.bad += 1
        return cfg.patience is not None and self.bad >= cfg.patience

    def save(self) -> None:
        """Every rank takes part under FSDP (it gathers the optimizer state and the parameters); rank 0 writes."""
        cfg = self.cfg
        if self.fsdp or self.rank == 0:  # under DDP the other ranks would build a state nobody writes
            state = {**_state(self.result), "seconds": self.seconds_total(),
                     "optimizer": optimizer_state(self.module, self.opt, self.by_name),
                     "optimizer_keys": "names" if self.by_name else "index", "rng": rng_state(),
                     "examples_per_step": self.examples_per_step, "world_size": self.world,
                     "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "total_steps": self.total,
                     "best": [whole(b) for b in self.best] if self.best is not None else None}
            with whole_parameters(self.module) if self.fsdp else contextlib.nullcontext():
                if self.rank == 0:
                    self.checkpointer.save(state)
        self.last_saved = self.result.steps
        if self.world > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint it might be asked to resume from

    def seconds_total(self) -> float | None:
        return None if self.prior_seconds is None else round(self.prior_seconds + time.perf_counter() - self.started, 1)

    def finish(self) -> None:
        """The last checkpoint, the best parameters back (keep_best, finished runs), FSDP released."""
        result = self.result
        if self.checkpointer is not None:  # the parameters as trained so far: a resumed run continues from them
            self.save()
        if self.cfg.keep_best and self.best is not None and result.best_step is not None and result.finished:
            with torch.no_grad():
                for p, b in zip(self.params, self.best, strict=True):
                    p.copy_(b)
        if self.fsdp:
            release(self.module)
        if self.world > 1:
            dist.barrier()


def fit(module: torch.nn.Module, param_groups: Sequence[dict[str, Any]], data: EpochData,
        loss_fn: Callable[[torch.nn.Module, Sequence[Any]], torch.Tensor], cfg: TrainConfig, *,
        validate: Callable[[], dict[str, float]] | None = None, checkpointer: Checkpointer | None = None,
        distributed: bool = True, hf_model: torch.nn.Module | None = None, desc: str = "train",
        callback: Callable[[int, float], None] | None = None, stop_after: int | None = None,
        validate_at_start: bool = False) -> FitResult:
    """Train ``param_groups`` (``{"params": [...], "lr": ...}``; the groups' lr are peak rates) on ``data``.

    ``module`` is what ``loss_fn`` calls (wrapped in DDP when ``distributed`` and under ``torchrun``);
    ``hf_model``: the ``transformers`` model whose activation checkpointing ``grad_checkpointing``
    turns on. ``stop_after``: stop after that many optimizer steps of this call (an interruption,
    for tests). See the module docstring for the rest.
    """
    run = _Run(module, param_groups, data, cfg, checkpointer, distributed, hf_model)
    run.resume()
    result, total = run.result, run.total
    if validate is not None and validate_at_start and result.steps == 0:
        run.validate(validate, 0)
    run.wrap()
    step = result.steps
    stop_at = total if stop_after is None else min(total, step + stop_after)
    module.train()
    run.started = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=desc, disable=not cfg.progress or run.rank != 0)
    interrupted = False
    try:
        with _grad_checkpointing(hf_model, cfg.grad_checkpointing), _stop_requests() as asked:
            while step < stop_at:
                factor = lr_factor(cfg, step, total)
                for g, lr in zip(run.opt.param_groups, run.base_lrs, strict=True):
                    g["lr"] = lr * factor
                run.opt.zero_grad(set_to_none=True)
                step_loss = run.sync_outside(run.micro_batches(step, loss_fn))
                run.clip_and_check(step, step_loss)
                run.opt.step()
                step += 1
                result.train_loss.append(step_loss)
                bar.update(1)
                post = {"loss": f"{step_loss:.4f}"}
                if result.best_loss is not None:
                    post["best_val"] = f"{result.best_loss:.4f}"
                bar.set_postfix(post)
                if callback is not None:
                    callback(step, step_loss)
                stop = False
                if validate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                    stop = run.validate(validate, step)
                    module.train()
                result.steps = step
                if checkpointer is not None and cfg.save_every and step % cfg.save_every == 0:
                    run.save()
                if stop:
                    result.stopped_early = True
                    break
                if run.agree(asked["stop"]):  # every rank stops at the same step boundary
                    interrupted = True
                    break
    finally:
        bar.close()
        module.eval()
        for p in run.params:
            p.requires_grad_(False)
    result.steps = step
    result.seconds = time.perf_counter() - run.started
    result.seconds_total = run.seconds_total()
    run.finish()
    if interrupted:
        raise TrainingInterrupted(step, checkpointer is not None)
    return result


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during :func:`fit`: the step under way finished, a checkpoint holds it (when the run
    has a checkpointer); ``step`` is where a resumed run continues."""

    def __init__(self, step: int, saved: bool) -> None:
        super().__init__(f"interrupted after step {step}" + (", checkpoint written" if saved else ""))
        self.step, self.saved = step, saved


@contextlib.contextmanager
def _stop_requests() -> Any:
    """SIGINT / SIGTERM set a flag instead of killing the loop mid-step (main thread only; elsewhere the
    signals keep their handlers); the previous handlers come back on exit."""
    asked = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def handler(signum: int, frame: Any) -> None:
        if asked["stop"]:  # asked twice: stop now, step or not
            raise KeyboardInterrupt
        asked["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class TrainingDivergedError(XkernError, FloatingPointError):
    """The loss or the gradient stopped being finite; the parameters keep their last finite values."""


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, world: int, examples_per_step: int) -> None:
    """A checkpoint resumes exactly when each optimizer step takes the same examples; else refuse, saying how."""
    before = saved.get("examples_per_step")
    where = saved.get("path", "the checkpoint")
    if before is None or int(before) == examples_per_step:
        return
    was = f"{saved.get('world_size', '?')} process(es) x batch {saved.get('batch_size', '?')} x accumulation " \
          f"{saved.get('grad_accum', '?')}"
    per_rank = int(before) // (world * cfg.grad_accum) if int(before) % (world * cfg.grad_accum) == 0 else None
    hint = f"pass batch_size={per_rank} (--batch-size {per_rank}) to resume with {world} process(es), or " \
        if per_rank else ""
    raise InputError(f"checkpoint {where} was written at {before} examples per optimizer step ({was}); this "
                     f"run takes {examples_per_step} ({world} x {cfg.batch_size} x {cfg.grad_accum}), so the data "
                     f"order would not continue where it stopped: {hint}remove {where} to start over")


def _state(result: FitResult) -> dict[str, Any]:
    return {"step": result.steps, "train_loss": result.train_loss, "evals": result.evals}
