"""xkern's runtime against PEFT + bitsandbytes on the same NF4 bytes and the same PEFT adapters.

Tolerance: both sides dequantize the same NF4 bytes to the same float32 weights, so the only
difference is float32 summation order (MKL vs the reference path's matmuls): |diff| <= 2e-5 on
logits of magnitude ~1. bitsandbytes' CPU inference fast path repacks weights to bf16, so the
PEFT side runs with it off (``exact_bnb``).
"""

from __future__ import annotations

import pytest
import torch

import xkern
from tests.helpers import exact_bnb, tiny_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

ATOL = 2e-5

TARGETS = {
    "llama": (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "o_proj"),
    "bert": (["query", "value"], ["query", "key", "value", "dense"], "value"),
}


def _peft_adapters(family: str, root) -> dict[str, str]:
    """Two PEFT adapters with non-zero B: plain, and rsLoRA with rank_pattern / alpha_pattern."""
    small, wide, patterned = TARGETS[family]
    cfgs = {
        "a0": peft.LoraConfig(r=4, lora_alpha=8, target_modules=small, init_lora_weights=False),
        "a1": peft.LoraConfig(r=8, lora_alpha=16, target_modules=wide, init_lora_weights=False, use_rslora=True,
                              rank_pattern={patterned: 2}, alpha_pattern={patterned: 3}),
    }
    paths = {}
    for i, (name, cfg) in enumerate(cfgs.items()):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(tiny_model(family, seed=1), cfg)
        pm.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def _auto(family: str):
    return transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForMaskedLM


@pytest.fixture(scope="module", params=["llama", "bert"])
def setup(request, bnb_dirs, tmp_path_factory):
    family = request.param
    adapters = _peft_adapters(family, tmp_path_factory.mktemp(f"adapters-{family}"))
    base = exact_bnb(_auto(family).from_pretrained(bnb_dirs[family]))
    pm = peft.PeftModel.from_pretrained(base, adapters["a0"], adapter_name="a0")
    pm.load_adapter(adapters["a1"], adapter_name="a1")
    pm.eval()
    xm = xkern.load_model(bnb_dirs[family], dtype=torch.float32, progress=False)
    xm.load_adapter(adapters["a0"], "a0")
    xm.load_adapter(adapters["a1"], "a1")
    return family, pm, xm, adapters


def _inputs(batch: int = 5, seq: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded sample
    return ids, mask


def test_bnb_checkpoint_loads_same_bytes(setup, bnb_dirs):
    family, pm, xm, _ = setup
    from safetensors.torch import load_file

    saved = load_file(str(bnb_dirs[family] / "model.safetensors"))
    for name, layer in xm.nf4_layers.items():
        assert torch.equal(layer.weight_packed, saved[f"{name}.weight"].reshape(-1)), name
        assert torch.equal(layer.weight_absmax, saved[f"{name}.weight.absmax"]), name


def test_mixed_batch_matches_peft_adapter_names(setup):
    family, pm, xm, _ = setup
    ids, mask = _inputs()
    names = ["a1", "__base__", "a0", "a1", "a0"]
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        out = xm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # the adapters do change the output, so the comparison above is not vacuous
    with torch.no_grad():
        base = xm(input_ids=ids, attention_mask=mask).logits
    assert (base[0] - out[0]).abs().max() > 100 * ATOL
    assert (base[2] - out[2]).abs().max() > 100 * ATOL
    torch.testing.assert_close(base[1], out[1], atol=0, rtol=0)


def test_sample_order_does_not_matter(setup):
    _, _, xm, _ = setup
    ids, mask = _inputs(seed=1)
    names = ["a0", "a1", "__base__", "a1", "a0"]
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        out = xm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        out_p = xm(input_ids=ids[perm], attention_mask=mask[perm], adapter_names=[names[i] for i in perm]).logits
    torch.testing.assert_close(out_p, out[perm], atol=ATOL, rtol=0)


def test_one_core_op_launch_per_layer(setup, monkeypatch):
    _, _, xm, _ = setup
    import xkern.nn.linear as linear_mod

    calls = []
    real = linear_mod.lora_linear

    def counting(x, weight, a, b, s, ids=None, **kw):
        calls.append(a.shape[0])
        return real(x, weight, a, b, s, ids, **kw)

    monkeypatch.setattr(linear_mod, "lora_linear", counting)
    ids, mask = _inputs()
    with torch.no_grad():
        xm(input_ids=ids, attention_mask=mask, adapter_names=["a1", "a0", "__base__", "a0", "a1"])
    assert len(calls) == len(xm.nf4_layers)
    assert max(calls) == 2  # layers targeted by both adapters got both in one bank


def test_trained_adapter_loads_in_peft_with_same_logits(setup, tmp_path, bnb_dirs):
    family, _, xm, _ = setup
    targets = TARGETS[family][1]
    xm.add_adapter("trained", r=4, lora_alpha=8, target_modules=targets, seed=0)
    try:
        params = xm.train_only("trained")
        opt = torch.optim.AdamW(params, lr=1e-2)
        ids, mask = _inputs(seed=2)
        for _ in range(3):
            out = xm(input_ids=ids, attention_mask=mask, adapter_names="trained").logits
            loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(p.grad is not None for p in params)
        assert any(float(b.detach().abs().max()) > 0 for b in params[1::2])  # B moved away from its zero init
        xm.save_adapter("trained", tmp_path / "trained")
        with torch.no_grad():
            ours = xm(input_ids=ids, attention_mask=mask, adapter_names="trained").logits
    finally:
        xm.delete_adapter("trained")
    base = exact_bnb(_auto(family).from_pretrained(bnb_dirs[family]))
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "trained").eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_save_pretrained_loads_in_transformers_bitsandbytes(setup, tmp_path):
    family, _, xm, _ = setup
    xm.save_pretrained(tmp_path / "nf4")
    loaded = exact_bnb(_auto(family).from_pretrained(tmp_path / "nf4")).eval()
    assert type(loaded.get_submodule(next(iter(xm.nf4_layers)))).__name__ == "Linear4bit"
    ids, mask = _inputs(seed=3)
    with torch.no_grad():
        ours = xm(input_ids=ids, attention_mask=mask).logits
        theirs = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_a_bnb_checkpoint_computes_in_the_dtype_asked_for(bnb_dirs):
    """The checkpoint records float32 for what stays dense (embeddings, norms, head): load_model(dtype=bf16)
    casts them, so the whole model computes in bf16, not only the NF4 layers; the NF4 bytes stay as saved."""
    from safetensors.torch import load_file

    xm = xkern.load_model(bnb_dirs["llama"], dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in xm.model.parameters()} == {torch.bfloat16}
    saved = load_file(str(bnb_dirs["llama"] / "model.safetensors"))
    for name, layer in xm.nf4_layers.items():
        assert torch.equal(layer.weight_packed, saved[f"{name}.weight"].reshape(-1)), name
