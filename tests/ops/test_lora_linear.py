"""The fused NF4 + multi-adapter LoRA op: every backend against float64 references, bitsandbytes, autograd."""

import pytest
import torch

from tests.helpers import OptionalModule, dense_lora_reference, random_lora_bank, record_triton_launches
from xkern import NF4Tensor, quantize_nf4
from xkern.ops import RowRouting, lora_linear, select_backend
from xkern.ops.backends import cpu_native
from xkern.ops.backends import triton_jit as tri

bnb = OptionalModule("bitsandbytes")
bnbF = OptionalModule("bitsandbytes.functional")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] + (["cpu"] if DEVICE == "cpu" and cpu_native.extension() is not None else [])
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}


def _problem(m, n, k, ranks, dtype=torch.float32, seed=0, double_quant=True, ids=None):
    """Random inputs; adapters of differing ranks zero-padded into one bank ``[n_adapters, r_max, K]``."""
    g = torch.Generator().manual_seed(seed)
    lora_A, lora_B = random_lora_bank(ranks, n, k, g)
    w = torch.randn(n, k, generator=g) / k**0.5
    weight = quantize_nf4(w.to(dtype), double_quant=double_quant).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype)
    scale = torch.rand(len(ranks), generator=g) + 0.5
    if ids is None:
        ids = torch.randint(-1, len(ranks), (m,), generator=g)
    return x, weight, lora_A, lora_B, scale, ids


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,ranks", [
    (1, 48, 100, [4]),            # decode row, K not a multiple of any block
    (7, 40, 64, [2, 5, 3]),       # ranks that differ per adapter
    (37, 72, 96, [8, 8, 8, 8]),   # several row tiles
])
def test_forward_matches_float64_reference(backend, dtype, m, n, k, ranks):
    x, weight, A, B, s, ids = _problem(m, n, k, ranks, dtype)
    expected = dense_lora_reference(x, weight.dequantize(torch.float32).cpu(), A, B, s, ids)
    x, A, B, ids = _dev(x, A.to(dtype), B.to(dtype), ids)
    got = lora_linear(x, weight, A, B, s.to(DEVICE), ids, backend=backend)
    assert got.dtype == dtype and got.shape == (m, n)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.cpu().double(), expected, rtol=rtol, atol=atol * expected.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsorted_ids_base_rows_and_leading_dims(backend):
    x, weight, A, B, s, _ = _problem(12, 32, 64, [4, 4, 4])
    ids = torch.tensor([2, -1, 0, 2, 1, -1, 0, 0, 2, 1, -1, 2])
    expected = dense_lora_reference(x, weight.dequantize(torch.float32).cpu(), A, B, s, ids)
    x3, A, B, ids_dev = _dev(x.view(3, 4, 64), A, B, ids)
    got = lora_linear(x3, weight, A, B, s.to(DEVICE), ids_dev.view(3, 4), backend=backend)
    assert got.shape == (3, 4, 32)
    torch.testing.assert_close(got.reshape(12, 32).cpu().double(), expected, rtol=2e-4, atol=2e-4)
    # base-only rows equal the plain NF4 matmul exactly as the reference computes it
    base = lora_linear(x.to(DEVICE), weight, A, B, s.to(DEVICE), None, backend=backend)
    torch.testing.assert_close(base[ids_dev == -1].cpu(), got.reshape(12, 32)[ids_dev == -1].cpu(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_bank_equals_each_adapter_alone(backend):
    """A rank-2 and a rank-6 adapter in one bank give what each gives as its own single-adapter call."""
    x, weight, A, B, s, _ = _problem(6, 24, 80, [2, 6], seed=3)
    ids = torch.tensor([0, 1, 1, 0, 1, 0])
    x, A, B, s, ids = _dev(x, A, B, s, ids)
    together = lora_linear(x, weight, A, B, s, ids, backend=backend)
    for a, r in enumerate([2, 6]):
        rows = ids == a
        alone = lora_linear(x[rows], weight, A[a:a + 1, :r], B[a:a + 1, :, :r], s[a:a + 1],
                            torch.zeros(int(rows.sum()), dtype=torch.long, device=DEVICE), backend=backend)
        torch.testing.assert_close(together[rows], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes_matmul_plus_lora_loop(backend, double_quant):
    """Same weight quantized by bitsandbytes: bnb matmul_4bit + a PEFT-style per-adapter loop."""
    g = torch.Generator().manual_seed(5)
    n, k, m = 48, 128, 9
    w = torch.randn(n, k, generator=g)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    # bitsandbytes' own serializer writes the keys xkern reads
    sd = {"w": packed, **{f"w.{key}": v for key, v in state.as_dict(packed=True).items()}}
    weight = NF4Tensor.from_bnb_state_dict(sd, "w").to(DEVICE)
    A = torch.randn(3, 4, k, generator=g) * 0.1
    B = torch.randn(3, n, 4, generator=g) * 0.1
    s = torch.tensor([2.0, 0.5, 1.0])
    x = torch.randn(m, k, generator=g)
    ids = torch.tensor([0, 1, 2, -1, 2, 1, 0, 0, 1])
    expected = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    for a in range(3):  # PEFT's LoRA: x -> dropout(identity) -> A -> B, times scaling, one adapter at a time
        rows = ids == a
        expected[rows] += s[a] * (x[rows] @ A[a].T) @ B[a].T
    x, A, B, s, ids = _dev(x, A, B, s, ids)
    got = lora_linear(x, weight, A, B, s, ids, backend=backend)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_autograd_of_reference(backend, dtype):
    x, weight, A, B, s, ids = _problem(10, 24, 72, [4, 2, 3], dtype=dtype, seed=7)
    ids = torch.tensor([1, 0, -1, 2, 2, 0, 1, -1, 0, 2])
    w_dense = weight.dequantize(torch.float32).cpu()
    grad_out = torch.randn(10, 24, generator=torch.Generator().manual_seed(8))
    xr, Ar, Br = (t.double().requires_grad_() for t in (x, A, B))
    (dense_lora_reference(xr, w_dense, Ar, Br, s, ids) * grad_out.double()).sum().backward()

    xg = x.to(DEVICE).requires_grad_()
    Ag = A.to(DEVICE, dtype).requires_grad_()
    Bg = B.to(DEVICE, dtype).requires_grad_()
    y = lora_linear(xg, weight, Ag, Bg, s.to(DEVICE), ids.to(DEVICE), backend=backend)
    (y.float() * grad_out.to(DEVICE)).sum().backward()
    rtol, atol = TOL[dtype]
    for got, ref in ((xg.grad, xr.grad), (Ag.grad, Ar.grad), (Bg.grad, Br.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().double(), ref, rtol=rtol, atol=atol * ref.abs().max().item())
    # adapters no row uses get exactly zero gradient
    x2, _, A2, B2, s2, _ = _problem(4, 24, 72, [4, 4, 4], seed=9)
    A2, B2 = A2.to(DEVICE).requires_grad_(), B2.to(DEVICE).requires_grad_()
    lora_linear(x2.to(DEVICE), weight, A2, B2, s2.to(DEVICE), torch.tensor([0, 0, 2, -1], device=DEVICE),
                backend=backend).sum().backward()
    assert A2.grad[1].abs().max() == 0 and B2.grad[1].abs().max() == 0
    assert A2.grad[0].abs().max() > 0 and B2.grad[2].abs().max() > 0


@pytest.mark.parametrize("config", [
    tri.LaunchConfig(16, 16, 16, split_k=3),                    # deterministic split-K (last program sums)
    tri.LaunchConfig(16, 64, 64),                               # one wide tile
    tri.LaunchConfig(16, 32, 32, dequant_base=True),            # large-M path: dequantize + matmul, LoRA epilogue
    tri.LaunchConfig(16, 16, 32, shrink_m=16, shrink_k=16),     # shrink tiles smaller than K
])
@pytest.mark.parametrize("m,n,k,ranks,blocksize", [
    (5, 40, 100, [3, 5], 64),     # K % 8 != 0 and K % 64 != 0: per-byte scales from the flat index
    (1, 48, 45, [2], 64),         # odd K: a byte holds the end of one row and the start of the next
    (19, 64, 128, [4, 1, 6], 64),  # K, N multiples of every tile: unmasked columns, one scale per block
    (6, 32, 256, [2, 2], 128),    # quantization block spanning several K tiles
])
def test_triton_configs_and_shapes(config, m, n, k, ranks, blocksize):
    """Every launch variant of the Triton path (split-K, large-M, decode layouts) on odd and even shapes."""
    g = torch.Generator().manual_seed(11 + m)
    x, weight, A, B, s, ids = _problem(m, n, k, ranks, seed=11 + m)
    weight = quantize_nf4(weight.dequantize(torch.float32).cpu(), blocksize=blocksize).to(DEVICE)
    expected = dense_lora_reference(x, weight.dequantize(torch.float32).cpu(), A, B, s, ids)
    x, A, B, s, ids = _dev(x, A, B, s, ids.int())
    routing = RowRouting.build(ids, A.shape[0])
    for _ in range(2):  # split-K counters are per call: a second call starts from zero like the first
        y, xa = tri.lora_linear_forward(x, weight, A, B, s, routing, config=config)
        torch.testing.assert_close(y.cpu().double(), expected, rtol=2e-4, atol=2e-4)
    grad = torch.randn(y.shape, generator=g).to(DEVICE)
    dx, gb = tri.lora_linear_input_grad(grad, weight, A, B, s, routing, config=config)
    ref_dx, ref_g = _reference_input_grad(grad, weight, A, B, s, routing)
    torch.testing.assert_close(dx, ref_dx, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(gb, ref_g, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(xa, (x @ A.transpose(1, 2))[ids.clamp(min=0).long(), torch.arange(m)]
                               * (ids >= 0)[:, None], rtol=2e-4, atol=2e-4)


def test_split_k_counters_belong_to_one_launch(monkeypatch):
    """Counters are allocated zeroed for each launch: nothing a failed or concurrent launch left behind (here:
    the buffer a previous launch used, poisoned) can reach the next one."""
    seen = []
    made = tri._counters

    def recording(n, device):
        c = made(n, device)
        assert c.eq(0).all()
        seen.append(c)
        return c

    monkeypatch.setattr(tri, "_counters", recording)
    x, weight, A, B, s, ids = _problem(3, 32, 128, [2, 3], seed=5)
    x, A, B, s, ids = _dev(x, A, B, s, ids.int())
    routing = RowRouting.build(ids, A.shape[0])
    cfg = tri.LaunchConfig(16, 32, 32, split_k=2, num_warps=1, num_stages=1, shrink_m=16, shrink_k=32)
    first, _ = tri.lora_linear_forward(x, weight, A, B, s, routing, config=cfg)
    seen[0].fill_(1)  # as if that launch had died half-way
    again, _ = tri.lora_linear_forward(x, weight, A, B, s, routing, config=cfg)
    assert len(seen) == 2 and seen[0].data_ptr() != seen[1].data_ptr()
    torch.testing.assert_close(again, first)


def test_more_adapters_than_a_launch_grid_holds_are_refused():
    from xkern.errors import InputError

    n_adapters = tri.MAX_GRID_Y  # one y per adapter plus one for base rows: one too many
    weight = quantize_nf4(torch.randn(2, 64)).to(DEVICE)
    A, B = torch.zeros(n_adapters, 1, 64, device=DEVICE), torch.zeros(n_adapters, 2, 1, device=DEVICE)
    routing = RowRouting.build(torch.tensor([0, n_adapters - 1], dtype=torch.int32, device=DEVICE), n_adapters)
    with pytest.raises(InputError, match=f"at most {tri.MAX_GRID_Y - 1} adapters"):
        tri.lora_linear_forward(torch.randn(2, 64, device=DEVICE), weight, A, B,
                                torch.ones(n_adapters, device=DEVICE), routing)


def test_triton_dequantize_matches_reference_on_odd_sizes():
    for shape, blocksize in (((7, 9), 64), ((33, 64), 64), ((4, 512), 256), ((3, 2048), 4096)):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        for dq in (False, True):
            weight = quantize_nf4(w, blocksize=blocksize, double_quant=dq).to(DEVICE)
            torch.testing.assert_close(tri.dequantize(weight, torch.float32), weight.dequantize(torch.float32),
                                       rtol=0, atol=0)


def _reference_input_grad(*args):
    from xkern.ops import reference
    return reference.lora_linear_input_grad(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_row(backend):
    x, weight, A, B, s, ids = _problem(6, 32, 64, [4, 4], seed=12)
    x[2, 5] = float("nan")
    y = lora_linear(*_dev(x), weight, *_dev(A, B, s, ids), backend=backend).cpu()
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[torch.arange(6) != 2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_segments_of_a_large_batch(backend):
    """Rows grouped in long runs per adapter (X-Cross streams, one adapter per training batch): forward and
    input gradient against float64 (the native backend folds each adapter into the weight there)."""
    m_per = 70 if backend != "triton" else 20
    ids = torch.tensor([1] * m_per + [-1] * (m_per // 2) + [0] * m_per)
    x, weight, A, B, s, _ = _problem(len(ids), 48, 96, [4, 6], seed=21)
    expected = dense_lora_reference(x, weight.dequantize(torch.float32).cpu(), A, B, s, ids)
    xg = x.to(DEVICE).requires_grad_()
    got = lora_linear(xg, weight, *_dev(A, B, s, ids), backend=backend)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(22))
    (got * grad.to(DEVICE)).sum().backward()
    xr = x.detach().double().requires_grad_()
    (dense_lora_reference(xr, weight.dequantize(torch.float32).cpu(), A, B, s, ids) * grad.double()).sum().backward()
    torch.testing.assert_close(xg.grad.cpu().double(), xr.grad, rtol=2e-5, atol=2e-5 * xr.grad.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_adapter_stays_in_its_rows(backend):
    """Each row's LoRA uses its own adapter only: a NaN in adapter 1 reaches neither base rows nor adapter 0's."""
    x, weight, A, B, s, _ = _problem(6, 32, 64, [4, 4], seed=13)
    ids = torch.tensor([0, 1, -1, 1, 0, -1])
    A[1, 2, 7] = float("nan")
    B[1, 3, 0] = float("inf")
    xg = x.to(DEVICE).requires_grad_()
    Ag, Bg = A.to(DEVICE).requires_grad_(), B.to(DEVICE).requires_grad_()
    y = lora_linear(xg, weight, Ag, Bg, s.to(DEVICE), ids.to(DEVICE), backend=backend)
    rows1 = ids == 1
    assert not torch.isfinite(y[rows1.to(DEVICE)]).all()
    assert torch.isfinite(y[~rows1.to(DEVICE)]).all()
    (y[~rows1.to(DEVICE)]).sum().backward()
    assert torch.isfinite(xg.grad[~rows1.to(DEVICE)]).all()  # rows of adapter 1 meet 0 * inf: not required finite
    assert torch.isfinite(Ag.grad[0]).all() and torch.isfinite(Bg.grad[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_an_empty_result(backend):
    _, weight, A, B, s, _ = _problem(1, 24, 64, [4, 2])
    x = torch.zeros(0, 64, device=DEVICE, requires_grad=True)
    y = lora_linear(x, weight, A.to(DEVICE), B.to(DEVICE), s.to(DEVICE), torch.zeros(0, dtype=torch.long,
                                                                                   device=DEVICE), backend=backend)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    y3 = lora_linear(torch.zeros(2, 0, 64, device=DEVICE), weight, A.to(DEVICE), B.to(DEVICE), s.to(DEVICE),
                     backend=backend)
    assert y3.shape == (2, 0, 24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_exact_rounds_once_and_native_stays_in_bf16_bounds(backend):
    """exact: the float32 result rounded to bf16 once (one step at most where the sum order differs); native:
    within six bf16 roundings of |x| |W|^T + LoRA;
    float32 activations: both precisions give the same result."""
    x, weight, A, B, s, ids = _problem(40, 48, 256, [4, 4], torch.bfloat16, seed=3)
    x, A, B, s, ids = _dev(x, A, B, s, ids)
    f32 = lora_linear(x.float(), weight, A, B, s, ids, backend=backend)
    exact = lora_linear(x, weight, A, B, s, ids, backend=backend, precision="exact")
    native = lora_linear(x, weight, A, B, s, ids, backend=backend, precision="native")
    assert exact.dtype == native.dtype == torch.bfloat16
    # the two float32 sums may differ in order (AMX tiles vs AVX-512), so a value on a rounding boundary may round
    # to its neighbour: within one bf16 step everywhere, and identical nearly everywhere
    rounded = f32.to(torch.bfloat16).float()
    torch.testing.assert_close(exact.float(), rounded, rtol=2**-7, atol=0)
    assert (exact.float() != rounded).float().mean() <= 0.01
    w_abs = weight.dequantize(torch.float32).abs()
    abs_ref = dense_lora_reference(x.float().abs().cpu(), w_abs.cpu(), A.abs().cpu(), B.abs().cpu(), s.cpu(), ids.cpu())
    assert ((native.cpu().double() - f32.cpu().double()).abs() <= 2**-6 * abs_ref + 1e-30).all()
    for p in ("native", "exact"):
        torch.testing.assert_close(lora_linear(x.float(), weight, A, B, s, ids, backend=backend, precision=p), f32,
                                   rtol=0, atol=0)


def test_invalid_inputs_are_refused_with_the_argument_named():
    x, weight, A, B, s, ids = _problem(4, 16, 64, [4, 4])
    with pytest.raises(ValueError, match="last dimension"):
        lora_linear(torch.randn(4, 63), weight, A, B, s, ids)
    with pytest.raises(ValueError, match="lora_A has K"):
        lora_linear(x, weight, A[:, :, :32], B, s, ids)
    with pytest.raises(ValueError, match="lora_B must be"):
        lora_linear(x, weight, A, B[:, :8], s, ids)
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(x, weight, A[0], B, s, ids)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 1\]"):
        lora_linear(x, weight, A, B, s, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="adapter_ids must lie"):
        lora_linear(x, weight, A, B, s, torch.tensor([0, -2, 1, 0]))
    with pytest.raises(ValueError, match="adapter_ids has 3 entries"):
        lora_linear(x, weight, A, B, s, torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="adapter_ids must be an integer"):
        lora_linear(x, weight, A, B, s, torch.zeros(4))
    with pytest.raises(TypeError, match="x must be float32"):
        lora_linear(x.to(torch.int32), weight, A, B, s, ids)
    with pytest.raises(TypeError, match="lora_B must be float32"):
        lora_linear(x, weight, A, B.to(torch.float64), s, ids)
    with pytest.raises(TypeError, match="weight must be an NF4Tensor"):
        lora_linear(x, torch.randn(16, 64), A, B, s, ids)
    with pytest.raises(ValueError, match="scale has 3 entries"):
        lora_linear(x, weight, A, B, [1.0, 2.0, 3.0], ids)
    with pytest.raises(ValueError, match="one device"):
        lora_linear(x, weight, A.to("meta"), B, s, ids)
    from dataclasses import replace
    strided = replace(weight, packed=torch.stack([weight.packed, weight.packed], 1)[:, 0])
    with pytest.raises(ValueError, match="contiguous"):
        lora_linear(x, strided, A, B, s, ids)
    with pytest.raises(RuntimeError, match="backend .cuda. needs CUDA tensors"):
        lora_linear(x, weight, A, B, s, ids, backend="cuda")
    with pytest.raises(ValueError, match=r"precision must be one of \('native', 'exact'\), got 'bf16'"):
        lora_linear(x, weight, A, B, s, ids, precision="bf16")


def test_backend_selection(monkeypatch):
    from xkern.ops.backends import cpu_native

    cpu = torch.device("cpu")
    monkeypatch.delenv("XKERN_BACKEND", raising=False)
    assert select_backend("lora_linear", cpu) == ("cpu" if cpu_native.extension() is not None else "torch")
    monkeypatch.setenv("XKERN_BACKEND", "triton")
    assert select_backend("lora_linear", cpu) == "triton"  # the interpreter is on in these tests
    monkeypatch.setenv("XKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="XKERN_BACKEND"):
        select_backend("lora_linear", cpu)


def test_scale_forms_agree():
    x, weight, A, B, _, ids = _problem(5, 16, 64, [4, 4])
    a = lora_linear(x, weight, A, B, 0.75, ids)
    b = lora_linear(x, weight, A, B, [0.75, 0.75], ids)
    c = lora_linear(x, weight, A, B, torch.tensor([0.75, 0.75]), ids)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_custom_op_registration_passes_opcheck():
    x, weight, A, B, s, ids = _problem(5, 16, 64, [4, 4])
    A.requires_grad_()
    B.requires_grad_()
    op = torch.ops.xkern.lora_linear_fwd.default
    routing = RowRouting.build(ids, A.shape[0])
    parts, meta = weight.parts()
    args = (x.requires_grad_(), parts, meta, A, B, s, routing.ids, routing.order, routing.starts, "torch", "native")
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_traces_forward_and_backward():
    """The compiled path (the custom ops) and the eager training path (direct kernel calls) run the one
    backward: the same loss and the same gradients of x, A and B."""
    x, weight, A, B, s, ids = _problem(6, 16, 64, [4, 4])
    inputs = [t.requires_grad_() for t in (x, A, B)]

    def step(x, A, B):
        return lora_linear(x, weight, A, B, s, ids).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_compiled = compiled(*inputs)
    grads_compiled = torch.autograd.grad(loss_compiled, inputs)
    loss_eager = step(*inputs)
    grads_eager = torch.autograd.grad(loss_eager, inputs)
    torch.testing.assert_close(loss_compiled, loss_eager)
    for got, want in zip(grads_compiled, grads_eager, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the 16-bit dot branches run for real in the tests above")
@pytest.mark.parametrize("m,n,k,ranks", [(1, 48, 100, [4]), (7, 40, 64, [2, 5, 3]), (37, 72, 96, [8, 8, 8, 8])])
def test_gpu_16bit_dot_branches_forced_on_the_interpreter(monkeypatch, m, n, k, ranks):
    """The GPU-only branches (16-bit ``tl.dot`` operands in the shrink and the fused kernel) run on the CPU
    interpreter in float16 and match the float64 reference: that code is checked where no GPU is."""
    launches = record_triton_launches(monkeypatch)
    monkeypatch.setattr(tri, "FORCE_16BIT_DOT", True)
    x, weight, A, B, s, ids = _problem(m, n, k, ranks, torch.float16)
    expected = dense_lora_reference(x, weight.dequantize(torch.float32), A, B, s, ids)
    got = lora_linear(x, weight, A.half(), B.half(), s, ids, backend="triton")
    assert launches and all(m["LOW_PRECISION_DOT"] for m in launches)  # every launch took the 16-bit branch
    rtol, atol = TOL[torch.float16]
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol * expected.abs().max().item())
