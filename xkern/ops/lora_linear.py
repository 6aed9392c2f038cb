"""``lora_linear``: NF4 base matmul plus several LoRA adapters (one per row), forward and backward.

The public function validates its inputs, groups the rows by adapter (or takes a prebuilt
:class:`~xkern.ops.routing.RowRouting`), chooses the backend once and calls the ``xkern::`` custom
ops, registered with ``torch.library`` (fake implementations for ``torch.compile``, autograd for
``x``, ``lora_A`` and ``lora_B``; the NF4 base is frozen). The custom ops take the NF4 weight as
``NF4Tensor.parts()`` (a tensor list and ``[N, K, blocksize]``), so a change of the NF4 layout
stays in :mod:`xkern.nf4`. The weight gradients are :func:`xkern.ops.reference.lora_weight_grads`
for every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from xkern.errors import InputError, InputTypeError
from xkern.nf4 import NF4Tensor
from xkern.ops import reference, registry
from xkern.ops.checks import FLOAT_DTYPES, check_float, check_one_device, check_precision, check_tensor
from xkern.ops.routing import RowRouting

FORWARD, INPUT_GRAD, DEQUANTIZE = "lora_linear.forward", "lora_linear.input_grad", "dequantize_nf4"


def _routing(ids: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, n_adapters: int) -> RowRouting:
    return RowRouting(ids, order, starts, n_adapters)


@torch.library.custom_op("xkern::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(x: torch.Tensor, weight_parts: list[torch.Tensor], weight_meta: list[int],
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor,
                     order: torch.Tensor, starts: torch.Tensor, backend: str,
                     precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = NF4Tensor.from_parts(weight_parts, weight_meta)
    routing = _routing(ids, order, starts, lora_A.shape[0])
    return registry.kernel(FORWARD, backend)(x, weight, lora_A, lora_B, scale, routing, precision)


@_lora_linear_fwd.register_fake
def _(x, weight_parts, weight_meta, lora_A, lora_B, scale, ids, order, starts, backend, precision):
    return x.new_empty(x.shape[0], weight_meta[0]), x.new_empty(x.shape[0], lora_A.shape[1], dtype=torch.float32)


@torch.library.custom_op("xkern::lora_linear_input_grad", mutates_args=())
def _lora_linear_input_grad(grad_out: torch.Tensor, weight_parts: list[torch.Tensor], weight_meta: list[int],
                            lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor,
                            order: torch.Tensor, starts: torch.Tensor,
                            backend: str, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = NF4Tensor.from_parts(weight_parts, weight_meta)
    routing = _routing(ids, order, starts, lora_A.shape[0])
    dx, g = registry.kernel(INPUT_GRAD, backend)(grad_out.contiguous(), weight, lora_A, lora_B, scale, routing,
                                                 precision)
    return dx.float(), g


@_lora_linear_input_grad.register_fake
def _(grad_out, weight_parts, weight_meta, lora_A, lora_B, scale, ids, order, starts, backend, precision):
    return (grad_out.new_empty(grad_out.shape[0], weight_meta[1], dtype=torch.float32),
            grad_out.new_empty(grad_out.shape[0], lora_A.shape[1], dtype=torch.float32))


@torch.library.custom_op("xkern::lora_weight_grads", mutates_args=())
def _lora_weight_grads(x: torch.Tensor, grad_out: torch.Tensor, xa: torch.Tensor, g: torch.Tensor,
                       scale: torch.Tensor, ids: torch.Tensor, order: torch.Tensor,
                       starts: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``dA``, ``dB`` of every adapter by segment (an op of its own: segments are data-dependent for a tracer)."""
    return reference.lora_weight_grads(x, grad_out, xa, g, scale, _routing(ids, order, starts, starts.shape[0] - 2),
                                       precision)


@_lora_weight_grads.register_fake
def _(x, grad_out, xa, g, scale, ids, order, starts, precision):
    n = starts.shape[0] - 2
    return (x.new_empty(n, xa.shape[1], x.shape[1], dtype=torch.float32),
            x.new_empty(n, grad_out.shape[1], xa.shape[1], dtype=torch.float32))


_SAVED = ("x", "lora_A", "lora_B", "scale", "ids", "order", "starts", "xa")
_DIFFERENTIABLE = {"x": 0, "lora_A": 3, "lora_B": 4}  # positions in the forward op's inputs


def _setup_context(ctx, inputs, output):
    x, weight_parts, weight_meta, lora_A, lora_B, scale, ids, order, starts, backend, precision = inputs
    _, xa = output
    ctx.n_parts = len(weight_parts)
    ctx.save_for_backward(x, lora_A, lora_B, scale, ids, order, starts, xa, *weight_parts)
    ctx.weight_meta, ctx.backend, ctx.precision = weight_meta, backend, precision


def _lora_backward(grad_y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   xa: torch.Tensor, weight: NF4Tensor, backend: str, needs: Sequence[bool],
                   input_grad: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
                   weight_grads: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """The one backward of ``y = x W^T + s[a] (x A[a]^T) B[a]^T``, for the custom op and the eager path alike.

    ``dX = dY W + s (dY B) A`` by the input-grad kernel of the backend chosen for ``grad_y`` (the
    forward's first), which also gives ``g = dY B``; then ``dA = s g^T X`` and ``dB = s dY^T (X A^T)`` by
    segment. ``needs``: which of x, A, B want a gradient. ``input_grad(backend)`` and
    ``weight_grads(g)`` run the two stages: the custom ops under a tracer, the kernels directly in
    eager mode (``torch.library``'s wrapper costs ~150 us a call). Returns ``(dx, dA, dB)``, each in
    its input's dtype or ``None``.
    """
    needs_x, needs_a, needs_b = needs
    dx = d_a = d_b = g = None
    if needs_x or needs_a:
        chosen = registry.choose(INPUT_GRAD, grad_y.device, (grad_y, weight, lora_A, lora_B), prefer=backend)
        dx32, g = input_grad(chosen)
        dx = dx32.to(x.dtype) if needs_x else None
    if needs_a or needs_b:
        if g is None:
            g = xa.new_zeros(xa.shape)
        d_a, d_b = weight_grads(g)
        d_a = d_a.to(lora_A.dtype) if needs_a else None
        d_b = d_b.to(lora_B.dtype) if needs_b else None
    return dx, d_a, d_b


def _backward(ctx, grad_y, grad_xa):
    saved = ctx.saved_tensors
    t = dict(zip(_SAVED, saved[: len(_SAVED)], strict=True))
    weight_parts = list(saved[len(_SAVED):])
    weight = NF4Tensor.from_parts(weight_parts, ctx.weight_meta)
    grad_y = grad_y.contiguous()
    routing = (t["scale"], t["ids"], t["order"], t["starts"])
    dx, d_a, d_b = _lora_backward(
        grad_y, t["x"], t["lora_A"], t["lora_B"], t["xa"], weight, ctx.backend,
        [ctx.needs_input_grad[i] for i in _DIFFERENTIABLE.values()],
        lambda backend: _lora_linear_input_grad(grad_y, weight_parts, ctx.weight_meta, t["lora_A"], t["lora_B"],
                                                *routing, backend, ctx.precision),
        lambda g: _lora_weight_grads(t["x"], grad_y, t["xa"], g, *routing, ctx.precision))
    return dx, [None] * ctx.n_parts, None, d_a, d_b, None, None, None, None, None, None


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerLoraLinear(torch.autograd.Function):
    """The custom ops' forward and :func:`_lora_backward`, for eager training: the kernels called directly
    (``torch.library``'s autograd wrapper costs ~150 us a call, which dominates small layers). Under
    ``torch.compile`` the custom ops run instead, so a tracer sees one opaque op per stage."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, weight, scale, routing, backend, precision):
        y, xa = registry.kernel(FORWARD, backend)(x, weight, lora_A, lora_B, scale, routing, precision)
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.weight, ctx.scale, ctx.routing, ctx.backend = weight, scale, routing, backend
        ctx.precision = precision
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, xa = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        dx, d_a, d_b = _lora_backward(
            grad_y, x, lora_A, lora_B, xa, ctx.weight, ctx.backend, ctx.needs_input_grad[:3],
            lambda backend: registry.kernel(INPUT_GRAD, backend)(grad_y, ctx.weight, lora_A, lora_B, ctx.scale,
                                                                 ctx.routing, ctx.precision),
            lambda g: reference.lora_weight_grads(x, grad_y, xa, g, ctx.scale, ctx.routing, ctx.precision))
        return dx, d_a, d_b, None, None, None, None, None


def _validate(x, weight, lora_A, lora_B, scale, adapter_ids) -> None:
    check_tensor("x", x)
    if not isinstance(weight, NF4Tensor):
        raise InputTypeError(f"weight must be an NF4Tensor (see xkern.quantize_nf4), got {type(weight).__name__}")
    check_float("x", x)
    if len(weight.shape) != 2:
        raise InputError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n_out, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise InputError(f"x has last dimension {x.shape[-1] if x.dim() else None}, weight expects K={k}")
    if not weight.packed.is_contiguous() or not weight.absmax.is_contiguous():
        raise InputError("weight.packed and weight.absmax must be contiguous")
    check_tensor("lora_A", lora_A)
    check_tensor("lora_B", lora_B)
    if lora_A.dim() != 3:
        raise InputError(f"lora_A must be [n_adapters, r, K], got shape {tuple(lora_A.shape)}")
    n_adapters, rank, k_a = lora_A.shape
    if k_a != k:
        raise InputError(f"lora_A has K={k_a}, weight has K={k}")
    if lora_B.dim() != 3 or lora_B.shape != (n_adapters, n_out, rank):
        raise InputError(f"lora_B must be [n_adapters={n_adapters}, N={n_out}, r={rank}], got {tuple(lora_B.shape)}")
    check_float("lora_A", lora_A)
    check_float("lora_B", lora_B)
    devices = {"x": x.device, "weight": weight.device, "lora_A": lora_A.device, "lora_B": lora_B.device}
    if isinstance(scale, torch.Tensor):
        devices["scale"] = scale.device
    if isinstance(adapter_ids, RowRouting):
        devices["adapter_ids"] = adapter_ids.device
    elif adapter_ids is not None:
        devices["adapter_ids"] = check_tensor("adapter_ids", adapter_ids).device
    check_one_device(devices)


def _scale_tensor(scale, n_adapters: int, device: torch.device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.dtype.is_complex or not (scale.dtype.is_floating_point or scale.dtype in (torch.int32, torch.int64)):
            raise InputTypeError(f"scale must be a real tensor, got {scale.dtype}")
        s = scale.detach().float().reshape(-1)
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        s = torch.full((n_adapters,), float(scale), device=device)
    elif isinstance(scale, Sequence) and not isinstance(scale, (str, bytes)):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale):
            raise InputTypeError("scale must be a tensor, a number or a sequence of numbers, got a sequence of "
                            + ", ".join(sorted({type(v).__name__ for v in scale})))
        s = torch.tensor([float(v) for v in scale], dtype=torch.float32, device=device)
    else:
        raise InputTypeError(f"scale must be a tensor, a number or a sequence of numbers, got {type(scale).__name__}")
    if s.numel() == 1 and n_adapters != 1:
        s = s.expand(n_adapters)
    if s.numel() != n_adapters:
        raise InputError(f"scale has {s.numel()} entries, expected n_adapters={n_adapters}")
    return s.contiguous()


def _row_routing(adapter_ids: torch.Tensor | RowRouting | None, m: int, n_adapters: int,
                 device: torch.device) -> RowRouting:
    if adapter_ids is None:
        return RowRouting.base_only(m, n_adapters, device)
    if isinstance(adapter_ids, RowRouting):
        if adapter_ids.rows != m:
            raise InputError(f"the routing covers {adapter_ids.rows} rows, x has {m}")
        if adapter_ids.n_adapters != n_adapters:
            raise InputError(f"the routing indexes {adapter_ids.n_adapters} adapters, the bank has {n_adapters}")
        return adapter_ids
    if adapter_ids.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8) \
            and adapter_ids.numel() != m:
        raise InputError(f"adapter_ids has {adapter_ids.numel()} entries, x has {m} rows")
    return RowRouting.build(adapter_ids, n_adapters)


def lora_linear(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: torch.Tensor | float | Sequence[float],
                adapter_ids: torch.Tensor | RowRouting | None = None, *, backend: str | None = None,
                precision: str = "native") -> torch.Tensor:
    """``y[m] = x[m] W^T + scale[a] * (x[m] A[a]^T) B[a]^T`` with ``a = adapter_ids[m]`` (``-1``: base only).

    Args:
        x: ``[..., K]`` activations (float32, float16 or bfloat16).
        weight: the frozen NF4 base weight ``[N, K]``.
        lora_A: ``[n_adapters, r, K]``; ranks that differ per adapter are zero-padded to ``r``.
        lora_B: ``[n_adapters, N, r]``.
        scale: per-adapter scale (``lora_alpha / r`` in PEFT), a tensor ``[n_adapters]``, a number or a list.
        adapter_ids: one integer per row of the flattened ``x``, any order (``None`` = base only), or a
            :class:`~xkern.ops.routing.RowRouting` built once for many calls on the same rows.
        backend: force a backend (``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``; default
            ``XKERN_BACKEND`` or the device's best).
        precision: ``"native"`` (16-bit activations multiplied in their own dtype with float32
            accumulation, the weight rounded to it once: bitsandbytes' and PEFT's semantics) or
            ``"exact"`` (float32 products for every dtype); see ``xkern.ops.checks.PRECISIONS``.

    Returns ``[..., N]`` in ``x.dtype``. Differentiable in ``x``, ``lora_A`` and ``lora_B``.
    """
    _validate(x, weight, lora_A, lora_B, scale, adapter_ids)
    precision = check_precision(precision)
    n_out, k = weight.shape
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    routing = _row_routing(adapter_ids, x2d.shape[0], lora_A.shape[0], x.device)
    s = _scale_tensor(scale, lora_A.shape[0], x.device)
    chosen = registry.choose(FORWARD, x.device, (x2d, weight, lora_A, lora_B), requested=backend)
    if torch.compiler.is_compiling():
        parts, meta = weight.parts()
        y, _ = _lora_linear_fwd(x2d, parts, meta, lora_A, lora_B, s, routing.ids, routing.order, routing.starts,
                                chosen, precision)
    elif torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad):
        y = _EagerLoraLinear.apply(x2d, lora_A, lora_B, weight, s, routing, chosen, precision)
    else:  # inference: nothing to record for autograd or a tracer, so no custom-op dispatch (~40 us a call)
        y, _ = registry.kernel(FORWARD, chosen)(x2d, weight, lora_A, lora_B, s, routing, precision)
    return y.reshape(*x.shape[:-1], n_out)


def dequantize(weight: NF4Tensor, dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Dequantize ``weight`` with the chosen backend (native CPU, Triton or the torch reference)."""
    if not isinstance(weight, NF4Tensor):
        raise InputTypeError(f"weight must be an NF4Tensor, got {type(weight).__name__}")
    dtype = dtype or weight.dtype
    if dtype not in FLOAT_DTYPES:
        raise InputTypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    chosen = registry.choose(DEQUANTIZE, weight.device, (weight, dtype), requested=backend)
    return registry.kernel(DEQUANTIZE, chosen)(weight, dtype)
