"""Resumable checkpoints on disk: one directory per run that a killed process never leaves half written.

A checkpoint directory holds the trained parameters (in a format of the subclass's choice), the
optimizer and RNG state (``optimizer.safetensors``, its tensors, and ``optimizer.json``, the rest of
its structure: nothing is pickled, so loading a checkpoint cannot run code) and the loop's position
(``state.json``, written last: a directory that holds it is whole). :class:`DirectoryCheckpoint` does
the writing and reading; subclasses say how their parameters are stored: :class:`ParameterCheckpoint` (named tensors in
safetensors, any module) here, the PEFT adapter of ``train_lora`` in :mod:`xkern.train.trainer`.

The state records the examples per optimizer step (batch x processes x accumulation), so a run can
resume under another world size exactly when that product is the same; the optimizer state is keyed
by parameter name where the loop can (see :func:`xkern.train.sharding.optimizer_state`), so a
checkpoint written under FSDP loads into one process and back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xkern.errors import FormatError, InputError, InputTypeError
from xkern.fileio import atomic_path, atomic_write_text

STATE_NAME = "state.json"  # written last: a checkpoint directory holding it is whole
BLOB_NAME = "optimizer"  # optimizer.safetensors (the tensors) + optimizer.json (the structure around them)
BLOB_KEYS = ("optimizer", "rng", "best")  # what goes to the blob (tensors inside); the rest is state.json
PICKLED_BLOB = "optimizer.pt"  # what checkpoints written before held; refused, never unpickled


def split_tensors(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``obj`` (dicts with any keys, lists, tuples, tensors, numpy arrays, numbers, strings, None) as a
    JSON-ready skeleton and the tensors it held, keyed by position; :func:`join_tensors` inverts it."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous()
            return {"tensor": key}
        if isinstance(x, np.ndarray):
            key = str(len(tensors))
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x))
            return {"ndarray": key}
        if isinstance(x, dict):
            return {"dict": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"tuple" if isinstance(x, tuple) else "list": [walk(v) for v in x]}
        if isinstance(x, np.generic):
            return walk(x.item())
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"value": x}
        raise InputTypeError(f"cannot store a {type(x).__name__} in a checkpoint")

    return walk(obj), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The object :func:`split_tensors` took apart; a skeleton of any other shape is refused (``ValueError``)."""
    def walk(node: Any) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            raise InputError(f"unexpected node {str(node)[:60]!r}")
        (kind, v), = node.items()
        if kind == "tensor":
            return tensors[v]
        if kind == "ndarray":
            return tensors[v].numpy()
        if kind == "dict":
            return {walk(k): walk(x) for k, x in v}
        if kind in ("list", "tuple"):
            items = [walk(x) for x in v]
            return tuple(items) if kind == "tuple" else items
        if kind == "value" and (v is None or isinstance(v, (bool, int, float, str))):
            return v
        raise InputError(f"unexpected node kind {kind!r}")

    return walk(skeleton)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resumable_checkpoint(ckpt: str | os.PathLike) -> Path | None:
    """The whole checkpoint at ``ckpt``, or the previous one a killed save left beside it; ``None`` if neither."""
    ckpt = Path(ckpt)
    for candidate in (ckpt, ckpt.with_name(ckpt.name + ".old")):
        if (candidate / STATE_NAME).is_file():
            return candidate
    return None


def identity_differences(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """The fields in which a checkpoint's run identity and this run's differ (``saved`` None: every field)."""
    if saved is None:
        return sorted(now)
    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))


def discard(ckpt: str | os.PathLike) -> None:
    """Remove a checkpoint and what a killed save left beside it (``--overwrite``: the run starts over)."""
    ckpt = Path(ckpt)
    for path in (ckpt, *(ckpt.with_name(ckpt.name + end) for end in (".old", ".tmp"))):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)


class RunLock:
    """``<folder>/.xkern.lock`` for the length of a run: a second run writing into the same folder is refused
    (naming the process that holds it); a lock whose process is gone is taken over."""

    NAME = ".xkern.lock"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / self.NAME

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise InputError(f"another xkern run (process {pid}) is writing into {self.path.parent}; wait for "
                                     f"it, or give another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise InputError(f"cannot take the lock {self.path}")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryCheckpoint:
    """The :class:`~xkern.train.loop.Checkpointer` of one run under ``ckpt``; subclasses store the parameters.

    ``identity``: what makes the run the run it is (command, model, data, domains, seed, training and
    adapter config, a fingerprint of the training examples); it is written with every checkpoint, and a
    checkpoint whose identity differs in any field is refused, naming the fields, instead of resumed.
    """

    def __init__(self, ckpt: str | os.PathLike, resume: bool = True, identity: dict[str, Any] | None = None) -> None:
        self.ckpt, self.resume = Path(ckpt), resume
        self.identity = None if identity is None else json.loads(json.dumps(identity, default=str))

    # ---- what a subclass provides ---------------------------------------------------------------

    def write_params(self, folder: Path) -> None:
        raise NotImplementedError

    def read_params(self, folder: Path) -> None:
        """Copy the stored parameters into the live ones (checking names and shapes)."""
        raise NotImplementedError

    # ---- the Checkpointer protocol --------------------------------------------------------------

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (the loop's; ``optimizer`` and ``rng`` go to ``optimizer.pt``) and the parameters.

        The new checkpoint is built in ``<ckpt>.tmp`` (``state.json`` last), the current one steps aside
        to ``<ckpt>.old``, the new one takes its name, and only then is the old one removed; a process
        killed at any instant leaves one whole checkpoint that :func:`resumable_checkpoint` finds.
        """
        ckpt = self.ckpt
        tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
        if tmp.exists():  # left by a save that was killed before it finished
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            self._write(tmp, state)
        except BaseException:  # disk full, a read-only folder, ...: no half-written tmp left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if (ckpt / STATE_NAME).is_file():
            if old.exists():
                shutil.rmtree(old)
            ckpt.rename(old)
        elif ckpt.exists():  # a partial directory that never held a whole checkpoint
            shutil.rmtree(ckpt)
        tmp.rename(ckpt)
        if old.exists():
            shutil.rmtree(old)

    def _write(self, tmp: Path, state: dict[str, Any]) -> None:
        self.write_params(tmp)
        from safetensors.torch import save_file

        blob = {k: state[k] for k in BLOB_KEYS if k in state}
        skeleton, tensors = split_tensors(blob)
        with atomic_path(tmp / f"{BLOB_NAME}.safetensors") as part:
            save_file(tensors, str(part))
        atomic_write_text(tmp / f"{BLOB_NAME}.json", json.dumps(skeleton) + "\n")
        rest = {k: v for k, v in state.items() if k not in blob}
        if self.identity is not None:
            rest["identity"] = self.identity
        atomic_write_text(tmp / STATE_NAME, json.dumps(rest, indent=2) + "\n")

    def load(self) -> dict[str, Any] | None:
        """Restore the parameters and return the loop state (with ``optimizer`` and ``rng``), or ``None``."""
        for path in (self.ckpt, *(self.ckpt.with_name(self.ckpt.name + end) for end in (".old", ".tmp"))):
            if path.is_symlink():  # its files would be written, renamed and removed through the link
                raise InputError(f"{path} is a symbolic link; a checkpoint folder must be a real folder (remove the "
                                 "link)")
        found = resumable_checkpoint(self.ckpt) if self.resume else None
        if found is None:
            return None
        try:
            state = json.loads((found / STATE_NAME).read_text())
            state["step"] = int(state["step"])
            state["train_loss"] = [float(x) for x in state["train_loss"]]
            if "evals" not in state:  # checkpoints written before the loop kept whole validation records
                state["evals"] = [{"step": int(s), "loss": float(v)} for s, v in state.pop("eval_loss")]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{found / STATE_NAME} is damaged ({e!r}); remove {found} to start over") from e
        if self.identity is not None:
            differ = identity_differences(state.get("identity"), self.identity)
            if differ:
                shown = ", ".join(f"{k} (was {str((state.get('identity') or {}).get(k))[:60]!r}, now "
                                  f"{str(self.identity.get(k))[:60]!r})" for k in differ[:4])
                raise InputError(f"{found} holds another run's checkpoint: it differs in {shown}"
                                 + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
                                 + "; pass --overwrite to start over, or another --out")
        if (found / PICKLED_BLOB).exists() and not (found / f"{BLOB_NAME}.json").exists():
            raise FormatError(f"{found} was written by an older xkern (its optimizer state is pickled in "
                              f"{PICKLED_BLOB}, which xkern no longer loads: unpickling can run code); remove "
                              f"{found} to start over")
        self.read_params(found)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            skeleton = json.loads((found / f"{BLOB_NAME}.json").read_text())
            blob = join_tensors(skeleton, load_file(str(found / f"{BLOB_NAME}.safetensors")))
            state["optimizer"], state["rng"], state["best"] = blob["optimizer"], blob["rng"], blob.get("best")
        except (SafetensorError, RuntimeError, OSError, KeyError, ValueError, TypeError) as e:  # missing, torn, alien
            raise FormatError(f"{found / BLOB_NAME}.safetensors / .json is damaged ({type(e).__name__}); remove "
                              f"{found} to start over") from e
        state["path"] = str(found)
        return state


class ParameterCheckpoint(DirectoryCheckpoint):
    """Checkpoints of named tensors (``params.safetensors``): X-Cross's integrators, head and co-trained LoRA."""

    FILE = "params.safetensors"

    def __init__(self, params: dict[str, torch.nn.Parameter], ckpt: str | os.PathLike, resume: bool = True,
                 identity: dict[str, Any] | None = None) -> None:
        super().__init__(ckpt, resume, identity)
        self.params = params

    def write_params(self, folder: Path) -> None:
        from safetensors.torch import save_file

        with atomic_path(folder / self.FILE) as part:
            save_file({k: p.detach().cpu().contiguous() for k, p in self.params.items()}, str(part))

    def read_params(self, folder: Path) -> None:
        from safetensors.torch import load_file

        try:
            saved = load_file(str(folder / self.FILE))
        except (OSError, RuntimeError, ValueError) as e:  # missing, truncated or not safetensors
            raise FormatError(f"{folder / self.FILE} is damaged or missing ({e}); remove {folder} to start "
                              "over") from e
        if set(saved) != set(self.params):
            missing, extra = sorted(set(self.params) - set(saved)), sorted(set(saved) - set(self.params))
            raise FormatError(f"checkpoint {folder} holds other parameters than this run trains (missing "
                              f"{missing[:3]}, unexpected {extra[:3]}); remove it to start over")
        with torch.no_grad():
            for k, p in self.params.items():
                if saved[k].shape != p.shape:
                    raise FormatError(f"checkpoint {folder}: {k} has shape {tuple(saved[k].shape)}, this run's "
                                      f"has {tuple(p.shape)}; remove it to start over")
                p.copy_(saved[k])
