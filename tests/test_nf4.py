"""NF4 format: byte-exactness with bitsandbytes, serialization both ways, the Triton dequantize kernel."""

import io

import pytest
import torch
from safetensors.torch import load, save

from tests.helpers import OptionalModule
from xkern import NF4Tensor, dequantize_nf4, quantize_nf4
from xkern.nf4 import NF4_CODE_VALUES, QuantStateError, dynamic_code, nf4_code
from xkern.ops import dequantize

bnbF = OptionalModule("bitsandbytes.functional")
bnb_nn = OptionalModule("bitsandbytes.nn")

SHAPES = [(64, 64), (33, 17), (1, 5), (7,), (300, 129), (128, 1000), (3, 4, 50)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    # rows of different magnitude, so block scales spread out
    return (w * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g) * 3).to(dtype)


def _near_tie_only(ours, theirs, scaled, code):
    """bitsandbytes' native CPU 8-bit search picks the neighbour code for some values near a midpoint."""
    diff = ours != theirs
    if not diff.any():
        return True
    o, t = ours[diff].long(), theirs[diff].long()
    if ((o - t).abs() != 1).any():
        return False
    lo, hi = torch.minimum(o, t), torch.maximum(o, t)
    mid, gap = (code[lo] + code[hi]) / 2, code[hi] - code[lo]
    return bool(((scaled[diff] - mid).abs() <= 0.1 * gap).all()) and diff.float().mean() < 0.01


def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbF.create_dynamic_map(signed=True))
    assert len(NF4_CODE_VALUES) == 16


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_quantization_is_byte_exact(shape, dtype):
    w = _weight(shape, dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    t = quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(t.packed, packed.view(-1))
    assert torch.equal(t.absmax, state.absmax)
    assert t.shape == w.shape and t.dtype == dtype
    deq = dequantize_nf4(t)
    assert deq.dtype == dtype
    assert torch.equal(deq, bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", SHAPES + [(1000, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quantization_matches_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype, seed=1)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    t = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(t.packed, packed.view(-1))
    assert torch.equal(t.offset, state.offset)
    assert torch.equal(t.absmax2, state.state2.absmax)
    assert torch.equal(t.code2, state.state2.code)
    # nested 8-bit codes: identical except bitsandbytes' CPU near-tie quirk (docs/formats.md)
    plain = quantize_nf4(w, blocksize=64, double_quant=False).absmax - t.offset
    blocks = torch.arange(plain.numel()) // 256
    scaled = plain / t.absmax2[blocks]
    assert _near_tie_only(t.absmax, state.absmax, scaled, t.code2)
    # given the same stored bytes, dequantization is identical
    ours_from_theirs = NF4Tensor(packed=t.packed, absmax=state.absmax, shape=t.shape, dtype=t.dtype,
                                 absmax2=t.absmax2, code2=t.code2, offset=t.offset)
    assert torch.equal(dequantize_nf4(ours_from_theirs), bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes(blocksize):
    w = _weight((40, 72), torch.float32, seed=2)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    t = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(t.packed, packed.view(-1)) and torch.equal(t.absmax, state.absmax)


def test_quantization_error_is_bounded():
    w = _weight((256, 256), torch.float32, seed=3)
    t = quantize_nf4(w, double_quant=False)
    err = (t.dequantize() - w).abs().view(-1, 64)
    absmax = w.abs().view(-1, 64).amax(dim=1, keepdim=True)
    # nearest-code rounding: the error is at most half the widest gap between codes, times absmax
    half_gap = max(b - a for a, b in zip(NF4_CODE_VALUES[:-1], NF4_CODE_VALUES[1:], strict=True)) / 2
    assert (err <= absmax * half_gap * (1 + 1e-6)).all()
    assert (err > absmax * half_gap * 0.5).any()  # and the bound is not vacuous


def test_zero_block_and_edge_values():
    w = torch.zeros(2, 64)
    w[1, :4] = torch.tensor([1.0, -1.0, 0.5, -0.25])
    t = quantize_nf4(w, double_quant=False)
    assert torch.equal(t.dequantize()[0], torch.zeros(64))
    assert t.dequantize()[1, 0] == 1.0 and t.dequantize()[1, 1] == -1.0
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(t.packed, packed.view(-1))


def test_nbytes_per_parameter():
    w = torch.randn(4096, 4096)
    plain, nested = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    assert plain.nbytes / w.numel() == pytest.approx(0.5625, abs=1e-9)
    # 4 bits + one byte per 64 + a float per 64 * 256, plus the 256-entry code and the offset
    expected = 0.5 + 1 / 64 + 4 / (64 * 256) + (256 * 4 + 4) / w.numel()
    assert nested.nbytes / w.numel() == pytest.approx(expected, abs=1e-9)
    assert nested.nbytes / w.numel() == pytest.approx(0.51587, abs=1e-4)


def test_to_device_and_errors():
    t = quantize_nf4(torch.randn(8, 64))
    assert t.to("cpu") is t
    meta = t.to("meta")
    assert meta.packed.device.type == "meta" and meta.shape == t.shape
    with pytest.raises(TypeError, match="weight must be float32"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.randn(0, 64))
    with pytest.raises(ValueError, match="packed has"):
        NF4Tensor(packed=t.packed[:-1], absmax=t.absmax, shape=t.shape, dtype=t.dtype,
                  absmax2=t.absmax2, code2=t.code2, offset=t.offset)
    with pytest.raises(ValueError, match="together"):
        NF4Tensor(packed=t.packed, absmax=t.absmax, shape=t.shape, dtype=t.dtype, absmax2=t.absmax2)


# ---- serialization --------------------------------------------------------------------------

def _bnb_linear(out_features, in_features, double_quant, seed=0):
    torch.manual_seed(seed)
    layer = bnb_nn.Linear4bit(in_features, out_features, bias=False, compress_statistics=double_quant, quant_type="nf4")
    w = torch.randn(out_features, in_features)
    layer.weight = bnb_nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type="nf4")
    return layer.to("cpu"), w


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_state_dict_loads_into_xkern(double_quant):
    layer, _ = _bnb_linear(30, 70, double_quant)
    sd = layer.state_dict()
    sd = load(save({k: v.contiguous() for k, v in sd.items()}))  # through safetensors, as on disk
    t = NF4Tensor.from_bnb_state_dict(sd, "weight")
    assert t.double_quant == double_quant
    assert torch.equal(t.packed, layer.weight.data.view(-1))
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(t.dequantize(), expected)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(30, 70), (17, 33)])
def test_xkern_state_dict_loads_into_bitsandbytes(double_quant, shape):
    w = _weight(shape, torch.bfloat16, seed=4)
    t = quantize_nf4(w, double_quant=double_quant)
    sd = t.to_bnb_state_dict("layer.weight")
    buf = io.BytesIO(save({k: v.contiguous() for k, v in sd.items()}))
    sd = load(buf.getvalue())
    stats = {k.removeprefix("layer.weight."): v for k, v in sd.items() if k != "layer.weight"}
    param = bnb_nn.Params4bit.from_prequantized(sd["layer.weight"], stats, requires_grad=False, device="cpu")
    got = bnbF.dequantize_4bit(param.data, param.quant_state)
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    assert torch.equal(got, t.dequantize())
    # and back again, unchanged
    t2 = NF4Tensor.from_bnb_state_dict(sd, "layer.weight")
    assert torch.equal(t2.dequantize(), t.dequantize())


def test_corrupt_or_incomplete_state_dict_is_refused():
    t = quantize_nf4(torch.randn(8, 64))
    sd = t.to_bnb_state_dict("w")
    with pytest.raises(QuantStateError, match="w.absmax"):
        NF4Tensor.from_bnb_state_dict({k: v for k, v in sd.items() if k != "w.absmax"}, "w")
    with pytest.raises(QuantStateError, match="quant_state"):
        NF4Tensor.from_bnb_state_dict({k: v for k, v in sd.items() if "quant_state" not in k}, "w")
    bad = dict(sd)
    bad["w.quant_state.bitsandbytes__nf4"] = torch.tensor([0xFF, 0xFE, 0x00], dtype=torch.uint8)
    with pytest.raises(ValueError, match="corrupt quant state"):
        NF4Tensor.from_bnb_state_dict(bad, "w")
    bad = dict(sd)
    bad["w.quant_map"] = torch.linspace(-1, 1, 16)
    with pytest.raises(ValueError, match="not the NF4 code table"):
        NF4Tensor.from_bnb_state_dict(bad, "w")
    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="FP4"):
        NF4Tensor.from_bnb_state_dict(fp4, "w")
    truncated = dict(sd)
    truncated["w"] = sd["w"][:-3]
    with pytest.raises(ValueError, match="packed has"):
        NF4Tensor.from_bnb_state_dict(truncated, "w")


# ---- Triton dequantize kernel (CPU interpreter here) -----------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(33, 17), (64, 130), (5,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dequantize_matches_reference(double_quant, shape, dtype):
    t = quantize_nf4(_weight(shape, torch.float32, seed=5), double_quant=double_quant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = t.to(device)
    got = dequantize(t, dtype, backend="triton")
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), dequantize_nf4(t, dtype).cpu())
