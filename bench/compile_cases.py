"""Every compilation the Triton launchers can ask for (kernel, launch configuration, dtype): the compile matrix.

Bench tooling, not runtime: ``bench/gpu_compile_check.py`` compiles every case ahead of time for sm_80 and
sm_90a (no GPU needed) and records registers, spills and shared memory; ``tests/kernels`` compiles a
subset. The configurations come from the launchers' own tables in ``xkern/ops/backends/triton_jit.py``,
so a launcher change shows up here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from xkern.kernels.nf4_lora import lora_shrink_kernel, nf4_dequantize_kernel, nf4_lora_kernel
from xkern.kernels.xcross import xcross_bwd_kernel, xcross_fwd_kernel
from xkern.ops.backends.triton_jit import (
    _block_p,
    _block_pk,
    _block_r,
    _next_pow2,
    _paths,
    xcross_default_config,
)


@dataclass(frozen=True)
class CompileCase:
    """One compilation the launchers can ask for: a kernel, its constexprs and launch options, per dtype.

    ``bench/gpu_compile_check.py`` compiles every case for sm_80 and sm_90a (ahead of time, no GPU
    needed) and records registers, spills and shared memory; ``tests/kernels`` checks a subset."""

    kernel: str
    path: str
    config: dict
    dtype: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    @property
    def key(self) -> str:
        return f"{self.kernel}|{self.path}|" + ",".join(f"{k}={v}" for k, v in sorted(self.config.items())) \
            + f"|{self.dtype}"


_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _case(kernel: str, path: str, config: dict, dtype: str, fn, ptrs: dict[str, str], constexprs: dict,
          num_warps: int, num_stages: int) -> CompileCase:
    """Signature by argument name: ``ptrs`` gives pointer element types ('x' = the activation dtype),
    ``constexprs`` the compile-time values (strides equal to 1 included: Triton specializes them)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            t = ptrs[name]
            sig[name] = "*" + (_TRITON_TYPES[dtype] if t == "x" else t)
        else:
            sig[name] = "fp32" if name in ("beta", "gamma") else "i32"
    return CompileCase(kernel, path, config, dtype, fn, sig, dict(constexprs), num_warps, num_stages)


def compile_cases() -> list[CompileCase]:
    """Every (kernel, configuration the launchers can pick, dtype)."""
    if importlib.util.find_spec("triton") is None:
        return []
    cases: list[CompileCase] = []
    dtypes = ("float16", "bfloat16", "float32")
    nf4_ptrs = {"x_ptr": "x", "row_index_ptr": "i32", "ids_ptr": "i32", "packed_ptr": "u8", "absmax_ptr": "u8",
                "absmax2_ptr": "fp32", "code2_ptr": "fp32", "offset_ptr": "fp32", "code_ptr": "fp32",
                "xa_ptr": "fp32", "u_ptr": "x", "scale_ptr": "fp32", "out_ptr": "x", "part_ptr": "fp32",
                "count_ptr": "i32"}
    blocksize = 64  # bitsandbytes' default; W_COLS % 64 == 0 in every model layer (else GROUP = 2, "unaligned")
    for direction in ("forward", "input_grad"):
        trans = direction == "input_grad"
        ones = {"stride_xj": 1, "stride_oo": 1, ("stride_uo" if trans else "stride_ur"): 1}
        for path, split in (("decode", 1), ("decode", 2), ("mid", 1), ("large", 1)):
            extra = [("", False)] if path != "mid" or trans else [("", False), ("-unaligned", False), ("-odd", True)]
            for suffix, odd in extra:
                for rank in (0, 16, 64):
                    for dtype in dtypes:
                        paths = _paths(getattr(torch, dtype))
                        cfg = paths.get(path + suffix, paths[path])  # the launcher's tiles for this layout
                        if cfg.dequant_base and rank == 0:
                            continue  # large M without LoRA is cuBLAS alone
                        stages = 1 if odd else cfg.num_stages
                        tile_cols = cfg.block_n if trans else cfg.block_k
                        group = 2 if suffix else min(blocksize, tile_cols)
                        const = dict(ones, BLOCKSIZE=blocksize, DOUBLE_QUANT=True, TRANS_W=trans, GROUP=group,
                                     ODD=odd, HAS_BASE=not cfg.dequant_base, HAS_LORA=rank > 0, SPLIT_K=split,
                                     LOW_PRECISION_DOT=dtype != "float32", EVEN_K=not suffix, EVEN_N=not suffix,
                                     W64=False, BLOCK_M=cfg.block_m,
                                     BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=_block_r(rank))
                        config = {"direction": direction, "rank": rank, "BLOCK_M": cfg.block_m,
                                  "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": split, "GROUP": group,
                                  "num_warps": cfg.num_warps, "num_stages": stages}
                        if odd:
                            config["ODD"] = True
                        if cfg.dequant_base:
                            config = {k: v for k, v in config.items() if k not in ("BLOCK_K", "SPLIT_K", "GROUP")}
                            config["base"] = "cuBLAS"
                        cases.append(_case("nf4_lora_kernel", path + suffix, config, dtype, nf4_lora_kernel,
                                           nf4_ptrs, const, cfg.num_warps, stages))
    for path in ("decode", "mid", "large"):  # the layout variants of mid share its shrink tiles
        for rank in (16, 64):
            for dtype in dtypes:
                cfg = _paths(getattr(torch, dtype))[path]
                const = dict(stride_xj=1, stride_dj=1, LOW_PRECISION_DOT=dtype != "float32", BLOCK_M=cfg.shrink_m,
                             BLOCK_K=cfg.shrink_k, BLOCK_R=_block_r(rank))
                config = {"rows": path, "rank": rank, "BLOCK_M": cfg.shrink_m, "BLOCK_K": cfg.shrink_k,
                          "num_warps": 4, "num_stages": 2}
                cases.append(_case("lora_shrink_kernel", "shrink", config, dtype, lora_shrink_kernel,
                                   {"x_ptr": "x", "order_ptr": "i32", "starts_ptr": "i32", "d_ptr": "x",
                                    "xa_ptr": "fp32"}, const, 4, 2))
    for dtype in dtypes:
        cases.append(_case("nf4_dequantize_kernel", "dequantize", {"BLOCK": 1024}, dtype, nf4_dequantize_kernel,
                           {"packed_ptr": "u8", "absmax_ptr": "u8", "absmax2_ptr": "fp32", "code2_ptr": "fp32",
                            "offset_ptr": "fp32", "code_ptr": "fp32", "out_ptr": "x"},
                           dict(BLOCKSIZE=64, DOUBLE_QUANT=True, ODD=False, BLOCK=1024), 4, 3))
    d_model = 4096
    for n in (2, 3, 4, 8):
        cfg = xcross_default_config(n, d_model, torch.device("cuda"))
        for dtype in dtypes:
            const = dict(N=n, N_PAD=_next_pow2(n), BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_P=_block_p(n),
                         stride_hd=1, stride_wk=1, stride_od=1)
            config = {"n": n, "BLOCK_T": cfg.block_t, "BLOCK_D": cfg.block_d, "num_warps": cfg.num_warps,
                      "num_stages": cfg.num_stages}
            cases.append(_case("xcross_fwd_kernel", f"xcross-n{n}", config, dtype, xcross_fwd_kernel,
                               {"h_ptr": "x", "w_ptr": "x", "bias_ptr": "x", "out_ptr": "x", "z_ptr": "fp32"},
                               dict(const, HAS_BIAS=True, LOW_PRECISION_DOT=dtype != "float32"),
                               cfg.num_warps, cfg.num_stages))
            cases.append(_case("xcross_bwd_kernel", f"xcross-n{n}", config, dtype, xcross_bwd_kernel,
                               {"g_ptr": "x", "h_ptr": "x", "w_ptr": "x", "z_ptr": "fp32", "dh_ptr": "x",
                                "dz_ptr": "fp32", "gram_ptr": "fp32"},
                               dict(const, stride_gd=1, BLOCK_PK=_block_pk(n)), cfg.num_warps, cfg.num_stages))
    return cases
