"""``RowRouting``: which adapter each row of a batch uses, grouped by adapter, built once and read by every layer.

The layout is vLLM's ``LoRAKernelMeta`` / Punica's SGMV segments: the per-row ids, the rows stably
sorted by adapter, and the start of each adapter's segment in that order. ``starts`` has a fixed
size (``n_adapters + 2``, slot 0 for base-only rows), so building it needs no host sync and its
shape does not depend on the batch (what CUDA graphs need). A model builds one per forward (see
:mod:`xkern.nn.routing`) and every linear layer hands it to :func:`xkern.ops.lora_linear`, so the
sort happens once, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xkern.errors import InputError, InputTypeError

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class RowRouting:
    """Rows grouped by adapter.

    Attributes:
        ids: int32 ``[M]``, the adapter slot of each row (``-1``: base only).
        order: int32 ``[M]``, row indices stably sorted by ``ids`` (base rows first).
        starts: int32 ``[n_adapters + 2]``: rows ``order[starts[j]:starts[j + 1]]`` use adapter ``j - 1``.
        n_adapters: slots of the adapter bank the ids index.
    """

    ids: torch.Tensor
    order: torch.Tensor
    starts: torch.Tensor
    n_adapters: int

    @property
    def rows(self) -> int:
        return self.ids.numel()

    @property
    def device(self) -> torch.device:
        return self.ids.device

    @classmethod
    def build(cls, ids: torch.Tensor, n_adapters: int) -> RowRouting:
        """Group ``ids`` (any integer dtype and shape, flattened; ``-1`` = base); values are checked on the CPU."""
        if not isinstance(ids, torch.Tensor):
            raise InputTypeError(f"adapter_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in _INT_DTYPES:
            raise InputTypeError(f"adapter_ids must be an integer tensor, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.numel() and not torch.compiler.is_compiling():
            if flat.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # no host sync inside a graph capture: checked on the device (a failure there ends the CUDA
                # context, so the warm-up call before a capture, which takes the branch below, is what raises)
                torch._assert_async(((flat >= -1) & (flat < n_adapters)).all(), "adapter_ids out of range")
            else:  # one small host read per routing (built once per model call): a clear error, a live context
                lo, hi = torch.stack([flat.min(), flat.max()]).tolist()
                if lo < -1 or hi >= n_adapters:
                    raise InputError(f"adapter_ids must lie in [-1, {n_adapters - 1}], got values in [{lo}, {hi}]")
        ids32 = flat.to(torch.int32).contiguous()
        order = torch.argsort(ids32, stable=True).to(torch.int32)
        slot = (ids32.long() + 1).clamp(0, n_adapters)  # scatter_add, not bincount: no host sync on a GPU
        counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=flat.device).scatter_add_(
            0, slot, torch.ones_like(slot))
        starts = torch.zeros(n_adapters + 2, dtype=torch.int32, device=flat.device)
        starts[1:] = torch.cumsum(counts[: n_adapters + 1], 0)
        return cls(ids32, order.contiguous(), starts, int(n_adapters))

    @classmethod
    def base_only(cls, rows: int, n_adapters: int, device: torch.device | str = "cpu") -> RowRouting:
        """Every row base-only (no sort needed)."""
        starts = torch.full((n_adapters + 2,), rows, dtype=torch.int32, device=device)
        starts[0] = 0
        return cls(torch.full((rows,), -1, dtype=torch.int32, device=device),
                   torch.arange(rows, dtype=torch.int32, device=device), starts, int(n_adapters))

    def to(self, device: torch.device | str) -> RowRouting:
        device = torch.device(device)
        if self.device == device:
            return self
        return RowRouting(self.ids.to(device), self.order.to(device), self.starts.to(device), self.n_adapters)

    def sorted_ids(self) -> torch.Tensor:
        """``ids[order]`` (int32), the adapter of each position in the sorted order; computed once per routing
        (a device gather, no host sync) and shared by every layer that reads it."""
        cached = self.__dict__.get("_sorted_ids")
        if cached is None:
            cached = self.ids[self.order.long()].contiguous()
            object.__setattr__(self, "_sorted_ids", cached)
        return cached

    def segments(self) -> list[tuple[int, torch.Tensor | slice]]:
        """``(adapter, rows)`` of every non-empty adapter segment; ``rows`` is a ``slice`` when the segment's
        rows are consecutive in the batch (samples keep their tokens together, X-Cross stacks streams),
        else an index tensor. Read on the host once per routing (cached): for CPU code and tests."""
        cached = self.__dict__.get("_segments")
        if cached is not None:
            return cached
        starts = self.starts.tolist()
        out: list[tuple[int, torch.Tensor | slice]] = []
        for j in range(1, self.n_adapters + 1):
            s0, s1 = starts[j], starts[j + 1]
            if s1 == s0:
                continue
            rows = self.order[s0:s1]
            first, last = int(rows[0]), int(rows[-1])
            out.append((j - 1, slice(first, last + 1) if last - first == s1 - s0 - 1 else rows.long()))
        object.__setattr__(self, "_segments", out)
        return out
