"""The X-Cross integrator op: every backend against a literal float64 implementation, autograd, opcheck, errors."""

import pytest
import torch

from xkern.ops import select_backend, xcross_integrate
from xkern.ops.backends.triton_jit import XCrossLaunchConfig
from xkern.ops.backends.triton_jit import xcross_forward as triton_forward
from xkern.ops.backends.triton_jit import xcross_input_grad as triton_input_grad

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
# bf16: both backends compute in float32 from the same bf16 inputs and round once at the store, so
# they differ by float32 summation order plus at most a couple of bf16 ulps (2^-8 relative each).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def literal_xcross(h, w, bias, beta, gamma):
    """The paper's equations written out token by token with loops over m, m' (float64, differentiable).

    z = W [h_1; ...; h_n] (+ bias); zd = first n(n-1) entries, zi = next n(n-1), each ordered
    m-major then m' != m ascending;  h~_m = h_m + sum_{m'!=m} (beta zd[m,m'] h_m' + gamma zi[m,m'] (h_m - h_m')).
    """
    n, d = h.shape[0], h.shape[-1]
    h3 = h.double().reshape(n, -1, d)
    slot = {}
    for m in range(n):
        for mp in range(n):
            if mp != m:
                slot[(m, mp)] = len(slot)
    half = len(slot)
    tokens = []
    for t in range(h3.shape[1]):
        z = w.double() @ torch.cat([h3[m, t] for m in range(n)])
        if bias is not None:
            z = z + bias.double()
        rows = []
        for m in range(n):
            acc = h3[m, t]
            for mp in range(n):
                if mp == m:
                    continue
                zd, zi = z[slot[(m, mp)]], z[half + slot[(m, mp)]]
                acc = acc + beta * zd * h3[mp, t] + gamma * zi * (h3[m, t] - h3[mp, t])
            rows.append(acc)
        tokens.append(torch.stack(rows))
    if not tokens:
        return h3.reshape(h.shape)
    return torch.stack(tokens, dim=1).reshape(h.shape)


def _problem(n, d, lead, dtype=torch.float32, seed=0, bias=True):
    """Random ``h [n, *lead, d]``, ``w [2n(n-1), n d]`` scaled so that z is O(1), optional bias."""
    g = torch.Generator().manual_seed(seed)
    p = 2 * n * (n - 1)
    h = torch.randn(n, *lead, d, generator=g)
    w = torch.randn(p, n * d, generator=g) / (n * d) ** 0.5
    b = torch.randn(p, generator=g) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)
    return cast(h), cast(w), cast(b)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _assert_close(got, ref, dtype, what=""):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), ref.cpu().double(), rtol=rtol,
                               atol=atol * max(ref.abs().max().item(), 1e-6), msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------ forward values

@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_literal_equations(n, dtype):
    h, w, b = _problem(n, 7, (5,), torch.float32, seed=n)
    h, w, b = h.cpu().to(dtype), w.cpu().to(dtype), b.cpu().to(dtype)
    got = xcross_integrate(h, w, 0.7, 1.3, b, backend="torch")
    assert got.dtype == dtype and got.shape == h.shape
    expected = literal_xcross(h, w, b, 0.7, 1.3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def test_pair_order_is_m_major_then_partner_ascending():
    """n=3: z entry k (w = 0, bias = one-hot) is the documented pair (0,1),(0,2),(1,0),(1,2),(2,0),(2,1)."""
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    h = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w = torch.zeros(12, 15, device=DEVICE)
    for backend in BACKENDS:
        for k, (m, mp) in enumerate(pairs):
            for half, (beta, gamma) in enumerate([(1.0, 0.0), (0.0, 1.0)]):
                bias = torch.zeros(12, device=DEVICE)
                bias[half * 6 + k] = 1.0
                got = xcross_integrate(h, w, beta, gamma, bias, backend=backend)
                expected = h.clone()
                expected[m] += h[mp] if half == 0 else h[m] - h[mp]
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# (n, d, leading dims): d odd / a multiple of the interpreter's BLOCK_D=16; 1 token, odd counts, > one token block;
# n = 5 pads the streams to 8, n = 8 is the largest n the launcher's table covers
CASES = [(2, 37, (1,)), (3, 32, (21,)), (4, 37, (17,)), (3, 16, (1,)), (2, 32, (33,)), (3, 37, (2, 3, 5)),
         (5, 19, (18,)), (8, 16, (17,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,lead", CASES)
def test_triton_matches_reference_forward_and_gradients(n, d, lead, dtype):
    h, w, b = _problem(n, d, lead, dtype, seed=sum(lead) + n * d)
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    results = {}
    for backend in BACKENDS:
        hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
        out = xcross_integrate(hl, wl, 0.8, 1.2, bl, backend=backend)
        assert out.shape == h.shape and out.dtype == dtype
        (out.float() * g).sum().backward()
        assert hl.grad.dtype == wl.grad.dtype == bl.grad.dtype == dtype
        results[backend] = (out, hl.grad, wl.grad, bl.grad)
    for name, got, ref in zip(("out", "dh", "dw", "dbias"), results["triton"], results["torch"], strict=True):
        _assert_close(got, ref, dtype, name)
    # and both against the literal float64 equations on the same (rounded) inputs
    hr, wr, br = (t.detach().cpu().double().requires_grad_() for t in (h, w, b))
    ref_out = literal_xcross(hr, wr, br, 0.8, 1.2)
    (ref_out * g.cpu().double()).sum().backward()
    for name, got, ref in zip(("out", "dh", "dw", "dbias"), results["triton"], (ref_out, hr.grad, wr.grad, br.grad),
                              strict=True):
        _assert_close(got, ref, dtype, f"literal {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_and_one_weight_requiring_grad(backend):
    h, w, _ = _problem(3, 9, (6,), bias=False, seed=4)
    wl = _leaf(w)
    xcross_integrate(h, wl, 1.0, 1.0, backend=backend).square().sum().backward()
    wr = _leaf(w.cpu().double())
    literal_xcross(h.cpu(), wr, None, 1.0, 1.0).square().sum().backward()
    _assert_close(wl.grad, wr.grad, torch.float32, "dw")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_broadcast_grad(backend):
    """Non-contiguous h (a slice of a wider tensor) and a stride-0 incoming gradient (``.sum()``)."""
    wide, w, b = _problem(3, 26, (7,), seed=5)
    h = wide[..., 3:16]
    w = w[:, : 3 * 13].contiguous()
    w_t = torch.randn(3 * 13, 12, generator=torch.Generator().manual_seed(6)).to(DEVICE).T  # [12, 39], strided
    for wm in (w, w_t):
        hl, wl, bl = _leaf(h), _leaf(wm), _leaf(b)
        xcross_integrate(hl, wl, 0.5, 2.0, bl, backend=backend).sum().backward()
        hr, wr, br = (t.detach().cpu().double().requires_grad_() for t in (h, wm, b))
        literal_xcross(hr, wr, br, 0.5, 2.0).sum().backward()
        for name, got, ref in (("dh", hl.grad, hr.grad), ("dw", wl.grad, wr.grad), ("db", bl.grad, br.grad)):
            _assert_close(got, ref, torch.float32, name)


@pytest.mark.parametrize("config", [XCrossLaunchConfig(block_t=16, block_d=64), XCrossLaunchConfig(32, 32)])
def test_triton_configs_one_chunk_and_wide_token_blocks(config):
    h, w, b = _problem(3, 37, (40,), seed=7)
    h3 = h.reshape(3, -1, 37)
    out, z = triton_forward(h3, w, b, 0.9, 1.1, config=config)
    torch.testing.assert_close(out.cpu().double(), literal_xcross(h3.cpu(), w.cpu(), b.cpu(), 0.9, 1.1),
                               rtol=1e-5, atol=1e-5)
    g = torch.randn(h3.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    dh, dz = triton_input_grad(g, h3, w, z, 0.9, 1.1, config=config)
    dh_ref, dz_ref = triton_input_grad(g, h3, w, z, 0.9, 1.1)  # default config
    torch.testing.assert_close(dh, dh_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-5)


def test_triton_writes_every_output_element(monkeypatch):
    """Outputs poisoned with NaN before the kernels run: every element of h~, z, dh and dz gets written."""
    import importlib

    op = importlib.import_module("xkern.ops.backends.triton_jit")  # where the Triton launchers allocate outputs

    monkeypatch.setattr(op, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device))
    h, w, b = _problem(3, 37, (21,), seed=17)
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    out = xcross_integrate(hl, wl, 1.0, 1.0, bl, backend="triton")
    out.square().sum().backward()
    for t in (out, hl.grad, wl.grad, bl.grad):
        assert torch.isfinite(t).all()
    hr, wr, br = (t.detach().cpu().double().requires_grad_() for t in (h, w, b))
    ref = literal_xcross(hr, wr, br, 1.0, 1.0)
    ref.square().sum().backward()
    for name, got, exp in (("out", out, ref), ("dh", hl.grad, hr.grad), ("dw", wl.grad, wr.grad)):
        _assert_close(got, exp, torch.float32, name)


# ------------------------------------------------------------------------------------------ properties

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_weight_is_identity(backend, dtype):
    h, w, _ = _problem(4, 21, (2, 3), dtype, bias=False)
    out = xcross_integrate(h, torch.zeros_like(w), 1.0, 1.0, backend=backend)
    assert torch.equal(out, h)
    out = xcross_integrate(h, torch.zeros_like(w), 1.0, 1.0, torch.zeros(24, dtype=dtype, device=DEVICE),
                           backend=backend)
    assert torch.equal(out, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_are_independent_nan_stays_in_its_token(backend):
    h, w, b = _problem(3, 11, (5,), seed=9)
    h[1, 2, 4] = float("nan")
    out = xcross_integrate(h, w, 1.0, 1.0, b, backend=backend).cpu()
    assert torch.isnan(out[:, 2]).all()  # z of token 2 is NaN: every stream of that token
    assert torch.isfinite(out[:, torch.arange(5) != 2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_token_axis(backend):
    h = torch.randn(2, 0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    out = xcross_integrate(h, w, backend=backend)
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert w.grad.abs().max() == 0


def test_gradcheck_float64_reference_path():
    g = torch.Generator().manual_seed(10)
    for n, shape in ((2, (2, 3)), (3, (4,))):
        d = 5
        h = torch.randn(n, *shape, d, generator=g, dtype=torch.float64, requires_grad=True)
        w = (torch.randn(2 * n * (n - 1), n * d, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
        b = torch.randn(2 * n * (n - 1), generator=g, dtype=torch.float64, requires_grad=True)
        fn = lambda h, w, b: xcross_integrate(h, w, 0.6, 1.4, b, backend="torch")  # noqa: B023
        assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_registration_passes_opcheck(backend):
    h, w, b = _problem(3, 8, (5,), seed=11)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 0.7, 1.3, backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if backend == "torch":
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.xkern.xcross_integrate_fwd.default, args, test_utils=tests)
    z = torch.randn(5, 12, device=DEVICE)
    torch.library.opcheck(torch.ops.xkern.xcross_integrate_input_grad.default,
                          (torch.randn_like(h), h.detach(), w.detach(), z, 0.7, 1.3, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_forward_and_backward():
    h, w, b = _problem(2, 6, (3,), seed=12)
    w.requires_grad_()

    def step(h, w):
        return xcross_integrate(h, w, 1.0, 1.0, b).square().sum()

    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(h, w)
    loss.backward()
    grad_compiled = w.grad.clone()
    w.grad = None
    step(h, w).backward()
    torch.testing.assert_close(grad_compiled, w.grad)


# ------------------------------------------------------------------------------------------ errors, dispatch

def test_invalid_inputs_are_refused_with_the_argument_named():
    h, w, b = _problem(3, 4, (2,), seed=13)
    with pytest.raises(ValueError, match="n >= 2"):
        xcross_integrate(h[:1], torch.zeros(0, 4), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"h must be \[n, ..., d\]"):
        xcross_integrate(h[0, 0], w)
    with pytest.raises(ValueError, match=r"w_concat must be \[2n\(n-1\), n\*d\] = \[12, 12\]"):
        xcross_integrate(h, w[:, :8])
    with pytest.raises(ValueError, match="w_concat must be"):
        xcross_integrate(h, w[:8])
    with pytest.raises(ValueError, match="w_concat must be"):
        xcross_integrate(h, w.reshape(12, 3, 4))
    with pytest.raises(ValueError, match=r"bias must be \[2n\(n-1\)\] = \[12\]"):
        xcross_integrate(h, w, 1.0, 1.0, b[:6])
    with pytest.raises(ValueError, match="one device"):
        xcross_integrate(h, w.to("meta"))
    with pytest.raises(ValueError, match="bias=meta"):
        xcross_integrate(h, w, 1.0, 1.0, b.to("meta"))
    with pytest.raises(TypeError, match="w_concat must have h's dtype"):
        xcross_integrate(h, w.to(torch.bfloat16))
    with pytest.raises(TypeError, match="bias must have h's dtype"):
        xcross_integrate(h, w, 1.0, 1.0, b.half())
    with pytest.raises(TypeError, match="h must be float32"):
        xcross_integrate(h.to(torch.int32), w.to(torch.int32))
    with pytest.raises(TypeError, match="w_concat must be float32"):
        xcross_integrate(h, w.to(torch.int64))
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        xcross_integrate(h.tolist(), w)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        xcross_integrate(h, w, 1.0, 1.0, [0.0] * 12)
    with pytest.raises(TypeError, match="beta must be a python float"):
        xcross_integrate(h, w, torch.tensor(1.0))
    with pytest.raises(TypeError, match="gamma must be a python float"):
        xcross_integrate(h, w, 1.0, "1")
    with pytest.raises(TypeError, match="backend 'triton' supports float32"):
        xcross_integrate(h.double(), w.double(), backend="triton")
    with pytest.raises(RuntimeError, match="backend .cuda. needs CUDA tensors"):
        xcross_integrate(h.cpu(), w.cpu(), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        xcross_integrate(h, w, backend="fast")


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("XKERN_BACKEND", raising=False)
    assert select_backend("xcross_integrate", cpu) == "torch"
    monkeypatch.setenv("XKERN_BACKEND", "triton")
    assert select_backend("xcross_integrate", cpu) == "triton"  # the interpreter is on in these tests
    h, w, b = _problem(2, 5, (3,), seed=14)
    forced = xcross_integrate(h.cpu(), w.cpu(), 1.0, 1.0, b.cpu())
    monkeypatch.setenv("XKERN_BACKEND", "torch")
    torch.testing.assert_close(forced, xcross_integrate(h.cpu(), w.cpu(), 1.0, 1.0, b.cpu()), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d,tokens", [(2, 576, 4096), (3, 4096, 8), (3, 4096, 1000), (4, 2048, 333), (8, 256, 77)])
def test_gpu_large_shapes_match_reference(n, d, tokens, dtype):
    h, w, b = _problem(n, d, (tokens,), dtype, seed=15)
    g = torch.randn(h.shape, device=DEVICE)
    res = {}
    for backend in BACKENDS:
        hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
        out = xcross_integrate(hl, wl, 1.0, 1.0, bl, backend=backend)
        (out.float() * g).sum().backward()
        res[backend] = (out, hl.grad, wl.grad, bl.grad)
    tol = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for name, got, ref in zip(("out", "dh", "dw", "dbias"), res["triton"], res["torch"], strict=True):
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol[0], atol=tol[1] * ref.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
def test_gpu_bf16_forward_speed_is_near_copy_bandwidth():
    """Reads n*d and writes n*d per token: report the achieved bandwidth of the fused forward (bf16)."""
    import triton.testing

    n, d, tokens = 3, 4096, 16384
    h, w, b = _problem(n, d, (tokens,), torch.bfloat16, seed=16)
    ms = triton.testing.do_bench(lambda: xcross_integrate(h, w, 1.0, 1.0, b, backend="triton"))
    copy_ms = triton.testing.do_bench(lambda: h.clone())
    gbps = 2 * h.numel() * h.element_size() / ms / 1e6
    print(f"xcross_integrate bf16 n={n} d={d} T={tokens}: {ms * 1e3:.1f} us, {gbps:.0f} GB/s "
          f"({copy_ms / ms:.2f} of a same-size copy)")
    assert ms < 10 * copy_ms


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the 16-bit dot branch runs for real in the tests above")
@pytest.mark.parametrize("n,d,lead", [(2, 37, (1,)), (3, 32, (21,)), (5, 19, (18,))])
def test_gpu_16bit_dot_branch_forced_on_the_interpreter(monkeypatch, n, d, lead):
    """The forward kernel's GPU-only branch (16-bit ``tl.dot`` operands) on the CPU interpreter, in float16,
    against the literal float64 equations on the same rounded inputs."""
    from tests.helpers import record_triton_launches
    from xkern.ops.backends import triton_jit as tri

    launches = record_triton_launches(monkeypatch)
    monkeypatch.setattr(tri, "FORCE_16BIT_DOT", True)
    h, w, b = _problem(n, d, lead, torch.float16, seed=n * d)
    got = xcross_integrate(h, w, 0.8, 1.2, b, backend="triton")
    assert [m["LOW_PRECISION_DOT"] for m in launches] == [True]  # the forward kernel took the 16-bit branch
    expected = literal_xcross(h.double(), w.double(), b.double(), 0.8, 1.2)
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
