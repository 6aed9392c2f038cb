"""Per-forward adapter routing: which adapter each sample uses, set for the length of one model call.

:class:`XkernModel` turns ``adapter_names`` into an immutable :class:`SampleRouting` and enters it
with :func:`routing_scope` around the wrapped model's forward (or ``generate``). Each
:class:`~xkern.nn.linear.NF4LoRALinear` reads it with :func:`current_routing` and asks it for the
:class:`~xkern.ops.routing.RowRouting` of its input: that object (rows sorted by adapter, segment
starts) is built once per (adapter set, row count) and shared by every layer of the call, so a
30-layer model sorts its rows once, not 210 times. Nothing stays set after the call; activation
checkpointing re-enters the routing of the forward during recomputation through
:func:`checkpoint_context_fn`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from xkern.errors import InputError
from xkern.ops.routing import RowRouting

# Device copies of row routings, shared by all calls with the same (adapters, names, shape, device): a
# forward captured in a CUDA graph then builds nothing and copies nothing host-to-device (the warm-up call
# before the capture fills it). Bounded; the key holds only names, ints and the device.
_DEVICE_ROWS: dict[tuple, RowRouting] = {}

_CURRENT: contextvars.ContextVar[SampleRouting | None] = contextvars.ContextVar("xkern_routing", default=None)


@dataclass(frozen=True, eq=False)
class SampleRouting:
    """The adapter name of each sample of one call (``None`` entries never occur: base is ``BASE``)."""

    names: tuple[str, ...]
    _rows: dict = field(default_factory=dict, repr=False)  # (active, n_samples, rows_per_sample, device) -> RowRouting

    def active(self, available: Sequence[str] | dict) -> tuple[str, ...]:
        """The adapters of this call that a layer holding ``available`` serves, sorted (its bank's slots)."""
        return tuple(sorted(set(self.names) & set(available)))

    def rows(self, active: tuple[str, ...], x: torch.Tensor, layer_name: str = "?") -> RowRouting:
        """The row routing of an input ``x [n_samples, ..., K]`` for a bank of ``active`` adapters (cached)."""
        names = self.names
        n_samples = x.shape[0] if x.dim() > 1 else 1
        if n_samples == 1 and len(names) > 1:
            # an input shared by the whole batch (DeBERTa's relative-position embeddings go through
            # query/key projections with batch 1): it can carry one adapter only
            if len(set(names)) > 1:
                raise InputError(f"layer {layer_name} got one input shared by all {len(names)} samples, so the "
                                 f"batch must use one adapter, got {sorted(set(names))}")
            names = names[:1]
        if n_samples % len(names) != 0:
            raise InputError(f"batch of {n_samples} samples but {len(names)} adapter names were given")
        rows_per_sample = math.prod(x.shape[1:-1]) if x.dim() > 1 else 1
        key = (active, names, n_samples, rows_per_sample, x.device)
        cached = self._rows.get(key) or _DEVICE_ROWS.get(key)
        if cached is None:
            slot = {n: i for i, n in enumerate(active)}
            per_name = [slot.get(n, -1) for n in names]
            repeat = n_samples // len(names)  # generate() expands each prompt (beams, num_return_sequences)
            ids = torch.tensor(per_name, dtype=torch.int32).repeat_interleave(repeat * rows_per_sample)
            cached = RowRouting.build(ids, len(active)).to(x.device)
            if x.device.type == "cuda":  # kept across calls: a call replayed from a CUDA graph copies nothing
                if len(_DEVICE_ROWS) >= 256:
                    _DEVICE_ROWS.pop(next(iter(_DEVICE_ROWS)))
                _DEVICE_ROWS[key] = cached
            self._rows[key] = cached
        return cached


def device_routings() -> tuple[RowRouting, ...]:
    """The device row routings cached now (what a CUDA graph captured now may point to)."""
    return tuple(_DEVICE_ROWS.values())


def current_routing() -> SampleRouting | None:
    """The routing of the model call in progress (None outside one, or when every sample is base-only)."""
    return _CURRENT.get()


@contextlib.contextmanager
def routing_scope(routing: SampleRouting | None) -> Iterator[None]:
    """Make ``routing`` the current one inside the block (nesting restores the outer one)."""
    token = _CURRENT.set(routing)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def checkpoint_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: recompute under the routing of the original forward."""
    return contextlib.nullcontext(), routing_scope(current_routing())
