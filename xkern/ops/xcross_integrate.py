"""``xcross_integrate``: the X-Cross integrator that mixes n adapter streams per token, forward and backward.

The public function validates its inputs, views ``h`` as ``[n, T, d]`` and calls the ``xkern::``
custom ops, registered with ``torch.library`` (fake implementations for ``torch.compile``, autograd
for ``h``, ``w_concat`` and ``bias``). The ops dispatch (op name ``"xcross_integrate"``, see
:mod:`xkern.ops.dispatch`) to the Triton kernels of :mod:`xkern.kernels.xcross` or the torch
reference of :mod:`xkern.ops.xcross_reference`. The weight gradients (two reductions over the
tokens) are computed by the reference for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xkern.ops import xcross_reference as reference
from xkern.ops.dispatch import check_backend, select_backend, triton_interpreter_enabled

_OP = "xcross_integrate"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------- Triton launchers

@dataclass(frozen=True)
class XCrossLaunchConfig:
    block_t: int = 16
    block_d: int = 128
    num_warps: int = 4


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def default_config(n: int, d: int, device: torch.device) -> XCrossLaunchConfig:
    """One token block of 16 (the ``tl.dot`` minimum) per program; ``d`` in chunks sized to keep the
    ``[n_pad, 16, block_d]`` float32 tiles in registers. The CPU interpreter uses small chunks."""
    if device.type != "cuda":
        return XCrossLaunchConfig(block_t=16, block_d=16, num_warps=1)
    n_pad = _next_pow2(n)
    cap = 128 if n_pad <= 4 else (64 if n_pad <= 8 else 32)
    return XCrossLaunchConfig(block_t=16, block_d=max(16, min(cap, _next_pow2(d))), num_warps=4)


def _store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The CPU interpreter truncates float32 -> bfloat16 casts; there, store float32 and let torch round."""
    if device.type == "cpu" and dtype == torch.bfloat16 and triton_interpreter_enabled():
        return torch.float32
    return dtype


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation of the launchers (tests poison it to prove that every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_p(n: int) -> int:
    return max(16, _next_pow2(2 * n * (n - 1)))


def _check_triton_dtype(dtype: torch.dtype) -> None:
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend 'triton' supports float32, float16 and bfloat16 inputs, got {dtype}")


def triton_forward(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, beta: float, gamma: float,
                   config: XCrossLaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused launch: ``(h~ [n, T, d] in h.dtype, z [T, P] float32)``."""
    import triton

    from xkern.kernels.xcross import xcross_fwd_kernel

    _check_triton_dtype(h.dtype)
    n, t, d = h.shape
    p = 2 * n * (n - 1)
    out = _empty((n, t, d), _store_dtype(h.dtype, h.device), h.device)
    z = _empty((t, p), torch.float32, h.device)
    if t == 0:
        return out.to(h.dtype), z
    cfg = config or default_config(n, d, h.device)
    grid = (triton.cdiv(t, cfg.block_t),)
    xcross_fwd_kernel[grid](
        h, w, w if bias is None else bias, out, z,
        t, d, float(beta), float(gamma),
        h.stride(0), h.stride(1), h.stride(2),
        w.stride(0), w.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        N=n, N_PAD=_next_pow2(n), HAS_BIAS=bias is not None,
        LOW_PRECISION_DOT=h.is_cuda and h.dtype != torch.float32,
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_P=_block_p(n), num_warps=cfg.num_warps,
    )
    return out.to(h.dtype), z


def triton_input_grad(grad_out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, z: torch.Tensor, beta: float,
                      gamma: float, config: XCrossLaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: ``(dh [n, T, d] in h.dtype, dz [T, P] float32)``."""
    import triton

    from xkern.kernels.xcross import xcross_bwd_kernel

    _check_triton_dtype(h.dtype)
    n, t, d = h.shape
    p = 2 * n * (n - 1)
    dh = _empty((n, t, d), _store_dtype(h.dtype, h.device), h.device)
    dz = _empty((t, p), torch.float32, h.device)
    if t == 0:
        return dh.to(h.dtype), dz
    z = z.float().contiguous()
    cfg = config or default_config(n, d, h.device)
    grid = (triton.cdiv(t, cfg.block_t),)
    xcross_bwd_kernel[grid](
        grad_out, h, w, z, dh, dz,
        t, d, float(beta), float(gamma),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        h.stride(0), h.stride(1), h.stride(2),
        w.stride(0), w.stride(1),
        dh.stride(0), dh.stride(1), dh.stride(2),
        N=n, N_PAD=_next_pow2(n),
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_P=_block_p(n), num_warps=cfg.num_warps,
    )
    return dh.to(h.dtype), dz


def _forward_impl(backend: str):
    if backend == "torch":
        return reference.xcross_forward
    if backend == "triton":
        return triton_forward
    if backend == "cuda":
        raise RuntimeError("xkern._C does not implement xcross_integrate yet")
    raise ValueError(f"unknown backend {backend!r}")


def _input_grad_impl(backend: str):
    if backend == "torch":
        return reference.xcross_input_grad
    if backend == "triton":
        return triton_input_grad
    if backend == "cuda":
        raise RuntimeError("xkern._C does not implement xcross_integrate yet")
    raise ValueError(f"unknown backend {backend!r}")


def _z_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    return reference.compute_dtype(dtype) if backend == "torch" else torch.float32


# --------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("xkern::xcross_integrate_fwd", mutates_args=())
def _xcross_fwd(h: torch.Tensor, w_concat: torch.Tensor, bias: torch.Tensor | None, beta: float, gamma: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(backend)(h, w_concat, bias, beta, gamma)


@_xcross_fwd.register_fake
def _(h, w_concat, bias, beta, gamma, backend):
    return h.new_empty(h.shape), h.new_empty(h.shape[1], w_concat.shape[0], dtype=_z_dtype(h.dtype, backend))


@torch.library.custom_op("xkern::xcross_integrate_input_grad", mutates_args=())
def _xcross_input_grad(grad_out: torch.Tensor, h: torch.Tensor, w_concat: torch.Tensor, z: torch.Tensor,
                       beta: float, gamma: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _input_grad_impl(backend)(grad_out, h, w_concat, z, beta, gamma)


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
        dh, dz = _xcross_input_grad(grad_out, h, w_concat, z, ctx.beta, ctx.gamma, ctx.backend)
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
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, v in (("beta", beta), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a python float, got {type(v).__name__}")
    if h.dim() < 2:
        raise ValueError(f"h must be [n, ..., d] (n streams first, features last), got shape {tuple(h.shape)}")
    n, d = h.shape[0], h.shape[-1]
    if n < 2:
        raise ValueError(f"h must stack n >= 2 streams on dim 0, got n={n}")
    if d < 1:
        raise ValueError(f"h must have a non-empty feature dimension, got d={d}")
    for name, t in (("h", h), ("w_concat", w_concat), ("bias", bias)):
        if t is not None and t.dtype not in _FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64: torch backend), got {t.dtype}")
    p = 2 * n * (n - 1)
    if w_concat.dim() != 2 or tuple(w_concat.shape) != (p, n * d):
        raise ValueError(f"w_concat must be [2n(n-1), n*d] = [{p}, {n * d}] for n={n}, d={d}, "
                         f"got shape {tuple(w_concat.shape)}")
    if bias is not None and tuple(bias.shape) != (p,):
        raise ValueError(f"bias must be [2n(n-1)] = [{p}] for n={n}, got shape {tuple(bias.shape)}")
    devices = {"h": h.device, "w_concat": w_concat.device}
    if bias is not None:
        devices["bias"] = bias.device
    if len(set(devices.values())) != 1:
        raise ValueError("all inputs must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devices.items()))
    for name, t in (("w_concat", w_concat), ("bias", bias)):
        if t is not None and t.dtype != h.dtype:
            raise TypeError(f"{name} must have h's dtype {h.dtype}, got {t.dtype}")
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
    if backend is None:
        backend = select_backend(_OP, h.device)
    else:
        check_backend(backend, _OP, h.device)
    if backend == "triton":
        _check_triton_dtype(h.dtype)
    h3 = h.reshape(n, h.numel() // (n * d), d)
    if bias is not None:
        bias = bias.contiguous()
    out, _ = _xcross_fwd(h3, w_concat, bias, float(beta), float(gamma), backend)
    return out.reshape(h.shape)
