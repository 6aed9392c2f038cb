"""The native CPU kernels (``xkern._cpu``, csrc/cpu/) against float64 references built from first principles.

Every instruction set the machine can run (``supported_isas()``) and 1 and 2 threads; every path (the
fused GEMV for M <= 16 with K % 32 == 0, the decoded-slab matmul otherwise, its AMX bf16 variant for a
bf16 x under avx512 where the CPU has AMX); uninitialized memory is poisoned (NaN) so a kernel that
leaves an output element unwritten fails.
"""

import pytest
import torch

from xkern.nf4 import dequantize_nf4, quantize_nf4

_cpu = pytest.importorskip("xkern._cpu", reason="xkern._cpu is not built (pip install --no-build-isolation -e .)")

ISAS = _cpu.supported_isas()
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """torch.empty (also at::empty inside the extension) returns NaN-filled memory while this is on."""
    import torch.utils.deterministic as det

    old_mode, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_mode)
    det.fill_uninitialized_memory = old_fill


@pytest.fixture(params=ISAS)
def isa(request):
    old = _cpu.isa()
    _cpu.set_isa(request.param)
    assert _cpu.isa() == request.param
    yield request.param
    _cpu.set_isa(old)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


# ---- problem construction and references --------------------------------------------------------

def routing(ids: torch.Tensor, n_adapters: int):
    """(ids int32, order int32, starts int32): rows stably sorted by id, segment starts (base rows first)."""
    ids = ids.to(torch.int32)
    order = torch.argsort(ids, stable=True).to(torch.int32)
    counts = torch.bincount(ids.long() + 1, minlength=n_adapters + 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    return ids, order, starts


def weight_args(w):
    offset = None if w.offset is None else w.offset.reshape(1)
    n, k = w.shape
    return (w.packed, w.absmax, w.absmax2, w.code2, offset, n, k, w.blocksize)


def problem(m, n, k, blocksize, double_quant, ranks, x_dtype=F32, lora_dtype=F32, seed=0):
    """Random inputs; adapters of differing ranks zero-padded into one bank; ids unsorted, with -1 rows."""
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4(torch.randn(n, k, generator=g) / k**0.5, blocksize, double_quant)
    r_max = max(ranks, default=0)
    lora_A = torch.zeros(len(ranks), r_max, k)
    lora_B = torch.zeros(len(ranks), n, r_max)
    for a, r in enumerate(ranks):
        lora_A[a, :r] = torch.randn(r, k, generator=g) / k**0.5
        lora_B[a, :, :r] = torch.randn(n, r, generator=g)
    scale = torch.rand(len(ranks), generator=g) + 0.5
    ids = torch.randint(-1, len(ranks), (m,), generator=g) if ranks else torch.full((m,), -1)
    x = torch.randn(m, k, generator=g).to(x_dtype)
    dy = torch.randn(m, n, generator=g).to(x_dtype)
    return w, x, dy, lora_A.to(lora_dtype), lora_B.to(lora_dtype), scale, ids


def reference(x, dy, w, lora_A, lora_B, scale, ids):
    """float64, row by row: (y, xa, dx, g) with each row using its own adapter only."""
    wd = dequantize_nf4(w, torch.float64)
    m, r = x.shape[0], lora_A.shape[1]
    xd, dyd = x.double(), dy.double()
    y, dx = xd @ wd.T, dyd @ wd
    xa = torch.zeros(m, r, dtype=torch.float64)
    g = torch.zeros(m, r, dtype=torch.float64)
    for i in range(m):
        a = int(ids[i])
        if a < 0:
            continue
        A, B, s = lora_A[a].double(), lora_B[a].double(), float(scale[a])
        xa[i] = xd[i] @ A.T
        y[i] += s * xa[i] @ B.T
        g[i] = dyd[i] @ B
        dx[i] += s * g[i] @ A
    return y, xa, dx, g


def assert_close_f32(got, ref, what):
    """float32 results within 1e-5 of the reference's largest magnitude."""
    assert got.dtype == torch.float32, what
    assert got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    bound = 1e-5 * max(ref.abs().max().item(), 1e-30) if ref.numel() else 0.0
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def assert_close_rounded(got, ref, dtype, what):
    """Half-precision outputs: the float64 reference rounded to dtype, within one unit in the last place."""
    assert got.dtype == dtype and got.shape == ref.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref.to(dtype).double(), rtol=eps, atol=eps * ref.abs().max().item(),
                               msg=what)


def call(x, dy, w, lora_A, lora_B, scale, ids):
    n_adapters = lora_A.shape[0]
    ids32, order, starts = routing(ids, n_adapters)
    y, xa = _cpu.lora_linear_forward(x, *weight_args(w), lora_A, lora_B, scale, ids32, order, starts)
    dx, g = _cpu.lora_linear_input_grad(dy, *weight_args(w), lora_A, lora_B, scale, ids32, order, starts)
    return y, xa, dx, g


# ---- correctness ----------------------------------------------------------------------------------

CASES = [
    # m, n, k, blocksize, double_quant, ranks, x dtype, lora dtype
    (1, 64, 64, 64, True, [4], F32, F32),                        # decode row
    (3, 96, 96, 32, False, [2, 5, 3], BF16, F32),                # ranks padded with zeros, blocksize 32
    (16, 40, 160, 128, True, [8, 1, 8, 3, 8, 2, 7, 8], F16, BF16),  # 8 adapters; blocks straddle rows
    (16, 20, 1056, 64, False, [16, 16], F32, BF16),              # K > the kernel's K block; K % 64 != 0
    (17, 48, 77, 64, True, [6, 6], F32, BF16),                   # odd K (slab path), M just past the GEMV
    (5, 33, 101, 256, False, [4, 2, 1], BF16, BF16),             # odd K and odd N*K (a padding nibble)
    (2, 9, 4128, 4096, True, [3], F32, F32),                     # blocksize 4096 straddling rows
    (200, 72, 256, 256, False, [4, 4, 4, 4], BF16, BF16),        # many rows: slab (AMX for bf16) + segments
    (40, 50, 320, 64, True, [8, 3], BF16, F32),                  # AMX tile tails (50 rows, 40 columns)
    (24, 40, 128, 32, False, [4], F16, BF16),                    # float16 x past the GEMV
    (20, 24, 2112, 128, True, [4, 4], BF16, BF16),               # AMX: K blocks of 1024 + 64, table decode
    (18, 40, 2080, 32, False, [3], BF16, F32),                   # AMX: K blocks of 1024 + 32, blocksize 32
    (12, 24, 64, 512, True, [20], F16, F32),                     # rank not a multiple of the vector width
]


@pytest.fixture(params=["gemv", "matmul"])
def forced_path(request):
    """Send every M to the GEMV kernels, or every M to the decoded-slab matmul (AMX for bf16 x)."""
    old = _cpu._set_gemv_rows(10**9 if request.param == "gemv" else 0)
    yield request.param
    _cpu._set_gemv_rows(old)


@pytest.mark.parametrize("case", CASES, ids=[f"m{c[0]}-n{c[1]}-k{c[2]}-bs{c[3]}" for c in CASES])
def test_matches_float64_reference(case, isa, threads):
    check_case(case)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] % 32 == 0 and c[0] > 0],
                         ids=[f"m{c[0]}-n{c[1]}-k{c[2]}" for c in CASES if c[2] % 32 == 0 and c[0] > 0])
def test_every_path_with_any_m(case, isa, forced_path):
    check_case(case)


def check_case(case):
    m, n, k, bs, dq, ranks, x_dtype, lora_dtype = case
    w, x, dy, A, B, s, ids = problem(m, n, k, bs, dq, ranks, x_dtype, lora_dtype, seed=m + n + k)
    y_ref, xa_ref, dx_ref, g_ref = reference(x, dy, w, A, B, s, ids)
    y, xa, dx, g = call(x, dy, w, A, B, s, ids)
    if x_dtype == F32:
        assert_close_f32(y, y_ref, "y")
    else:
        assert_close_rounded(y, y_ref, x_dtype, "y")
    assert_close_f32(xa, xa_ref, "xa")
    assert_close_f32(dx, dx_ref, "dx")
    assert_close_f32(g, g_ref, "g")
    assert (xa[ids < 0] == 0).all() and (g[ids < 0] == 0).all()


NATIVE_CASES = [c for c in CASES if c[6] == BF16]


def abs_reference(x, dy, w, lora_A, lora_B, scale, ids):
    """(y, xa, dx, g) of the absolute values: what each output's rounding errors are proportional to."""
    x, dy = x.abs(), dy.abs()
    wd = dequantize_nf4(w, torch.float64).abs()
    y, dx = x.double() @ wd.T, dy.double() @ wd
    xa = torch.zeros(x.shape[0], lora_A.shape[1], dtype=torch.float64)
    g = torch.zeros_like(xa)
    for i in range(x.shape[0]):
        a = int(ids[i])
        if a >= 0:
            A, B, s = lora_A[a].double().abs(), lora_B[a].double().abs(), abs(float(scale[a]))
            xa[i], g[i] = x[i].double() @ A.T, dy[i].double() @ B
            y[i] += s * xa[i] @ B.T
            dx[i] += s * g[i] @ A
    return y, xa, dx, g


@pytest.mark.parametrize("case", NATIVE_CASES, ids=[f"m{c[0]}-n{c[1]}-k{c[2]}-bs{c[3]}" for c in NATIVE_CASES])
def test_native_bf16_within_its_bound(case, isa, forced_path):
    """Native bf16 (the weight and LoRA operands rounded to bf16, bf16 products, float32 accumulation, the
    product and the sum rounded to bf16) stays within 2^-6 of |x| |W|^T + s |x A^T| |B|^T per element: six
    roundings of 2^-9 each (weight, A, x A^T, B, the LoRA product, the output) bound it by 6 * 2^-9."""
    m, n, k, bs, dq, ranks, x_dtype, lora_dtype = case
    w, x, dy, A, B, s, ids = problem(m, n, k, bs, dq, ranks, x_dtype, lora_dtype, seed=m + n + k)
    refs = reference(x, dy, w, A, B, s, ids)
    bounds = abs_reference(x, dy, w, A, B, s, ids)
    ids32, order, starts = routing(ids, A.shape[0])
    y, xa = _cpu.lora_linear_forward(x, *weight_args(w), A, B, s, ids32, order, starts, False)
    dx, g = _cpu.lora_linear_input_grad(dy, *weight_args(w), A, B, s, ids32, order, starts, False)
    assert y.dtype == BF16 and dx.dtype == F32 and xa.dtype == F32 and g.dtype == F32
    for name, got, ref, bound in zip(("y", "xa", "dx", "g"), (y, xa, dx, g), refs, bounds, strict=True):
        assert torch.isfinite(got).all(), name
        err = (got.double() - ref).abs()
        assert (err <= 2**-6 * bound + 1e-30).all(), f"{name}: worst error / bound {(err / bound).max():.3g}"
    assert (xa[ids < 0] == 0).all() and (g[ids < 0] == 0).all()


def test_native_takes_effect_for_bf16_only(isa):
    """bf16 x: native rounds the weight (its result differs from exact); float32 x: both are the same kernel."""
    w, x, dy, A, B, s, ids = problem(64, 48, 256, 64, True, [4, 4])
    ids32, order, starts = routing(ids, 2)
    args = (*weight_args(w), A, B, s, ids32, order, starts)
    for dtype, same in ((F32, True), (BF16, False)):
        native = _cpu.lora_linear_forward(x.to(dtype), *args, False)[0]
        exact = _cpu.lora_linear_forward(x.to(dtype), *args, True)[0]
        assert torch.equal(native, exact) == same, dtype


def test_isas_agree(threads):
    """Same algorithms; only the vector width (so the summation order) differs between instruction sets."""
    w, x, dy, A, B, s, ids = problem(8, 64, 512, 64, True, [8, 8])
    old = _cpu.isa()
    try:
        outs = {}
        for name in ISAS:
            _cpu.set_isa(name)
            outs[name] = call(x, dy, w, A, B, s, ids)
    finally:
        _cpu.set_isa(old)
    base = outs[ISAS[-1]]
    for name, out in outs.items():
        for got, ref in zip(out, base, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("m", [0, 1, 16, 40])
def test_no_adapters_and_rank_zero(m, isa):
    """n_adapters = 0 (every row base) and r = 0 both give the plain base product."""
    for n_adapters, r in ((0, 4), (3, 0)):
        w, x, dy, _, _, _, _ = problem(m, 24, 64, 64, True, [1])
        A, B, s = torch.zeros(n_adapters, r, 64), torch.zeros(n_adapters, 24, r), torch.ones(n_adapters)
        ids = torch.randint(-1, n_adapters, (m,)) if n_adapters else torch.full((m,), -1)
        y_ref, _, dx_ref, _ = reference(x, dy, w, A, B, s, ids)
        y, xa, dx, g = call(x, dy, w, A, B, s, ids)
        assert y.shape == (m, 24) and dx.shape == (m, 64) and xa.shape == (m, r) and g.shape == (m, r)
        assert_close_f32(y, y_ref, "y")
        assert_close_f32(dx, dx_ref, "dx")
        assert (xa == 0).all() and (g == 0).all()


@pytest.mark.parametrize("m", [3, 40], ids=["gemv", "slab"])
def test_nan_stays_in_the_rows_that_use_it(m, isa, threads):
    w, x, dy, A, B, s, _ = problem(m, 32, 96, 64, True, [4, 4, 4])
    ids = torch.tensor([1, 0, 2] * (m // 3) + [-1] * (m % 3))
    y_ref, xa_ref, dx_ref, g_ref = reference(x, dy, w, A, B, s, ids)
    for bad in ("A", "B"):
        A2, B2 = A.clone(), B.clone()
        if bad == "A":
            A2[1, 0, 5] = float("nan")
        else:
            B2[1, 5, 0] = float("nan")
        y, xa, dx, g = call(x, dy, w, A2, B2, s, ids)
        uses = ids == 1
        assert torch.isnan(y[uses]).any(dim=1).all(), bad
        assert torch.isnan(dx[uses]).any(dim=1).all(), bad
        assert_close_f32(y[~uses], y_ref[~uses], f"y (NaN in {bad})")
        assert_close_f32(xa[~uses], xa_ref[~uses], f"xa (NaN in {bad})")
        assert_close_f32(dx[~uses], dx_ref[~uses], f"dx (NaN in {bad})")
        assert_close_f32(g[~uses], g_ref[~uses], f"g (NaN in {bad})")
    # a NaN in one input row stays in that row
    x2, dy2 = x.clone(), dy.clone()
    x2[1, 7] = float("inf")
    dy2[1, 3] = float("nan")
    y, xa, dx, g = call(x2, dy2, w, A, B, s, ids)
    rest = torch.arange(m) != 1
    assert not torch.isfinite(y[1]).all() and not torch.isfinite(dx[1]).all()
    assert_close_f32(y[rest], y_ref[rest], "y (non-finite x row)")
    assert_close_f32(dx[rest], dx_ref[rest], "dx (non-finite dy row)")


# ---- dequantize ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,blocksize,double_quant", [
    ((64, 64), 64, True),
    ((33, 77), 32, False),        # odd numel: the last byte's low nibble is padding
    ((257, 351), 128, True),      # > one parallel chunk: the second thread starts unaligned
    ((5, 4100), 4096, False),
])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_dequantize_matches_reference_exactly(shape, blocksize, double_quant, dtype, isa, threads):
    w = quantize_nf4(torch.randn(*shape) * 3, blocksize, double_quant)
    got = _cpu.dequantize_nf4(*weight_args(w)[:5], w.numel, blocksize, dtype)
    assert got.dtype == dtype and got.shape == (w.numel,)
    assert torch.equal(got, dequantize_nf4(w, dtype).reshape(-1))


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_dequantize_special_scales(dtype, isa):
    """inf, NaN and huge block scales convert exactly as torch does (overflow to inf in float16)."""
    w = quantize_nf4(torch.randn(8, 96), 32, double_quant=False)
    absmax = w.absmax.clone()
    absmax[0], absmax[1], absmax[2], absmax[3] = float("inf"), float("nan"), 1e6, 1e-30
    w = type(w)(packed=w.packed, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=32)
    got = _cpu.dequantize_nf4(*weight_args(w)[:5], w.numel, 32, dtype)
    torch.testing.assert_close(got, dequantize_nf4(w, dtype).reshape(-1), rtol=0, atol=0, equal_nan=True)


# ---- instruction sets and errors -----------------------------------------------------------------

def test_isa_selection():
    assert _cpu.isa() in ISAS and "scalar" in ISAS
    assert ISAS == [i for i in ("avx512_bf16", "avx512", "avx2", "scalar") if i in ISAS]
    with pytest.raises(ValueError, match="unknown instruction set"):
        _cpu.set_isa("sse9")
    for name in {"avx512_bf16", "avx512", "avx2"} - set(ISAS):
        with pytest.raises(ValueError, match="cannot run"):
            _cpu.set_isa(name)
    assert "xkern._cpu" in _cpu.build_info()


def _good():
    w, x, dy, A, B, s, _ = problem(4, 16, 64, 64, True, [4, 4])
    ids32, order, starts = routing(torch.tensor([1, -1, 0, 1]), 2)
    return dict(x=x, w=list(weight_args(w)), A=A, B=B, s=s, ids=ids32, order=order, starts=starts)


def _run(d):
    return _cpu.lora_linear_forward(d["x"], *d["w"], d["A"], d["B"], d["s"], d["ids"], d["order"], d["starts"])


def _set(key, value, index=None):
    def edit(d):
        if index is None:
            d[key] = value(d[key]) if callable(value) else value
        else:
            d[key][index] = value(d[key][index]) if callable(value) else value
    return edit


BAD = [
    ("x float64", _set("x", lambda x: x.double()), TypeError, "x must be float32"),
    ("x non-contiguous", _set("x", lambda x: torch.randn(64, 8).t()[:4]), ValueError, "contiguous"),
    ("x wrong K", _set("x", lambda x: x[:, :32].contiguous()), ValueError, "x must be"),
    ("x on meta", _set("x", lambda x: x.to("meta")), ValueError, "CPU tensor"),
    ("packed short", _set("w", lambda p: p[:-1], 0), ValueError, "packed has"),
    ("packed int8", _set("w", lambda p: p.view(torch.int8), 0), TypeError, "packed must be"),
    ("absmax count", _set("w", lambda a: a[:-1], 1), ValueError, "absmax has"),
    ("absmax2 alone", _set("w", None, 3), ValueError, "absmax2, code2 and offset together"),
    ("absmax2 count", _set("w", lambda a: torch.cat([a, a]), 2), ValueError, "absmax2 has"),
    ("blocksize 48", _set("w", 48, 7), ValueError, "blocksize"),
    ("n_out wrong", _set("w", 17, 5), ValueError, "packed has"),
    ("lora_A wrong K", _set("A", lambda a: a[:, :, :32].contiguous()), ValueError, "lora_A must be"),
    ("lora_B wrong shape", _set("B", lambda b: b[:, :8].contiguous()), ValueError, "lora_B must be"),
    ("lora_B int", _set("B", lambda b: b.int()), TypeError, "lora_B must be"),
    ("scale float64", _set("s", lambda s: s.double()), TypeError, "scale must be"),
    ("scale count", _set("s", lambda s: s[:1]), ValueError, "scale must have"),
    ("ids int64", _set("ids", lambda i: i.long()), TypeError, "ids must be"),
    ("ids out of range", _set("ids", lambda i: torch.full_like(i, 2)), ValueError, "outside"),
    ("ids below -1", _set("ids", lambda i: torch.full_like(i, -2)), ValueError, "outside"),
    ("order repeats", _set("order", lambda o: torch.tensor([1, 1, 2, 3], dtype=torch.int32)), ValueError,
     "permutation"),
    ("order out of range", _set("order", lambda o: o + 100), ValueError, "permutation"),
    ("starts short", _set("starts", lambda s: s[:-1].contiguous()), ValueError, "starts must be"),
    ("starts decreasing", _set("starts", lambda s: torch.tensor([0, 3, 1, 4], dtype=torch.int32)), ValueError,
     "non-decreasing|do not match"),
    ("starts end", _set("starts", lambda s: torch.tensor([0, 1, 2, 5], dtype=torch.int32)), ValueError, "end at M"),
    ("segments vs ids", _set("order", lambda o: o.flip(0).contiguous()), ValueError, "do not match ids"),
]


@pytest.mark.parametrize("name,edit,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_are_refused(name, edit, exc, match):
    d = _good()
    _run(d)  # the unedited call works
    edit(d)
    with pytest.raises(exc, match=match):
        _run(d)


def test_bad_arguments_input_grad_and_dequantize():
    d = _good()
    w = d["w"]
    dy = torch.randn(4, 16)
    args = (*w, d["A"], d["B"], d["s"], d["ids"], d["order"], d["starts"])
    _cpu.lora_linear_input_grad(dy, *args)
    with pytest.raises(ValueError, match="grad_out must be"):
        _cpu.lora_linear_input_grad(torch.randn(4, 15), *args)
    with pytest.raises(TypeError, match="grad_out must be float32"):
        _cpu.lora_linear_input_grad(dy.double(), *args)
    with pytest.raises(TypeError, match="dtype must be"):
        _cpu.dequantize_nf4(*w[:5], 16 * 64, 64, torch.int32)
    with pytest.raises(ValueError, match="packed has"):
        _cpu.dequantize_nf4(*w[:5], 16 * 64 + 2, 64, torch.float32)
    with pytest.raises(ValueError, match="at least one element"):
        _cpu.dequantize_nf4(*w[:5], 0, 64, torch.float32)
