"""The CUDA decode kernel (csrc/nf4_lora_decode.*), checked three ways.

1. nvcc compiles every csrc/*.cu for sm_80 and sm_90a (no GPU and no torch headers needed).
2. The host emulator (csrc/host_emulation/) runs the kernel source itself on the CPU -- a thread per
   CUDA thread, block barriers, warp shuffles, mma.sync in the PTX fragment layout, poisoned shared
   memory and workspace -- against a float64 reference. It checks the index math, the data flow and the
   split-K protocol, not GPU timing or the memory model.
3. On a GPU (``pytest -m gpu``): the built extension against the reference, dispatch, autograd,
   CUDA graphs, and a bandwidth report (``-s`` to see it).
"""

import ctypes
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script
from xkern import quantize_nf4
from xkern.ops import RowRouting, lora_linear, select_backend
from xkern.ops.backends import cuda_ext as cuda_impl
from xkern.ops.registry import check_backend, choose, kernel

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = ("80", "90a")
KERNEL_BUILT = "lora_linear" in cuda_impl.extension_ops()
needs_kernel = pytest.mark.skipif(not KERNEL_BUILT, reason="xkern._C with the decode kernel is not built "
                                  "(pip install --no-build-isolation -e . with CUDA torch and nvcc)")
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
RANKS = {1: [8], 4: [4, 16, 1, 8], 16: [(5 * a) % 16 + 1 for a in range(16)]}
SASS_CHECK = load_script("bench/cuda_sass_check.py")
# what torch's extension build adds to every nvcc call (no implicit half/bfloat16 conversions)
TORCH_NVCC_FLAGS = SASS_CHECK.TORCH_NVCC_FLAGS


def _nvcc() -> str:
    path = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if path is None and home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            path = os.path.join(home, "bin", "nvcc")
    if path is None:
        pytest.skip("nvcc not found: put the CUDA toolkit's bin/ on PATH or set CUDA_HOME")
    return path


# ---- problems and the float64 reference --------------------------------------------------------


def _ids(m: int, n_adapters: int) -> torch.Tensor:
    """A fixed mix of adapters and -1 (base only); M=1 gets an adapter."""
    return torch.tensor([(i * 7 + 3) % (n_adapters + 1) - 1 for i in range(m)], dtype=torch.int32)


def _lora(n, k, ranks, generator, device="cpu"):
    """A bank of adapters with different ranks zero-padded to the largest."""
    r = max(ranks)
    lora_A = torch.zeros(len(ranks), r, k, device=device)
    lora_B = torch.zeros(len(ranks), n, r, device=device)
    for a, ra in enumerate(ranks):
        lora_A[a, :ra] = torch.randn(ra, k, generator=generator, device=device) / k**0.5
        lora_B[a, :, :ra] = torch.randn(n, ra, generator=generator, device=device)
    return lora_A, lora_B


def _cpu_problem(m, n, k, ranks, dtype, double_quant, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_A, lora_B = _lora(n, k, ranks, g)
    weight = quantize_nf4(torch.randn(n, k, generator=g) / k**0.5, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    scale = torch.rand(len(ranks), generator=g) + 0.5
    return x, weight, lora_A.to(dtype), lora_B.to(dtype), scale, _ids(m, len(ranks))


def _reference64(x, weight, lora_A, lora_B, scale, ids):
    """Row by row in float64: ``y = x W^T + s[a] (x A[a]^T) B[a]^T`` and ``xa = x A[a]^T``."""
    xd = x.double()
    y = xd @ weight.dequantize(torch.float32).double().T
    xa = torch.zeros(x.shape[0], lora_A.shape[1], dtype=torch.float64, device=x.device)
    for m, a in enumerate(ids.tolist()):
        if a >= 0:
            xa[m] = xd[m] @ lora_A[a].double().T
            y[m] += float(scale[a]) * (xa[m] @ lora_B[a].double().T)
    return y, xa


def _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids):
    y_ref, xa_ref = _reference64(x, weight, lora_A, lora_B, scale, ids)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert xa.dtype == torch.float32 and xa.shape == xa_ref.shape
    rtol = 1e-2 if x.dtype == torch.bfloat16 else 2e-3  # rounding of the output (2^-9 / 2^-12 relative)
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=1e-3 * y_ref.abs().max().item())
    if xa.numel():
        torch.testing.assert_close(xa.double(), xa_ref, rtol=1e-4, atol=1e-5 * xa_ref.abs().max().item() + 1e-7)


# ---- 1. compile (any machine with nvcc) ---------------------------------------------------------


def test_kernel_sources_include_no_torch():
    """The kernels and their launchers build without torch, so nvcc alone can check them."""
    files = [*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), CSRC / "nf4_lora_decode.h", CSRC / "nf4_lora_decode_plan.cpp"]
    assert len(files) >= 4
    for f in files:
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', f.read_text())
        assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11")], f.name


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_sources_compile_with_nvcc(arch, tmp_path):
    nvcc = _nvcc()
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no CUDA sources in csrc/"
    for src in sources:
        obj = tmp_path / f"{src.stem}.sm_{arch}.o"
        cmd = [nvcc, "-c", "-std=c++17", "-O3", "--use_fast_math", *TORCH_NVCC_FLAGS,
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-I", str(CSRC), "-o", str(obj),
               str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
        assert obj.stat().st_size > 0
        # ptxas reports every kernel it assembled for the target: machine code exists for this arch
        compiled = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\w+)'", res.stdout + res.stderr)
        assert compiled and {a for _, a in compiled} == {arch}, res.stderr[-2000:]
        if src.name == "nf4_lora_decode.cu":
            names = " ".join(name for name, _ in compiled)
            assert names.count("nf4_lora_mma_kernel") == 16 and names.count("nf4_lora_gemv_kernel") == 2
            assert names.count("lora_shrink_kernel") == 6


def test_tensor_core_decode_loop_meets_its_instruction_budget(tmp_path):
    """Every tensor-core GEMV variant's main loop issues at most 4 SASS instructions per decoded weight element
    on sm_80 and sm_90a (so the H200's issue rate allows more than its HBM rate), no GEMV spills; under the nvcc
    that wrote bench/results/cuda-decode-sass.json its numbers reproduce."""
    _nvcc()
    records = [r for arch in ARCHS for r in SASS_CHECK.measure(CSRC, arch, tmp_path)]
    assert SASS_CHECK.problems({"states": {"after": records}}) == []
    mma = [r for r in records if r["kernel"] == "nf4_lora_mma_kernel"]
    assert len(mma) == 16 * len(ARCHS)
    assert all(r["per_element"] <= 4 and r["fraction_of_hbm"] > 0.7 for r in mma), [r["per_element"] for r in mma]
    committed = json.loads((ROOT / "bench" / "results" / "cuda-decode-sass.json").read_text())
    assert committed["problems"] == []
    if SASS_CHECK.nvcc_version() == committed["nvcc"]:
        numbers = lambda rs: {(r["mangled"], r["arch"]): (r.get("regs"), r.get("spill_bytes"), r["loop_instructions"],
                                                          r["per_element"]) for r in rs}  # noqa: E731
        assert numbers(records) == numbers(committed["states"]["after"])


# ---- 2. the kernel source under the host emulator (any machine with nvcc + a C++20 host compiler) --


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    nvcc = _nvcc()
    out = tmp_path_factory.mktemp("emulator") / "xkern_emulate.so"
    cmd = [nvcc, "-x", "c++", "-std=c++20", "-O1", "-shared", "-cudart", "none",
           "-Xcompiler", "-fPIC,-pthread,-Wno-unknown-pragmas", "-DXKERN_HOST_EMULATION", "-o", str(out),
           str(CSRC / "host_emulation" / "emulate.cpp"), str(CSRC / "nf4_lora_decode_plan.cpp"), "-lpthread"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        if re.search(r"barrier: No such file|unrecognized.*c\+\+20|std=c\+\+20", res.stderr):
            pytest.skip(f"the host compiler lacks C++20 <barrier>: {res.stderr[-300:]}")
        pytest.fail(f"building the emulator failed:\n{' '.join(cmd)}\n{res.stderr}")
    lib = ctypes.CDLL(str(out))
    lib.xkern_emu_decode.restype = ctypes.c_int
    return lib


def _emulate(lib, x, weight, lora_A, lora_B, scale, ids, *, num_sms=4, split_k=0, force_generic=False):
    """Run shrink + GEMV under the emulator: (y, xa, plan [vec, mt, rows/block, n_tiles, split_k, k_slab, gk])."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.full((m, n), float("nan"), dtype=x.dtype)
    xa = torch.full((m, lora_A.shape[1]), float("nan"))
    plan = (ctypes.c_int * 7)()
    offset = weight.offset.reshape(1) if weight.double_quant else None
    scale = scale.float().contiguous()
    ids = ids.to(torch.int32).contiguous()
    p = lambda t: ctypes.c_void_p(None if t is None else t.data_ptr())  # noqa: E731
    rc = lib.xkern_emu_decode(
        p(x), _DTYPE_CODE[x.dtype], m, n, k, p(weight.packed), p(weight.absmax), p(weight.absmax2), p(weight.code2),
        p(offset), weight.blocksize, int(weight.double_quant), p(ids), p(lora_A), _DTYPE_CODE[lora_A.dtype],
        p(lora_B), _DTYPE_CODE[lora_B.dtype], p(scale), lora_A.shape[0], lora_A.shape[1], p(y), p(xa),
        num_sms, split_k, int(force_generic), plan)
    assert rc == 0, f"emulated launch failed with {rc} (-2: exception; " \
                    "-3: a split-K counter left non-zero)"
    return y, xa, list(plan)


EMULATED = [
    # m, n, k, n_adapters / ranks, dtype, double_quant, blocksize, split_k, force_generic
    pytest.param(1, 72, 200, [8], torch.bfloat16, True, 64, 0, False, id="m1-oddK-generic"),
    pytest.param(1, 72, 1024, [5], torch.float16, True, 64, 0, False, id="m1-vec"),
    pytest.param(2, 40, 2080, [4, 6], torch.bfloat16, True, 64, 2, False, id="m2-vec-split2"),
    pytest.param(3, 40, 4160, RANKS[4], torch.float16, False, 64, 3, False, id="m3-vec-split3-plain"),
    pytest.param(8, 24, 2080, [3, 7], torch.bfloat16, True, 32, 2, False, id="m8-vec-bs32"),
    pytest.param(16, 24, 1024, RANKS[16], torch.bfloat16, True, 64, 0, False, id="m16-vec-16adapters"),
    pytest.param(5, 40, 3072, [4, 6], torch.bfloat16, True, 64, 3, True, id="m5-forced-generic-split3"),
    pytest.param(4, 33, 201, [3, 7], torch.float16, False, 64, 0, False, id="m4-oddN-oddK"),
    pytest.param(3, 24, 4128, [5], torch.float16, True, 4096, 2, False, id="m3-bs4096-blocks-span-rows"),
    # tensor-core variants: 16 rows with 32-element chunks and an odd chunk count per warp, plain absmax
    pytest.param(12, 56, 1312, [3, 5], torch.float16, False, 64, 0, False, id="m12-gk32-odd-chunks-plain"),
    pytest.param(9, 100, 1600, RANKS[4], torch.bfloat16, False, 128, 0, False, id="m9-gk64-plain-bs128"),
]


@pytest.mark.parametrize("m,n,k,ranks,dtype,double_quant,blocksize,split_k,force_generic", EMULATED)
def test_emulated_kernel_matches_reference(emulator, m, n, k, ranks, dtype, double_quant, blocksize, split_k,
                                           force_generic):
    x, weight, lora_A, lora_B, scale, ids = _cpu_problem(m, n, k, ranks, dtype, double_quant, blocksize)
    y, xa, plan = _emulate(emulator, x, weight, lora_A, lora_B, scale, ids, split_k=split_k,
                           force_generic=force_generic)
    vec = k % 32 == 0 and not force_generic
    assert plan[0] == int(vec)
    assert plan[1] == (16 if not vec or m > 8 else 8)
    assert plan[6] == (0 if not vec else 64 if k % 64 == 0 and blocksize >= 64 else 32)
    if split_k:
        assert plan[4] == min(split_k, -(-k // 1024))
    _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids)


def test_emulated_kernel_mixed_dtypes_misalignment_and_base_rows(emulator):
    x, weight, lora_A, lora_B, scale, ids = _cpu_problem(3, 40, 1056, [4, 8], torch.bfloat16, True)
    for a_dtype, b_dtype in ((torch.float32, torch.float32), (torch.float16, torch.bfloat16)):
        A, B = lora_A.to(a_dtype), lora_B.to(b_dtype)
        y, xa, _ = _emulate(emulator, x, weight, A, B, scale, ids)
        _assert_matches_reference(y, xa, x, weight, A, B, scale, ids)
    # activations 2 bytes off a 16-byte boundary: the generic path
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    x_off = buf[1:].view_as(x)
    x_off.copy_(x)
    y, xa, plan = _emulate(emulator, x_off, weight, lora_A, lora_B, scale, ids)
    assert plan[0] == 0
    _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids)
    # base-only rows: xa is exactly zero; with split-K and no adapter work at all
    base = torch.full((3,), -1, dtype=torch.int32)
    y, xa, plan = _emulate(emulator, x, weight, lora_A, lora_B, scale, base, split_k=2)
    assert plan[4] == 2 and torch.equal(xa, torch.zeros_like(xa))
    _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, base)


def test_emulated_kernel_keeps_nan_in_its_row(emulator):
    x, weight, lora_A, lora_B, scale, ids = _cpu_problem(3, 40, 2048, [4, 8], torch.float16, True)
    x[1, 5] = float("nan")
    y, xa, _ = _emulate(emulator, x, weight, lora_A, lora_B, scale, ids, split_k=2)
    assert torch.isnan(y).any(dim=1).tolist() == [False, True, False]
    assert torch.isnan(xa).any(dim=1).tolist() == [False, ids[1].item() >= 0, False]


def _cuda_fwd(x, weight, lora_A, lora_B, scale, ids, precision="native", **kwargs):
    """The cuda backend's forward on per-row ids (the routing built here, as lora_linear does); ``native`` (the
    models' precision) runs the tensor-core kernel where the shape allows."""
    return cuda_impl.lora_linear_forward(x, weight, lora_A, lora_B, scale, RowRouting.build(ids, lora_A.shape[0]),
                                         precision, **kwargs)


# ---- dispatch and fallback (any machine) ---------------------------------------------------------


def test_dispatch_never_picks_cuda_without_the_extension(monkeypatch):
    if KERNEL_BUILT:
        pytest.skip("xkern._C with the decode kernel is built here")
    monkeypatch.delenv("XKERN_BACKEND", raising=False)
    assert select_backend("lora_linear", torch.device("cuda")) in ("triton", "torch")
    with pytest.raises(RuntimeError, match="xkern._C is not built"):
        check_backend("cuda", "lora_linear", torch.device("cuda"))


def test_cuda_backend_registers_the_decode_forward_only():
    assert kernel("lora_linear.forward", "cuda") is cuda_impl.lora_linear_forward
    with pytest.raises(KeyError, match="implements no 'lora_linear.input_grad'"):
        kernel("lora_linear.input_grad", "cuda")


def test_calls_the_decode_kernel_declines_go_to_the_next_backend(monkeypatch):
    """CPU tensors (and, on a GPU, >16 rows or float32) are declined; the registry picks another backend."""
    monkeypatch.delenv("XKERN_BACKEND", raising=False)
    x, weight, lora_A, lora_B, scale, ids = _cpu_problem(3, 16, 64, [2, 4], torch.float32, True)
    assert not cuda_impl.supports(x, weight, lora_A, lora_B)
    assert choose("lora_linear.forward", x.device, (x, weight, lora_A, lora_B)) != "cuda"
    with pytest.raises(ValueError, match="decode kernel takes 1..16 rows"):
        cuda_impl.lora_linear_forward(x, weight, lora_A, lora_B, scale, RowRouting.build(ids, lora_A.shape[0]))


def test_exact_precision_takes_the_float32_kernel(monkeypatch):
    """The tensor-core kernel rounds NF4 codes to the activation dtype, which only ``native`` allows: an
    ``exact`` call (or a forced one) goes to the float32 CUDA-core kernel."""
    calls = []
    monkeypatch.setattr(cuda_impl, "supports", lambda *args: True)
    monkeypatch.setattr(cuda_impl, "_decode", lambda *args: calls.append(args[-1]) or (None, None))
    x, weight, lora_A, lora_B, scale, ids = _cpu_problem(3, 16, 64, [2, 4], torch.bfloat16, True)
    routing = RowRouting.build(ids, lora_A.shape[0])
    for precision, force in (("native", False), ("exact", False), ("native", True)):
        cuda_impl.lora_linear_forward(x, weight, lora_A, lora_B, scale, routing, precision, force_generic=force)
    assert calls == [False, True, True]


@needs_kernel
def test_plans_cover_k_and_n():
    from xkern import _C

    for m in (1, 2, 3, 5, 8, 16):
        for n, k in ((1, 1), (72, 200), (4104, 4160), (128256, 4096), (4096, 14336), (24, 33000)):
            for sms, split in ((132, 0), (108, 0), (8, 0), (132, 7), (132, 100)):
                vec, mt, rows, tiles, split_k, k_slab = _C.lora_linear_decode_plan(m, n, k, sms, split, False)
                assert vec == int(k % 32 == 0) and mt >= m and rows * tiles >= n > rows * (tiles - 1)
                assert 1 <= split_k <= 32 and k_slab % 1024 == 0 and (split_k - 1) * k_slab < k <= split_k * k_slab


# ---- 3. on a GPU ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=6)
def _gpu_weight(n, k, double_quant, blocksize=64):
    g = torch.Generator(device="cuda").manual_seed(n * 7919 + k)
    w = torch.randn(n, k, generator=g, device="cuda") / k**0.5
    return quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)


def _gpu_problem(m, n, k, n_adapters, dtype, double_quant, *, blocksize=64, lora_dtype=None, seed=0):
    weight = _gpu_weight(n, k, double_quant, blocksize)
    g = torch.Generator(device="cuda").manual_seed(seed + 17)
    lora_A, lora_B = _lora(n, k, RANKS[n_adapters], g, device="cuda")
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    scale = torch.rand(n_adapters, generator=g, device="cuda") + 0.5
    lora_dtype = lora_dtype or dtype
    return x, weight, lora_A.to(lora_dtype), lora_B.to(lora_dtype), scale, _ids(m, n_adapters).cuda()


@pytest.mark.gpu
def test_extension_is_built_with_the_decode_kernel():
    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip("no nvcc or no CUDA torch: the extension is not expected here")
    assert KERNEL_BUILT, "xkern._C is missing or lacks the decode kernel: pip install --no-build-isolation -e ."


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("n_adapters", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(72, 200), (72, 4160), (4104, 4160), (4104, 200)])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_kernel_matches_reference(dtype, m, n, k, n_adapters, double_quant):
    x, weight, lora_A, lora_B, scale, ids = _gpu_problem(m, n, k, n_adapters, dtype, double_quant)
    assert cuda_impl.supports(x, weight, lora_A, lora_B)
    y, xa = _cuda_fwd(x, weight, lora_A, lora_B, scale, ids)
    _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("force_generic", [False, True], ids=["vec", "generic"])
@pytest.mark.parametrize("split_k", [1, 2, 5, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_kernel_split_k_and_load_paths(dtype, split_k, force_generic):
    x, weight, lora_A, lora_B, scale, ids = _gpu_problem(5, 520, 5120, 4, dtype, True)
    y, xa = _cuda_fwd(x, weight, lora_A, lora_B, scale, ids, split_k=split_k,
                                          force_generic=force_generic)
    _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids)
    # deterministic (split partials are summed in order) and the split-K counters are left reusable
    y2, xa2 = _cuda_fwd(x, weight, lora_A, lora_B, scale, ids, split_k=split_k,
                                            force_generic=force_generic)
    assert torch.equal(y, y2) and torch.equal(xa, xa2)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_decode_kernel_blocksizes_with_blocks_spanning_rows(blocksize, double_quant):
    x, weight, lora_A, lora_B, scale, ids = _gpu_problem(3, 300, 4128, 4, torch.bfloat16, double_quant,
                                                         blocksize=blocksize)
    for split_k in (0, 1, 3):
        y, xa = _cuda_fwd(x, weight, lora_A, lora_B, scale, ids, split_k=split_k)
        _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16)])
def test_decode_kernel_adapter_dtypes_differ_from_activations(a_dtype, b_dtype):
    x, weight, lora_A, lora_B, scale, ids = _gpu_problem(6, 1000, 2048, 4, torch.bfloat16, True)
    lora_A, lora_B = lora_A.to(a_dtype), lora_B.to(b_dtype)
    y, xa = _cuda_fwd(x, weight, lora_A, lora_B, scale, ids)
    _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids)


@pytest.mark.gpu
@needs_kernel
def test_decode_kernel_misaligned_views_take_the_generic_path():
    x, weight, lora_A, lora_B, scale, ids = _gpu_problem(4, 520, 2048, 4, torch.float16, True)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    x_off = buf[1:].view_as(x)
    x_off.copy_(x)
    y, xa = _cuda_fwd(x_off, weight, lora_A, lora_B, scale, ids)
    _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids)
    pbuf = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    pbuf[1:].copy_(weight.packed)
    w_off = dataclasses.replace(weight, packed=pbuf[1:])
    y, xa = _cuda_fwd(x, w_off, lora_A, lora_B, scale, ids)
    _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, ids)


@pytest.mark.gpu
@needs_kernel
def test_decode_kernel_base_rows_and_nan_rows():
    x, weight, lora_A, lora_B, scale, _ = _gpu_problem(4, 520, 2048, 4, torch.bfloat16, True)
    base = torch.full((4,), -1, dtype=torch.int32, device="cuda")
    for split_k in (1, 2):
        y, xa = _cuda_fwd(x, weight, lora_A, lora_B, scale, base, split_k=split_k)
        assert torch.equal(xa, torch.zeros_like(xa))
        _assert_matches_reference(y, xa, x, weight, lora_A, lora_B, scale, base)
    ids = torch.tensor([0, 1, -1, 3], dtype=torch.int32, device="cuda")
    x[1, 7] = float("nan")
    y, xa = _cuda_fwd(x, weight, lora_A, lora_B, scale, ids, split_k=2)
    assert torch.isnan(y).any(dim=1).tolist() == [False, True, False, False]
    assert torch.isnan(xa).any(dim=1).tolist() == [False, True, False, False]


@pytest.mark.gpu
@needs_kernel
def test_dispatch_picks_cuda_for_decode_rows(monkeypatch):
    monkeypatch.delenv("XKERN_BACKEND", raising=False)
    assert select_backend("lora_linear", torch.device("cuda")) == "cuda"
    calls = []
    real_decode = cuda_impl._decode

    def spy(x, *args):
        calls.append(x.shape[0])
        return real_decode(x, *args)

    monkeypatch.setattr(cuda_impl, "_decode", spy)
    x, weight, lora_A, lora_B, scale, ids = _gpu_problem(16, 256, 1024, 4, torch.bfloat16, True)
    y = lora_linear(x, weight, lora_A, lora_B, scale, ids)
    assert calls == [16]
    y_ref, _ = _reference64(x, weight, lora_A, lora_B, scale, ids)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=1e-3 * y_ref.abs().max().item())
    # 17 rows and float32 activations go to Triton, with the same results
    x17 = torch.randn(17, 1024, device="cuda", dtype=torch.bfloat16)
    ids17 = _ids(17, 4).cuda()
    y17 = lora_linear(x17, weight, lora_A, lora_B, scale, ids17)
    y32 = lora_linear(x.float(), weight, lora_A.float(), lora_B.float(), scale, ids)
    assert calls == [16]
    y17_ref, _ = _reference64(x17, weight, lora_A, lora_B, scale, ids17)
    torch.testing.assert_close(y17.double(), y17_ref, rtol=2e-2, atol=2e-2 * y17_ref.abs().max().item())
    torch.testing.assert_close(y32.double(), y_ref, rtol=1e-3, atol=1e-3 * y_ref.abs().max().item())


@pytest.mark.gpu
@needs_kernel
def test_autograd_through_the_cuda_backend_matches_torch():
    x, weight, lora_A, lora_B, scale, ids = _gpu_problem(8, 384, 1024, 4, torch.bfloat16, True)
    grads = {}
    for backend in ("cuda", "torch"):
        xs, a, b = (t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B))
        y = lora_linear(xs, weight, a, b, scale, ids, backend=backend)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        grads[backend] = (y.detach(), xs.grad, a.grad, b.grad)
    for got, want in zip(grads["cuda"], grads["torch"], strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("split_k", [1, 4])
def test_decode_kernel_under_cuda_graph_capture(split_k):
    x, weight, lora_A, lora_B, scale, ids = _gpu_problem(4, 1000, 4096, 4, torch.bfloat16, True)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside capture
            _cuda_fwd(static_x, weight, lora_A, lora_B, scale, ids, split_k=split_k)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, xa = _cuda_fwd(static_x, weight, lora_A, lora_B, scale, ids, split_k=split_k)
    for seed in (1, 2):
        new_x = torch.randn(x.shape, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda")
        static_x.copy_(new_x.to(x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches_reference(y, xa, static_x, weight, lora_A, lora_B, scale, ids)


@pytest.mark.gpu
@needs_kernel
def test_decode_kernel_bandwidth_report():
    """Times the CUDA path and the Triton path on decode shapes (print only; run with -s to read it)."""
    from xkern.ops.backends import triton_jit as triton_impl

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    for m, n, k, n_adapters in ((1, 4096, 4096, 1), (4, 4096, 4096, 4), (16, 4096, 4096, 16), (1, 14336, 4096, 1),
                                (1, 4096, 14336, 1), (16, 4096, 14336, 4)):
        weight = _gpu_weight(n, k, True)
        copies = max(2, -(-3 * l2 // weight.nbytes))  # rotate through > 2x L2 of weights
        weights = [dataclasses.replace(weight, packed=weight.packed.clone()) for _ in range(copies)]
        g = torch.Generator(device="cuda").manual_seed(m)
        lora_A, lora_B = (t.to(torch.bfloat16) for t in _lora(n, k, RANKS[n_adapters], g, device="cuda"))
        x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
        scale = torch.rand(n_adapters, generator=g, device="cuda") + 0.5
        ids = _ids(m, n_adapters).cuda()
        routing = RowRouting.build(ids, n_adapters)
        times = {}
        for name, fn in (("cuda", cuda_impl.lora_linear_forward), ("triton", triton_impl.lora_linear_forward)):
            for w in weights[:2]:
                fn(x, w, lora_A, lora_B, scale, routing, "native")
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 20 * copies
            start.record()
            for i in range(reps):
                y, _ = fn(x, weights[i % copies], lora_A, lora_B, scale, routing, "native")
            end.record()
            torch.cuda.synchronize()
            times[name] = start.elapsed_time(end) / reps * 1e-3
            assert torch.isfinite(y).all()
        gbps = weight.nbytes / times["cuda"] / 1e9
        print(f"\n[decode] M={m} N={n} K={k} adapters={n_adapters}: cuda {times['cuda'] * 1e6:.1f} us "
              f"({gbps:.0f} GB/s of NF4 weight), triton {times['triton'] * 1e6:.1f} us, "
              f"cuda/triton {times['cuda'] / times['triton']:.2f}")
