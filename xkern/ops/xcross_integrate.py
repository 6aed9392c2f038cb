"""``xcross_integrate``: the X-Cross integrator that mixes n adapter streams per token, forward and backward.

The public function validates its inputs, views ``h`` as ``[n, T, d]``, chooses the backend once
(see :mod:`xkern.ops.registry`) and calls the ``xkern::`` custom ops, registered with
``torch.library`` (fake implementations for ``torch.compile``, autograd for ``h``, ``w_concat`` and
``bias``). The weight gradients (two reductions over the tokens) are computed by the reference for
every backend.
"""

from __future__ import annotations

import torch

from xkern.errors import InputError, InputTypeError
from xkern.ops import registry
from xkern.ops import xcross_reference as reference
from xkern.ops.checks import FLOAT_DTYPES, check_one_device

FORWARD, INPUT_GRAD = "xcross_integrate.forward", "xcross_integrate.input_grad"


# --------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("xkern::xcross_integrate_fwd", mutates_args=())
def _xcross_fwd(h: torch.Tensor, w_concat: torch.Tensor, bias: torch.Tensor | None, beta: float, gamma: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return registry.kernel(FORWARD, backend)(h, w_concat, bias, beta, gamma)


@_xcross_fwd.register_fake
def _(h, w_concat, bias, beta, gamma, backend):
    return h.new_empty(h.shape), h.new_empty(h.shape[1], w_concat.shape[0], dtype=reference.compute_dtype(h.dtype))


@torch.library.custom_op("xkern::xcross_integrate_input_grad", mutates_args=())
def _xcross_input_grad(grad_out: torch.Tensor, h: torch.Tensor, w_concat: torch.Tensor, z: torch.Tensor,
                       beta: float, gamma: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return registry.kernel(INPUT_GRAD, backend)(grad_out, h, w_concat, z, beta, gamma)


@_xcross_input_grad.register_fake
def _(grad_out, h, w_concat, z, beta, gamma, backend):
    return h.new_empty(h.shape), z.new_empty(z.shape)


def _setup_context(ctx, inputs, output):
    h, w_concat, bias, beta, gamma, backend = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(h, w_concat, z)
    ctx.beta, ctx.gamma, ctx.backend = beta, gamma, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out, grad_z):
    h, w_concat, z = ctx.saved_tensors
    needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
    dh = dw = dbias = None
    if needs_h or needs_w or needs_b:
        backend = registry.choose(INPUT_GRAD, h.device, (grad_out, h), prefer=ctx.backend)
        dh, dz = _xcross_input_grad(grad_out, h, w_concat, z, ctx.beta, ctx.gamma, backend)
        if needs_w or needs_b:
            dw, dbias = reference.xcross_weight_grads(h, dz)
            dw = dw.to(w_concat.dtype) if needs_w else None
            dbias = dbias.to(ctx.bias_dtype) if needs_b else None
        if not needs_h:
            dh = None
    return dh, dw, dbias, None, None, None


_xcross_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- public function

def _validate(h, w_concat, beta, gamma, bias) -> tuple[int, int]:
    for name, t in (("h", h), ("w_concat", w_concat)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise InputTypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, v in (("beta", beta), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputTypeError(f"{name} must be a python float, got {type(v).__name__}")
    if h.dim() < 2:
        raise InputError(f"h must be [n, ..., d] (n streams first, features last), got shape {tuple(h.shape)}")
    n, d = h.shape[0], h.shape[-1]
    if n < 2:
        raise InputError(f"h must stack n >= 2 streams on dim 0, got n={n}")
    if d < 1:
        raise InputError(f"h must have a non-empty feature dimension, got d={d}")
    for name, t in (("h", h), ("w_concat", w_concat), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise InputTypeError(f"{name} must be float32, float16 or bfloat16 (float64: torch backend), got {t.dtype}")
    p = 2 * n * (n - 1)
    if w_concat.dim() != 2 or tuple(w_concat.shape) != (p, n * d):
        raise InputError(f"w_concat must be [2n(n-1), n*d] = [{p}, {n * d}] for n={n}, d={d}, "
                         f"got shape {tuple(w_concat.shape)}")
    if bias is not None and tuple(bias.shape) != (p,):
        raise InputError(f"bias must be [2n(n-1)] = [{p}] for n={n}, got shape {tuple(bias.shape)}")
    devices = {"h": h.device, "w_concat": w_concat.device}
    if bias is not None:
        devices["bias"] = bias.device
    check_one_device(devices)
    for name, t in (("w_concat", w_concat), ("bias", bias)):
        if t is not None and t.dtype != h.dtype:
            raise InputTypeError(f"{name} must have h's dtype {h.dtype}, got {t.dtype}")
    return n, d


def xcross_integrate(h: torch.Tensor, w_concat: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
                     bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """X-Cross integrator: mix n streams per token, ``h~ = C(z) h`` with ``z = w_concat [h_1; ...; h_n] (+ bias)``.

    ``h~_m = h_m + sum_{m' != m} (beta zd[m, m'] h_m' + gamma zi[m, m'] (h_m - h_m'))``, where ``zd``
    (first ``n(n-1)`` entries of ``z``) and ``zi`` (next ``n(n-1)``) are ordered m-major, then
    ``m' != m`` ascending (n=3: (0,1), (0,2), (1,0), (1,2), (2,0), (2,1)).

    Args:
        h: ``[n, ..., d]`` the n streams' hidden states (the same tokens in every stream);
            float32, float16 or bfloat16 (float64 on the torch backend).
        w_concat: ``[2n(n-1), n*d]``, h's dtype and device.
        beta, gamma: python floats weighting the direct (``zd``) and difference (``zi``) terms.
        bias: optional ``[2n(n-1)]`` added to ``z``.
        backend: force ``"torch"`` or ``"triton"`` (default: ``XKERN_BACKEND`` or by device).

    Returns ``h~`` with ``h``'s shape and dtype. Differentiable in ``h``, ``w_concat`` and ``bias``.
    """
    n, d = _validate(h, w_concat, beta, gamma, bias)
    chosen = registry.choose(FORWARD, h.device, (h, w_concat), requested=backend)
    h3 = h.reshape(n, h.numel() // (n * d), d)
    if bias is not None:
        bias = bias.contiguous()
    out, _ = _xcross_fwd(h3, w_concat, bias, float(beta), float(gamma), chosen)
    return out.reshape(h.shape)
