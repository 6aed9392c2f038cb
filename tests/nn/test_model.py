"""The runtime on every supported family, adapter management, generate, and refusal of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import xkern
from tests.helpers import tiny_model
from xkern.adapters import AdapterError
from xkern.errors import InputError
from xkern.nn import NF4LoRALinear

peft = pytest.importorskip("peft")

FAMILIES = ["llama", "qwen2", "mistral", "bert", "deberta-v2"]
ATOL = 2e-5


def _dense_twin(xm: xkern.XkernModel, family: str) -> torch.nn.Module:
    """The same architecture with plain nn.Linear layers holding xkern's dequantized NF4 weights."""
    twin = tiny_model(family)
    state = twin.state_dict()
    for name, layer in xm.nf4_layers.items():
        state[f"{name}.weight"] = layer.nf4_weight.dequantize(torch.float32)
    for key, value in xm.model.state_dict().items():
        if key in state and not any(key.startswith(n + ".") for n in xm.nf4_layers):
            state[key] = value
    twin.load_state_dict(state)
    return twin.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_mixed_batch_matches_peft_on_dequantized_twin(family, tmp_path):
    xm = xkern.load_model(tiny_model(family), dtype=torch.float32, progress=False)
    n_linear_in_blocks = sum(1 for n, m in tiny_model(family).named_modules()
                             if isinstance(m, torch.nn.Linear) and (".layers." in n or ".layer." in n))
    assert len(xm.nf4_layers) == n_linear_in_blocks
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in xm.nf4_layers})
    if family == "deberta-v2":  # query/key projections also see the batch-shared relative embeddings
        suffixes = [s for s in suffixes if s not in ("query_proj", "key_proj", "pos_query_proj", "pos_key_proj")]
    xm.add_adapter("x", r=4, lora_alpha=8, target_modules=suffixes[:2], init_lora_weights=False, seed=1)
    xm.add_adapter("y", r=6, lora_alpha=3, target_modules=suffixes, init_lora_weights=False, seed=2,
                   use_rslora=True)
    xm.save_adapter("x", tmp_path / "x")
    xm.save_adapter("y", tmp_path / "y")
    pm = peft.PeftModel.from_pretrained(_dense_twin(xm, family), tmp_path / "x", adapter_name="x")
    pm.load_adapter(tmp_path / "y", adapter_name="y")
    pm.eval()
    ids = torch.randint(3, 128, (4, 7), generator=torch.Generator().manual_seed(0))
    names = ["y", "x", "__base__", "y"]
    with torch.no_grad():
        ours = xm(input_ids=ids, adapter_names=names).logits
        theirs = pm(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_deberta_shared_relative_embeddings_take_one_adapter_per_batch(tmp_path):
    xm = xkern.load_model(tiny_model("deberta-v2"), dtype=torch.float32, progress=False)
    xm.add_adapter("qk", r=4, target_modules=["query_proj", "pos_key_proj", "pos_query_proj"], init_lora_weights=False,
                   seed=0)
    xm.save_adapter("qk", tmp_path / "qk")
    pm = peft.PeftModel.from_pretrained(_dense_twin(xm, "deberta-v2"), tmp_path / "qk").eval()
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(xm(input_ids=ids, adapter_names="qk").logits, pm(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="_proj got one input shared by all 3 samples"):
            xm(input_ids=ids, adapter_names=["qk", "__base__", "qk"])


def test_add_adapter_starts_at_base_and_follows_peft_init():
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("fresh", r=8, rank_pattern={"v_proj": 2}, seed=0)
    layer = xm.nf4_layers["model.layers.0.self_attn.q_proj"]
    a, b = layer.lora_A["fresh"], layer.lora_B["fresh"]
    assert a.shape == (8, 64) and b.shape == (64, 8) and torch.count_nonzero(b) == 0
    assert 0 < float(a.abs().max()) <= 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert xm.nf4_layers["model.layers.1.self_attn.v_proj"].rank("fresh") == 2
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(xm(input_ids=ids, adapter_names="fresh").logits, xm(input_ids=ids).logits,
                                   atol=0, rtol=0)
    assert xm.list_adapters() == ["fresh"]
    xm.delete_adapter("fresh")
    assert xm.list_adapters() == [] and all(not lay.adapter_names for lay in xm.nf4_layers.values())


def test_generate_mixed_adapters_equals_one_prompt_at_a_time():
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("p", r=4, init_lora_weights=False, seed=3)
    xm.add_adapter("q", r=2, lora_alpha=16, init_lora_weights=False, seed=4)
    prompts = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(5))
    names = ["q", "__base__", "p"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = xm.generate(prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **kw)
    assert together.shape == (3, 12)
    for i, name in enumerate(names):
        alone = xm.generate(prompts[i : i + 1], attention_mask=torch.ones_like(prompts[i : i + 1]),
                            adapter_names=[name], **kw)
        assert torch.equal(together[i], alone[0]), name
    # different adapters really do steer the continuation
    outs = {tuple(xm.generate(prompts[:1], adapter_names=[n], **kw)[0].tolist()) for n in ("p", "q", "__base__")}
    assert len(outs) > 1


def test_generate_expands_names_for_num_return_sequences():
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("p", r=4, init_lora_weights=False, seed=3)
    prompts = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(6))
    out = xm.generate(prompts, adapter_names=["p", "__base__"], max_new_tokens=3, num_beams=2,
                      num_return_sequences=2, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 4
    alone = xm.generate(prompts[:1], adapter_names=["p"], max_new_tokens=3, num_beams=2, num_return_sequences=2,
                        do_sample=False, pad_token_id=0)
    assert torch.equal(out[:2], alone)


# ---- refusals ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ad")
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    pm.save_pretrained(root / "ok")
    return root / "ok"


def _fresh():
    return xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)


def _snapshot(xm):
    return {k: v.clone() for k, v in xm.state_dict().items()}


def _unchanged(xm, snap):
    state = xm.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


@pytest.mark.parametrize("field,value", [("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]),
                                         ("layers_to_transform", [0]), ("peft_type", "IA3")])
def test_unsupported_config_field_is_named(llama_adapter_dir, tmp_path, field, value):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg[field] = value
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    xm = _fresh()
    with pytest.raises(AdapterError, match=field):
        xm.load_adapter(bad, "bad")
    assert xm.list_adapters() == []


def test_embedding_adapter_is_refused(tmp_path):
    pm = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    pm.save_pretrained(tmp_path / "emb")
    xm = _fresh()
    snap = _snapshot(xm)
    with pytest.raises(AdapterError, match="lora_embedding"):
        xm.load_adapter(tmp_path / "emb", "emb")
    assert _unchanged(xm, snap)


def test_shape_mismatch_refused_before_any_change(tmp_path):
    import transformers

    from tests.helpers import tiny_config

    cfg = tiny_config("llama")
    cfg.intermediate_size = 96  # mlp shapes differ, attention shapes match
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                             peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    pm.save_pretrained(tmp_path / "other")
    xm = _fresh()
    snap = _snapshot(xm)
    with pytest.raises(AdapterError, match="up_proj"):
        xm.load_adapter(tmp_path / "other", "other")
    assert _unchanged(xm, snap) and xm.list_adapters() == []


def test_adapter_for_unquantized_module_is_refused(llama_adapter_dir):
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, target_modules=["v_proj"], progress=False)
    with pytest.raises(AdapterError, match="q_proj.*target_modules"):
        xm.load_adapter(llama_adapter_dir, "a")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_safetensors_leaves_model_as_it_was(llama_adapter_dir, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(llama_adapter_dir, bad)
    weights = bad / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        weights.unlink()
    xm = _fresh()
    xm.load_adapter(llama_adapter_dir, "good")
    snap = _snapshot(xm)
    with pytest.raises((AdapterError, FileNotFoundError), match="adapter_model.safetensors"):
        xm.load_adapter(bad, "bad")
    assert _unchanged(xm, snap) and xm.list_adapters() == ["good"]


def test_bad_forward_arguments(llama_adapter_dir):
    xm = _fresh()
    xm.load_adapter(llama_adapter_dir, "a")
    ids = torch.randint(3, 128, (2, 4))
    with pytest.raises(KeyError, match="nope"):
        xm(input_ids=ids, adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        xm(input_ids=ids, adapter_names=["a", "a", "a"])
    with pytest.raises(ValueError, match="already loaded"):
        xm.load_adapter(llama_adapter_dir, "a")
    with pytest.raises(ValueError, match="invalid adapter name"):
        xm.load_adapter(llama_adapter_dir, "a.b")
    for clash in ("train", "to"):
        with pytest.raises(ValueError, match="attribute of torch.nn.Module"):
            xm.add_adapter(clash, r=2)
    assert xm.list_adapters() == ["a"] and all(lay.adapter_names in (["a"], []) for lay in xm.nf4_layers.values())
    with pytest.raises(FileNotFoundError):
        xm.load_adapter(llama_adapter_dir.parent / "missing", "m")
    with pytest.raises(ValueError, match="only 'nf4'"):
        xkern.load_model(tiny_model("llama"), quantize="fp4")
    with pytest.raises(FileNotFoundError):
        xkern.load_model(llama_adapter_dir.parent / "no-such-model")


def test_layer_stays_nf4_and_bf16_forward_runs():
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.bfloat16, progress=False)
    xm.add_adapter("a", r=4, init_lora_weights=False, seed=0)
    assert all(isinstance(m, NF4LoRALinear) for m in xm.nf4_layers.values())
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        out = xm(input_ids=ids, adapter_names=["a", "__base__"]).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    xf = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xf.add_lora("a", xm.get_adapter("a"))
    with torch.no_grad():
        ref = xf(input_ids=ids, adapter_names=["a", "__base__"]).logits
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_empty_batch_and_a_broken_adapter_stay_contained():
    """A NaN in one adapter reaches only the samples that use it; an empty batch gives 0 rows, not an error."""
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("good", r=4, init_lora_weights=False, seed=1)
    xm.add_adapter("bad", r=2, init_lora_weights=False, seed=2)
    layer = xm.nf4_layers["model.layers.0.mlp.down_proj"]  # straight into the residual stream
    with torch.no_grad():
        layer.lora_A["bad"][0, 0] = float("nan")
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    logits = xm(input_ids=ids, adapter_names=["good", "bad", "__base__"]).logits
    assert torch.isnan(logits[1]).any()
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
    empty = xm(input_ids=ids[:0], attention_mask=torch.ones_like(ids[:0]), adapter_names=[])
    assert empty.logits.shape == (0, 6, logits.shape[-1])


def test_cuda_graph_capture_refuses_cpu_inputs():
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    with pytest.raises(InputError, match="CUDA device"):
        xm.capture_cuda_graph(torch.zeros(2, 1, dtype=torch.long))


def test_set_adapter_weights_copies_in_place_and_refuses_another_shape_or_scale():
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("trained", r=4, lora_alpha=8, init_lora_weights=False, seed=1)
    xm.add_adapter("fresh", r=4, lora_alpha=8, seed=2)
    params = xm.adapter_parameters("fresh")
    xm.set_adapter_weights("fresh", xm.get_adapter("trained"))
    assert [id(p) for p in xm.adapter_parameters("fresh")] == [id(p) for p in params]  # an optimizer keeps them
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(xm(input_ids=ids, adapter_names="fresh").logits,
                                   xm(input_ids=ids, adapter_names="trained").logits, atol=0, rtol=0)
    xm.add_adapter("r8", r=8, lora_alpha=16, seed=3)
    xm.add_adapter("alpha", r=4, lora_alpha=4, seed=4)
    xm.add_adapter("attention", r=4, lora_alpha=8, target_modules=["q_proj"], seed=5)
    for name, match in (("r8", "another rank"), ("alpha", "lora_alpha / r"), ("attention", "other modules")):
        before = {k: v.clone() for k, v in xm.state_dict().items() if f".{name}" in k}
        with pytest.raises(AdapterError, match=match):
            xm.set_adapter_weights(name, xm.get_adapter("trained"), "run-1")
        assert all(torch.equal(xm.state_dict()[k], v) for k, v in before.items())  # nothing copied
    with pytest.raises(KeyError, match="nope"):
        xm.set_adapter_weights("nope", xm.get_adapter("trained"))
