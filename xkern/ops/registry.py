"""Which implementation of an op runs: backends registered per device type, one choice per call.

A *backend* (``torch``, ``cpu``, ``triton``, ``cuda``) is a module in :mod:`xkern.ops.backends` that
registers itself with :func:`register_backend` (the device types it serves, its priority there, and
a probe that says why it cannot run) and its kernels with :func:`register_kernel` (one function per
op stage, optionally with a ``supports(*args)`` predicate for calls it does not handle, such as the
CUDA decode kernel above 16 rows). Every module of that folder is imported by
``xkern/ops/backends/__init__.py``, so adding a backend is adding one file.

:func:`choose` picks the backend of one op stage for one call: the requested one (argument or
``XKERN_BACKEND``) first, then the device's backends by priority; the first that is usable on the
device, has a kernel for the stage and accepts the call wins. Kernels never dispatch again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xkern.errors import BackendUnavailableError, InputError, InputKeyError

ENV_VAR = "XKERN_BACKEND"
_DEVICE_NAMES = {"cuda": "CUDA", "cpu": "CPU"}


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    priority: int  # higher runs first on its device types
    probe: Callable[[torch.device], str | None]  # None: usable on that device; else why not
    description: str = ""
    opt_in_device_types: tuple[str, ...] = ()  # served only when asked for (Triton's CPU interpreter)


@dataclass(frozen=True)
class Kernel:
    fn: Callable[..., Any]
    supports: Callable[..., bool] | None = None


_BACKENDS: dict[str, Backend] = {}
_KERNELS: dict[tuple[str, str], Kernel] = {}


def register_backend(name: str, *, device_types: tuple[str, ...], priority: int,
                     probe: Callable[[torch.device], str | None] | None = None, description: str = "",
                     opt_in_device_types: tuple[str, ...] = ()) -> None:
    """Declare a backend; called once by its module in :mod:`xkern.ops.backends`."""
    if name in _BACKENDS:
        raise InputError(f"backend {name!r} is already registered")
    _BACKENDS[name] = Backend(name, tuple(device_types), priority, probe or (lambda device: None), description,
                              tuple(opt_in_device_types))


def register_kernel(op: str, backend: str, *, supports: Callable[..., bool] | None = None):
    """Decorator: ``fn`` implements op stage ``op`` (e.g. ``"lora_linear.forward"``) on ``backend``."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if backend not in _BACKENDS:
            raise InputError(f"register backend {backend!r} before its kernels")
        if (op, backend) in _KERNELS:
            raise InputError(f"{backend!r} already implements {op!r}")
        _KERNELS[(op, backend)] = Kernel(fn, supports)
        return fn

    return wrap


def backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def kernel(op: str, backend: str) -> Callable[..., Any]:
    """The function registered for ``op`` on ``backend`` (KeyError naming both when there is none)."""
    try:
        return _KERNELS[(op, backend)].fn
    except KeyError:
        raise InputKeyError(f"backend {backend!r} implements no {op!r}") from None


def ops_of(backend: str) -> list[str]:
    return sorted(op for op, b in _KERNELS if b == backend)


def _family(op: str) -> str:
    return op.split(".", 1)[0]


def unusable_reason(backend: str, op: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` (any stage of its family) on ``device``; None when it can."""
    info = _BACKENDS.get(backend)
    if info is None:
        return f"unknown backend {backend!r}; expected one of {tuple(sorted(_BACKENDS))}"
    if device.type not in info.device_types + info.opt_in_device_types:
        kinds = " or ".join(_DEVICE_NAMES.get(t, t) for t in info.device_types)
        return f"backend {backend!r} needs {kinds} tensors, got {device}"
    if not any(b == backend and _family(o) == _family(op) for o, b in _KERNELS):
        return f"backend {backend!r} does not implement {_family(op)!r}"
    return info.probe(device)


def check_backend(backend: str, op: str, device: torch.device) -> None:
    """Raise a clear error when ``backend`` cannot run ``op`` on ``device``."""
    if backend not in _BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {tuple(sorted(_BACKENDS))}")
    reason = unusable_reason(backend, op, device)
    if reason is not None:
        raise BackendUnavailableError(reason)


def requested_backend(explicit: str | None) -> str | None:
    """The backend asked for: the argument, else ``XKERN_BACKEND`` (validated), else None."""
    if explicit is not None:
        return explicit
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced not in _BACKENDS:
        raise InputError(f"{ENV_VAR} must be one of {tuple(sorted(_BACKENDS))}, got {forced!r}")
    return forced or None


def device_order(device: torch.device) -> list[str]:
    """The backends serving ``device`` by default, highest priority first."""
    served = [b for b in _BACKENDS.values() if device.type in b.device_types]
    return [b.name for b in sorted(served, key=lambda b: -b.priority)]


_CANDIDATES: dict[tuple, tuple[str, ...]] = {}  # cleared when a backend or kernel registers


@torch.compiler.assume_constant_result  # torch.compile calls it eagerly and keeps the answer
def _candidates(op: str, device_type: str, requested: str | None, prefer: str | None) -> tuple[str, ...]:
    """The backends that may run ``op`` on ``device_type``, in the order they are tried (cached per key)."""
    key = (op, device_type, requested, prefer, os.environ.get(ENV_VAR, ""), len(_BACKENDS), len(_KERNELS))
    hit = _CANDIDATES.get(key)
    if hit is None:
        hit = _CANDIDATES[key] = _find_candidates(op, device_type, requested, prefer)
    return hit


def _find_candidates(op: str, device_type: str, requested: str | None, prefer: str | None) -> tuple[str, ...]:
    device = torch.device(device_type)
    first = requested_backend(requested)
    if first is not None:
        check_backend(first, op, device)
    head = [b for b in (first, prefer) if b]
    out = []
    for name in dict.fromkeys(head + device_order(device)):
        if (op, name) in _KERNELS and (name == first or unusable_reason(name, op, device) is None):
            out.append(name)
    return tuple(out)


def choose(op: str, device: torch.device, args: tuple = (), requested: str | None = None,
           prefer: str | None = None) -> str:
    """The backend that runs op stage ``op`` for this call (see the module docstring).

    ``requested`` must be able to run the op family on the device (else a clear error); ``prefer``
    (the backend of the forward, when choosing for its backward) is only tried first.
    """
    candidates = _candidates(op, device.type, requested, prefer)
    for name in candidates:
        k = _KERNELS[(op, name)]
        if k.supports is None or k.supports(*args):
            return name
    raise BackendUnavailableError(f"no backend implements {op!r} for {device} tensors (tried {list(candidates)})")


def report(device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """One record per backend: whether it serves ``device``, and why not (for ``xkern env``)."""
    device = torch.device(device)
    order = device_order(device)
    rows = []
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        serves = device.type in b.device_types + b.opt_in_device_types
        reason = b.probe(device) if serves else f"serves {', '.join(b.device_types)} only"
        if serves and reason is None and device.type not in b.device_types:
            reason = "used only when requested (backend= or XKERN_BACKEND)"
        rows.append({"backend": b.name, "device": str(device), "usable": serves and b.probe(device) is None,
                     "default_rank": order.index(b.name) + 1 if b.name in order else None,
                     "why_not": reason, "ops": ops_of(b.name), "description": b.description})
    return rows
