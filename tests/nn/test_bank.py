"""The per-layer adapter bank: parameters are views of it (no copy per call), and it follows every change."""

from __future__ import annotations

import pytest
import torch

import xkern
from tests.helpers import tiny_model

NAMES = ["a", "b", "c"]


def _model(dtype=torch.float32) -> xkern.XkernModel:
    xm = xkern.load_model(tiny_model("llama"), dtype=dtype, progress=False)
    for i, (name, r) in enumerate(zip(NAMES, (4, 8, 2), strict=True)):  # ranks differ: padded slots
        xm.add_adapter(name, r=r, lora_alpha=2 * r, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
                       seed=10 + i)
    return xm.eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(1))


def _logits(xm, names=("a", "c", "__base__", "b")) -> torch.Tensor:
    with torch.no_grad():
        return xm(input_ids=_ids(), adapter_names=list(names)).logits


def _dense_reference(xm, names=("a", "c", "__base__", "b")) -> torch.Tensor:
    """Each sample alone with its adapter's delta folded into a dense float32 copy of the layer: no bank at all."""
    outs = []
    for i, name in enumerate(names):
        hooks = []
        for layer in xm.nf4_layers.values():
            delta = layer.delta_weight(name) if name in layer.lora_A else None

            def hook(mod, inp, out, delta=delta):
                w = mod.nf4_weight.dequantize(torch.float32) + (0 if delta is None else delta)
                return inp[0].float() @ w.T

            hooks.append(layer.register_forward_hook(hook))
        try:
            with torch.no_grad():
                outs.append(xm(input_ids=_ids()[i:i + 1], adapter_names="__base__").logits)
        finally:
            for h in hooks:
                h.remove()
    return torch.cat(outs)


def test_parameters_are_views_of_one_bank_and_calls_copy_nothing():
    xm = _model()
    first = _logits(xm)
    torch.testing.assert_close(first, _dense_reference(xm), atol=2e-5, rtol=0)
    for layer in xm.nf4_layers.values():
        if not layer.lora_A:
            continue
        storages = {layer.lora_A[n].untyped_storage().data_ptr() for n in NAMES}
        assert len(storages) == 1, "every A of a layer lies in one bank"
        names, bank_a, bank_b, _ = layer._adapter_bank(tuple(NAMES), layer.weight_packed.device)
        assert names == tuple(NAMES) and bank_a.shape == (3, 8, layer.in_features)
        assert bank_b.shape == (3, layer.out_features, 8) and layer.lora_B["c"].shape == (layer.out_features, 2)
        assert bank_a.untyped_storage().data_ptr() == storages.pop()
    # a second call reuses the same bank objects
    banks = {m: layer._bank[1] for m, layer in xm.nf4_layers.items() if layer.lora_A}
    assert torch.equal(_logits(xm), first)
    assert all(layer._bank[1] is banks[m] for m, layer in xm.nf4_layers.items() if layer.lora_A)


def test_in_place_updates_reach_the_bank():
    """An optimizer step or a copy_ into a parameter is what the next inference call uses."""
    xm = _model()
    _logits(xm)
    params = xm.train_only("b")
    xm.train()
    opt = torch.optim.SGD(params, lr=0.5)
    loss = xm(input_ids=_ids(), adapter_names="b", labels=_ids()).loss
    loss.backward()
    opt.step()
    xm.eval()
    with torch.no_grad():
        next(iter(xm.nf4_layers.values())).lora_A["a"].mul_(3.0)
    torch.testing.assert_close(_logits(xm), _dense_reference(xm), atol=2e-5, rtol=0)


def test_adding_deleting_rescaling_and_moving_rebuild_the_bank():
    xm = _model()
    _logits(xm)
    xm.delete_adapter("b")
    xm.add_adapter("d", r=16, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False, seed=3)
    names = ("a", "d", "__base__", "c")
    torch.testing.assert_close(_logits(xm, names), _dense_reference(xm, names), atol=2e-5, rtol=0)
    layer = next(lay for lay in xm.nf4_layers.values() if "d" in lay.lora_A)
    layer.scales["d"] *= -2.0
    torch.testing.assert_close(_logits(xm, names), _dense_reference(xm, names), atol=2e-5, rtol=0)
    xm.to(torch.float64)  # every parameter replaced: the bank follows
    for lay in xm.nf4_layers.values():
        assert all(p.dtype == torch.float64 for p in lay.lora_A.values())
    xm.to(torch.float32)
    with torch.no_grad():  # a stale bank (the storage before the moves) would miss this
        layer.lora_B["d"].add_(0.25)
    torch.testing.assert_close(_logits(xm, names), _dense_reference(xm, names), atol=2e-5, rtol=0)


def test_adapters_of_different_dtypes_are_stacked_per_call():
    xm = _model()
    layer = next(lay for lay in xm.nf4_layers.values() if lay.lora_A)
    for n in ("a",):
        layer.lora_A[n].data = layer.lora_A[n].data.to(torch.bfloat16)
        layer.lora_B[n].data = layer.lora_B[n].data.to(torch.bfloat16)
    assert layer._persistent_bank() is None
    names, a, b, _ = layer._adapter_bank(("a", "c"), layer.weight_packed.device)
    assert names == ("a", "c") and a.dtype == torch.float32 and a.shape[0] == 2
    torch.testing.assert_close(_logits(xm), _dense_reference(xm), atol=2e-5, rtol=0)


def test_precision_of_a_bf16_model_native_and_exact():
    """native (the default): bf16 products, within bf16 rounding of the float32 model; exact: closer still;
    an unknown precision is refused naming the choices."""
    f32 = _model()
    ref = _logits(f32)
    bf = _model(torch.bfloat16)
    assert bf.precision == "native"
    native = _logits(bf).float()
    bf.set_precision("exact")
    exact = _logits(bf).float()
    scale = ref.abs().max()
    assert (native - ref).abs().max() < 0.05 * scale and (exact - ref).abs().max() < 0.05 * scale
    assert not torch.equal(native, exact)
    with pytest.raises(ValueError, match=r"precision must be one of \('native', 'exact'\)"):
        bf.set_precision("fast")


def test_resolve_dtype_auto_follows_the_cpu_and_refuses_unknown_names(monkeypatch):
    from xkern.nn import resolve_dtype
    from xkern.ops.backends import cpu_native

    monkeypatch.setattr(cpu_native, "bf16_instructions", lambda: ("avx512_bf16",))
    assert resolve_dtype("auto", "cpu")[0] == torch.bfloat16
    monkeypatch.setattr(cpu_native, "bf16_instructions", lambda: ())
    dtype, why = resolve_dtype("auto", "cpu")
    assert dtype == torch.float32 and "no bf16 instructions" in why
    assert resolve_dtype("float16")[0] == torch.float16
    with pytest.raises(ValueError, match="dtype must be 'auto'"):
        resolve_dtype("int8")
