"""The ``triton`` backend: launchers of the Triton kernels in :mod:`xkern.kernels` (CUDA; the CPU under
``TRITON_INTERPRET=1``, for correctness only, and only when asked for).

Block sizes come from small tables by regime (no autotuning at import); the CPU interpreter uses
small tiles so tests stay fast.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from xkern.errors import InputError, InputTypeError
from xkern.nf4 import NF4Tensor, nf4_code
from xkern.ops.registry import register_backend, register_kernel
from xkern.ops.routing import RowRouting

_XCROSS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cpu" and not interpreter_enabled():
        return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import"
    return None


register_backend("triton", device_types=("cuda",), opt_in_device_types=("cpu",), priority=20, probe=_probe,
                 description="fused Triton kernels (CPU: interpreter, when requested)")

if importlib.util.find_spec("triton") is not None:
    import triton

    from xkern.kernels.nf4_lora import lora_shrink_kernel, nf4_dequantize_kernel, nf4_lora_kernel
    from xkern.kernels.xcross import xcross_bwd_kernel, xcross_fwd_kernel


def _store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The CPU interpreter truncates float32 -> bfloat16 casts; there, store float32 and let torch round."""
    if device.type == "cpu" and dtype == torch.bfloat16 and interpreter_enabled():
        return torch.float32
    return dtype


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _XCROSS_DTYPES:
        raise InputTypeError(f"backend 'triton' supports float32, float16 and bfloat16 inputs, got {dtype}")


# --------------------------------------------------------------------------------------------- lora_linear

@dataclass(frozen=True)
class LaunchConfig:
    """Tiles of ``nf4_lora_kernel`` (``block_*``, ``split_k``, warps, stages) and of the grouped shrink
    (``shrink_m``, ``shrink_k``); ``dequant_base``: the large-M path (dequantize once + cuBLAS, then the
    same kernel adds the LoRA term without a base loop)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    shrink_m: int = 16
    shrink_k: int = 32
    dequant_base: bool = False


#: rows above which the CUDA path dequantizes W once and uses cuBLAS (see docs/kernels.md, "Large M")
LARGE_M = 256
#: the configurations the CUDA launcher picks, by path (split_k is chosen per call; 1 or >1 are two variants).
#: ``mid-odd`` (W with an odd number of columns: codes gathered element by element, int64 flat indices) and
#: ``mid-unaligned`` (rows not aligned with the quantization blocks: one absmax per byte) take their own
#: tiles where the mid tiles would spill (bench/gpu_compile_check.py); a path missing here falls back to mid.
PATHS = {
    "decode": LaunchConfig(16, 32, 256, split_k=2, num_warps=4, num_stages=4, shrink_m=16, shrink_k=128),
    "mid": LaunchConfig(32, 128, 64, num_warps=4, num_stages=3, shrink_m=32, shrink_k=64),
    "mid-odd": LaunchConfig(32, 64, 64, num_warps=8, num_stages=1, shrink_m=32, shrink_k=64),
    "mid-unaligned": LaunchConfig(32, 32, 64, num_warps=4, num_stages=3, shrink_m=32, shrink_k=64),
    "large": LaunchConfig(64, 128, 64, num_warps=8, num_stages=1, shrink_m=64, shrink_k=64, dequant_base=True),
}
#: float32 inputs: the dots run on CUDA cores (``input_precision="ieee"``), whose operand tiles live in registers:
#: smaller K tiles keep the decode and mid paths free of spills (bench/gpu_compile_check.py)
PATHS_FP32 = {
    "decode": LaunchConfig(16, 32, 64, split_k=2, num_warps=4, num_stages=3, shrink_m=16, shrink_k=32),
    "mid": LaunchConfig(32, 64, 32, num_warps=8, num_stages=3, shrink_m=32, shrink_k=32),
    "mid-odd": LaunchConfig(32, 32, 32, num_warps=4, num_stages=1, shrink_m=32, shrink_k=32),
    "mid-unaligned": LaunchConfig(32, 32, 32, num_warps=8, num_stages=2, shrink_m=32, shrink_k=32),
    "large": LaunchConfig(64, 128, 64, num_warps=8, num_stages=1, shrink_m=32, shrink_k=32, dequant_base=True),
}


def _paths(dtype: torch.dtype) -> dict[str, LaunchConfig]:
    return PATHS_FP32 if dtype == torch.float32 else PATHS


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def weight_layout(w_cols: int | None, blocksize: int) -> str:
    """The path suffix of a weight's layout: ``-odd`` (odd columns), ``-unaligned`` (rows not aligned with the
    quantization blocks) or ``""``."""
    if w_cols is None:
        return ""
    if w_cols % 2:
        return "-odd"
    return "-unaligned" if w_cols % blocksize else ""


def default_config(m: int, n_out: int, n_red: int, device: torch.device,
                   dtype: torch.dtype = torch.bfloat16, w_cols: int | None = None, blocksize: int = 64) -> LaunchConfig:
    """By regime: decode (M <= 16) streams W once, split over K to fill the GPU; mid tiles the fused GEMM (with
    its own tiles for odd or block-unaligned weights, ``w_cols`` the columns of W as stored); large M (>
    LARGE_M) dequantizes once and lets cuBLAS do the base. The CPU interpreter: small tiles."""
    if device.type != "cuda":  # interpreter: a few programs, a few K steps
        return LaunchConfig(block_m=16, block_n=32, block_k=32)
    paths = _paths(dtype)
    if m <= 16:
        cfg = paths["decode"]
        n_tiles = triton.cdiv(n_out, cfg.block_n)
        split_k = max(1, min(triton.cdiv(2 * _sm_count(device), n_tiles), n_red // (2 * cfg.block_k), 16))
        return LaunchConfig(**{**cfg.__dict__, "split_k": split_k})
    if m <= LARGE_M:
        return paths.get("mid" + weight_layout(w_cols, blocksize), paths["mid"])
    return paths["large"]


def _weight_args(weight: NF4Tensor) -> tuple[torch.Tensor, ...]:
    dummy = weight.absmax  # never read when not double-quantized
    if weight.double_quant:
        return weight.packed, weight.absmax, weight.absmax2, weight.code2, weight.offset.reshape(1)
    return weight.packed, weight.absmax, dummy, dummy, dummy


# Launch with a run-time check of the compiled kernel's shared memory: a configuration whose compiled
# kernel needs more than the device allows is never launched; the launcher drops pipeline stages until it
# fits (the compile check in bench/gpu_compile_check.py keeps the tables within the limits, so this is a
# guard for GPUs with less shared memory than sm_80 / sm_90).
_STAGES_THAT_FIT: dict[tuple, int] = {}


def _shared_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def _launch(kernel, grid, args: tuple, device: torch.device, num_stages: int, **meta) -> None:
    if device.type != "cuda":
        kernel[grid](*args, num_stages=num_stages, **meta)
        return
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), device.index, num_stages,
           tuple(sorted(meta.items())), tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    stages = _STAGES_THAT_FIT.get(key)
    if stages is not None:
        kernel[grid](*args, num_stages=stages, **meta)
        return
    stages = num_stages
    limit = _shared_limit(device)
    while True:
        compiled = kernel.warmup(*args, grid=grid, num_stages=stages, **meta)
        if compiled.metadata.shared <= limit or stages == 1:
            break
        stages -= 1
    if compiled.metadata.shared > limit:
        raise RuntimeError(f"{key[0]} needs {compiled.metadata.shared} bytes of shared memory per block, "
                           f"the device allows {limit}")
    _STAGES_THAT_FIT[key] = stages
    kernel[grid](*args, num_stages=stages, **meta)


MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's y dimension


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Split-K arrival counters of one launch, zeroed in the launch's stream just before it.

    Per call, not a buffer kept per device: two launches on different streams cannot share counters, a
    launch that died half-way leaves nothing behind for the next one, and under CUDA graph capture the
    buffer comes from the graph's own memory pool, so it lives exactly as long as the graph.
    """
    return torch.zeros(n, dtype=torch.int32, device=device)


@register_kernel("dequantize_nf4", "triton")
def dequantize(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=_store_dtype(dtype, weight.device), device=weight.device)
    block = 1024
    grid = (triton.cdiv(weight.numel, block),)
    _launch(nf4_dequantize_kernel, grid, (*_weight_args(weight), nf4_code(weight.device), out, weight.numel),
            weight.device, 3, BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant,
            ODD=weight.numel % 2 == 1, BLOCK=block)
    return out.to(dtype)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _group(w_cols: int, blocksize: int, tile_cols: int) -> int:
    """Elements per absmax load in ``_w_tile``: the tile's share of a quantization block when the blocks
    align with W's rows, else 2 (one per byte)."""
    return min(blocksize, tile_cols) if weight_layout(w_cols, blocksize) == "" else 2


# The GPU's 16-bit ``tl.dot`` branches, run on the CPU interpreter by tests (float16 only: the interpreter's
# bf16 arithmetic is wrong), so that code is checked where no GPU is.
FORCE_16BIT_DOT = False


def _low_precision_dot(t: torch.Tensor, precision: str = "native") -> bool:
    """16-bit dot operands (float32 accumulation): on the GPU for 16-bit inputs in native precision."""
    return (t.is_cuda or FORCE_16BIT_DOT) and t.dtype != torch.float32 and precision == "native"


def _fused(x: torch.Tensor, weight: NF4Tensor, routing: RowRouting, shrink: torch.Tensor,
           shrink_strides: tuple[int, int, int], expand: torch.Tensor, expand_strides: tuple[int, int, int],
           scale: torch.Tensor, rank: int, n_out: int, transpose_w: bool,
           config: LaunchConfig | None, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    m, n_red = x.shape
    k_w = weight.shape[1]
    dev = x.device
    cfg = config or default_config(m, n_out, n_red, dev, x.dtype, k_w, weight.blocksize)
    has_lora = rank > 0 and bool(shrink.shape[0] > 0)
    block_r = _block_r(rank)
    low = _low_precision_dot(x, precision)
    # routing: built once per model forward (rows sorted by adapter, segment starts); nothing is re-sorted here
    order = routing.order
    sorted_ids = routing.sorted_ids()
    xa = torch.empty(m, block_r, dtype=torch.float32, device=dev)
    if has_lora:
        if shrink.shape[0] + 1 > MAX_GRID_Y:  # the shrink grid has one y per adapter (+1 for base rows)
            raise InputError(f"at most {MAX_GRID_Y - 1} adapters per call on the Triton path, got {shrink.shape[0]}")
        grid = (triton.cdiv(m, cfg.shrink_m), shrink.shape[0] + 1)
        _launch(lora_shrink_kernel, grid,
                (x, order, routing.starts, shrink, xa, n_red, rank, x.stride(0), x.stride(1), *shrink_strides,
                 xa.stride(0)), dev, 2,
                LOW_PRECISION_DOT=low, BLOCK_M=cfg.shrink_m, BLOCK_K=cfg.shrink_k, BLOCK_R=block_r, num_warps=4)
    out = torch.empty(m, n_out, dtype=_store_dtype(x.dtype, dev), device=dev)
    has_base = not cfg.dequant_base
    if not has_base:  # large M: dequantize once, cuBLAS, then the kernel adds the LoRA term in place
        w = dequantize(weight, x.dtype if x.is_cuda else torch.float32)
        base = x.to(w.dtype) @ (w if transpose_w else w.t())
        out.copy_(base)
    split_k = cfg.split_k if has_base else 1
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n_out, cfg.block_n), split_k)
    part = torch.empty(split_k, m, n_out, dtype=torch.float32, device=dev) if split_k > 1 else xa
    count = _counters(grid[0] * grid[1], dev) if split_k > 1 else order
    tile_cols = cfg.block_n if transpose_w else cfg.block_k
    _launch(nf4_lora_kernel, grid,
            (x, order, sorted_ids, *_weight_args(weight), nf4_code(dev), xa, expand, scale, out, part, count,
             m, n_out, n_red, k_w, k_w // 2, rank, x.stride(0), x.stride(1), xa.stride(0), *expand_strides,
             out.stride(0), out.stride(1)), dev, 1 if k_w % 2 else cfg.num_stages,  # odd K: element gathers
            BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=weight.double_quant, TRANS_W=transpose_w,
            GROUP=_group(k_w, weight.blocksize, tile_cols), ODD=k_w % 2 == 1, HAS_BASE=has_base, HAS_LORA=has_lora,
            SPLIT_K=split_k, LOW_PRECISION_DOT=low, EVEN_K=n_red % cfg.block_k == 0, EVEN_N=n_out % cfg.block_n == 0,
            W64=weight.packed.numel() >= 2**30, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_R=block_r, num_warps=cfg.num_warps)
    if not has_lora and rank > 0:  # an empty bank: the (unused) secondary output is zero
        xa.zero_()
    return out.to(x.dtype), xa[:, :rank]


@register_kernel("lora_linear.forward", "triton")
def lora_linear_forward(x: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: torch.Tensor, routing: RowRouting, precision: str = "exact",
                        config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``y = x W^T + s[a] (x A[a]^T) B[a]^T`` in one launch; also returns ``xa`` for backward."""
    rank = lora_A.shape[1]
    return _fused(x, weight, routing,
                  lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)),
                  lora_B, (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2)),
                  scale, rank, weight.shape[0], transpose_w=False, config=config, precision=precision)


@register_kernel("lora_linear.input_grad", "triton")
def lora_linear_input_grad(grad_out: torch.Tensor, weight: NF4Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scale: torch.Tensor, routing: RowRouting, precision: str = "exact",
                           config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``dX = dY W + s[a] (dY B[a]) A[a]`` (W read transposed in place); also returns ``dY B[a]``."""
    rank = lora_A.shape[1]
    # shrink D[a, r, n] = B[a, n, r]; expand U[a, k, r] = A[a, r, k]
    return _fused(grad_out, weight, routing,
                  lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)),
                  lora_A, (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1)),
                  scale, rank, weight.shape[1], transpose_w=True, config=config, precision=precision)


# --------------------------------------------------------------------------------------------- xcross_integrate

@dataclass(frozen=True)
class XCrossLaunchConfig:
    block_t: int = 16
    block_d: int = 128
    num_warps: int = 4
    num_stages: int = 2


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def xcross_default_config(n: int, d: int, device: torch.device) -> XCrossLaunchConfig:
    """One token block of 16 (the ``tl.dot`` minimum) per program; ``d`` in chunks sized to keep the
    ``[n_pad, 16, block_d]`` float32 tiles in registers. The CPU interpreter uses small chunks."""
    if device.type != "cuda":
        return XCrossLaunchConfig(block_t=16, block_d=16, num_warps=1)
    n_pad = _next_pow2(n)
    # [n_pad, 16, block_d] float32 tiles and their layout conversions live in shared memory: the chunk shrinks
    # with n so that n = 8 fits sm_80 (163 KiB) in every dtype; no load pipelining from n = 8 on
    # (bench/gpu_compile_check.py, docs/kernels.md)
    cap = 128 if n_pad <= 2 else (64 if n_pad <= 4 else (32 if n_pad <= 8 else 16))
    return XCrossLaunchConfig(block_t=16, block_d=max(16, min(cap, _next_pow2(d))), num_warps=4,
                              num_stages=2 if n_pad <= 4 else 1)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation of the launchers (tests poison it to prove that every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_p(n: int) -> int:
    return max(16, _next_pow2(2 * n * (n - 1)))


def _block_pk(n: int) -> int:
    """Width of the ``dz`` slices of the backward's ``dz @ w`` (a float32 dot keeps a slice row per thread)."""
    return min(32, _block_p(n))


@register_kernel("xcross_integrate.forward", "triton")
def xcross_forward(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, beta: float, gamma: float,
                   config: XCrossLaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused launch: ``(h~ [n, T, d] in h.dtype, z [T, P] float32)``."""
    _check_dtype(h.dtype)
    n, t, d = h.shape
    p = 2 * n * (n - 1)
    out = _empty((n, t, d), _store_dtype(h.dtype, h.device), h.device)
    z = _empty((t, p), torch.float32, h.device)
    if t == 0:
        return out.to(h.dtype), z
    cfg = config or xcross_default_config(n, d, h.device)
    grid = (triton.cdiv(t, cfg.block_t),)
    _launch(
        xcross_fwd_kernel, grid,
        (h, w, w if bias is None else bias, out, z,
         t, d, float(beta), float(gamma),
         h.stride(0), h.stride(1), h.stride(2),
         w.stride(0), w.stride(1),
         out.stride(0), out.stride(1), out.stride(2)), h.device, cfg.num_stages,
        N=n, N_PAD=_next_pow2(n), HAS_BIAS=bias is not None,
        LOW_PRECISION_DOT=_low_precision_dot(h),
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_P=_block_p(n), num_warps=cfg.num_warps,
    )
    return out.to(h.dtype), z


@register_kernel("xcross_integrate.input_grad", "triton")
def xcross_input_grad(grad_out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, z: torch.Tensor, beta: float,
                      gamma: float, config: XCrossLaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: ``(dh [n, T, d] in h.dtype, dz [T, P] float32)``."""
    _check_dtype(h.dtype)
    n, t, d = h.shape
    p = 2 * n * (n - 1)
    dh = _empty((n, t, d), _store_dtype(h.dtype, h.device), h.device)
    dz = _empty((t, p), torch.float32, h.device)
    if t == 0:
        return dh.to(h.dtype), dz
    z = z.float().contiguous()
    gram = torch.empty((t, n * n), dtype=torch.float32, device=h.device)  # scratch: G[t, m, m'] = <g_m, h_m'>
    cfg = config or xcross_default_config(n, d, h.device)
    grid = (triton.cdiv(t, cfg.block_t),)
    _launch(
        xcross_bwd_kernel, grid,
        (grad_out, h, w, z, dh, dz, gram,
         t, d, float(beta), float(gamma),
         grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
         h.stride(0), h.stride(1), h.stride(2),
         w.stride(0), w.stride(1),
         dh.stride(0), dh.stride(1), dh.stride(2)), h.device, cfg.num_stages,
        N=n, N_PAD=_next_pow2(n),
        BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_P=_block_p(n), BLOCK_PK=_block_pk(n), num_warps=cfg.num_warps,
    )
    return dh.to(h.dtype), dz
