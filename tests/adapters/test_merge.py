"""xkern.adapters.merge against PEFT: ``add_weighted_adapter`` (cat / svd / linear) and ``merge_utils``.

A tiny fp32 Llama (hidden 32, 2 layers, GQA so k/v differ in shape) carries PEFT LoRA adapters with
random A and B (``init_lora_weights=False``), different ranks and alphas, one with rsLoRA and one with
a ``rank_pattern``. They are saved by PEFT, read with ``xkern.adapters.load_adapter`` and merged by
xkern; the per-module deltas ``scale * B @ A`` are compared with PEFT's.

Tolerances: the deltas are O(1). ``cat`` / ``linear`` (same products, different association) and the
SVD paths (xkern factorizes in float64 through QR, PEFT runs a float32 SVD of the dense delta) agree
within ``atol = rtol = 1e-5``; the dense results of the pruning methods are bit-identical to
``peft.utils.merge_utils``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from xkern.adapters import AdapterError, LoraAdapter, LoraWeights, fold, load_adapter, merge, save_adapter
from xkern.adapters.merge import merge_deltas
from xkern.adapters.peft_format import check_config, default_config
from xkern.nf4 import quantize_nf4

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

TOL = {"atol": 1e-5, "rtol": 1e-5}
TARGETS = ["q_proj", "v_proj", "down_proj"]
WEIGHTS = [0.5, -0.7, 1.2]
NAMES = ["t0", "t1", "t2"]  # merged in this order


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return cfg, LlamaForCausalLM(cfg).float().eval()


def _peft_deltas(peft_model, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name: mod.get_delta_weight(adapter_name).detach().float()
            for name, mod in peft_model.base_model.model.named_modules()
            if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A}


def _deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    return {name: w.delta() for name, w in adapter.modules.items()}


def _assert_deltas_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], **tol) -> None:
    assert sorted(got) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], msg=lambda m, n=name: f"{n}: {m}", **(tol or TOL))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg, base = _tiny_llama()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                            adapter_name="t0")
        pm.add_adapter("t1", LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False,
                                        use_rslora=True))
        pm.add_adapter("t2", LoraConfig(r=3, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False,
                                        rank_pattern={"down_proj": 5}, alpha_pattern={"down_proj": 10}))
        pm.add_adapter("t3", LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
        root = tmp_path_factory.mktemp("peft_adapters")
        pm.save_pretrained(str(root))  # non-default adapter names go to root/<name>
    adapters = {name: load_adapter(root / name) for name in ["t0", "t1", "t2", "t3"]}
    return {"cfg": cfg, "base_state": base_state, "pm": pm, "adapters": adapters}


def _xk(setup, names=NAMES) -> list[LoraAdapter]:
    return [setup["adapters"][n] for n in names]


def _fresh_base(setup):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(setup["cfg"]).float().eval()
    model.load_state_dict(setup["base_state"])
    return model


# ---- (a) cat and svd equal PEFT's add_weighted_adapter ------------------------------------------


def test_loaded_adapters_match_peft(setup):
    for name in ["t0", "t1", "t2", "t3"]:
        _assert_deltas_close(_deltas(setup["adapters"][name]), _peft_deltas(setup["pm"], name), atol=1e-6, rtol=1e-6)
    assert setup["adapters"]["t2"].modules["model.layers.0.mlp.down_proj"].rank == 5


def test_cat_matches_peft(setup):
    pm = setup["pm"]
    pm.add_weighted_adapter(NAMES, WEIGHTS, "m_cat", combination_type="cat")
    merged = merge(_xk(setup), WEIGHTS, "cat")
    _assert_deltas_close(_deltas(merged), _peft_deltas(pm, "m_cat"))
    # exact: rank sum r_i per module (down_proj: 4 + 2 + 5), scale 1
    assert merged.modules["model.layers.0.self_attn.q_proj"].rank == 9
    assert merged.modules["model.layers.1.mlp.down_proj"].rank == 11
    assert all(w.scale == 1.0 for w in merged.modules.values())
    check_config(merged.config)
    assert merged.config["target_modules"] == sorted(TARGETS)
    # `linear` without rank is the same exact adapter
    lin = merge(_xk(setup), WEIGHTS, "linear")
    for name, w in merged.modules.items():
        assert torch.equal(lin.modules[name].A, w.A) and torch.equal(lin.modules[name].B, w.B)


@pytest.mark.parametrize("svd_rank", [None, 3])
def test_svd_matches_peft(setup, svd_rank):
    pm = setup["pm"]
    new = f"m_svd_{svd_rank}"
    pm.add_weighted_adapter(NAMES, WEIGHTS, new, combination_type="svd", svd_rank=svd_rank)
    merged = merge(_xk(setup), WEIGHTS, "svd", rank=svd_rank)
    _assert_deltas_close(_deltas(merged), _peft_deltas(pm, new))
    expect_rank = svd_rank or 5  # default: max r_i over the inputs, as PEFT
    assert {w.rank for w in merged.modules.values()} == {expect_rank}
    assert merged.config["r"] == merged.config["lora_alpha"] == expect_rank
    assert merged.config["rank_pattern"] == {}


def test_rank_truncation_is_best_approximation_and_clipped(setup):
    adapters = _xk(setup)
    exact = _deltas(merge(adapters, WEIGHTS, "linear"))
    for method in ["linear", "cat"]:
        trunc = merge(adapters, WEIGHTS, method, rank=2)
        for name, d in exact.items():
            u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
            best = (u[:, :2] * s[:2]) @ vh[:2]
            torch.testing.assert_close(trunc.modules[name].delta().double(), best, **TOL)
            assert trunc.modules[name].rank == 2
    # beyond sum r_i the sum is represented exactly; the rank never exceeds min(N, K, sum r_i)
    big = merge(adapters, WEIGHTS, "cat", rank=1000)
    _assert_deltas_close(_deltas(big), exact)
    assert big.modules["model.layers.0.self_attn.q_proj"].rank == 9
    dense_big = merge(adapters, WEIGHTS, "ties", density=0.5, rank=1000)
    n_k = {name: min(d.shape) for name, d in exact.items()}
    assert {name: w.rank for name, w in dense_big.modules.items()} == n_k


# ---- (b) ties / dare / magnitude_prune equal peft.utils.merge_utils ----------------------------


PRUNING = [("ties", "total"), ("ties", "frequency"), ("dare_ties", "total"), ("dare_ties", "frequency"),
           ("dare_linear", None), ("magnitude_prune", None)]


def _peft_reference(adapters, weights, method, density, sign, seed):
    """PEFT's merge function over the stacked deltas, module by module in sorted order, after manual_seed."""
    fn = getattr(merge_utils, method)
    w = torch.tensor(weights)
    torch.manual_seed(seed)
    out = {}
    for name in sorted(adapters[0].modules):
        deltas = [a.modules[name].delta() for a in adapters]
        out[name] = fn(deltas, w, density, sign) if sign is not None else fn(deltas, w, density)
    return out


@pytest.mark.parametrize(("method", "sign"), PRUNING)
def test_pruning_methods_match_merge_utils(setup, method, sign):
    adapters = _xk(setup)
    kwargs = {"majority_sign_method": sign} if sign else {}
    for density, seed in [(0.4, 0), (0.7, 123)]:
        ref = _peft_reference(adapters, WEIGHTS, method, density, sign, seed)
        rng_before = torch.random.get_rng_state()
        got = merge_deltas(adapters, WEIGHTS, method, density=density, seed=seed, **kwargs)
        assert torch.equal(torch.random.get_rng_state(), rng_before)  # a private generator: global RNG untouched
        for name in ref:
            assert torch.equal(got[name], ref[name]), name
        # the adapter: full rank reproduces the dense delta, default rank is max r_i (5) like PEFT's *_svd
        full = merge(adapters, WEIGHTS, method, density=density, seed=seed, rank=64, **kwargs)
        _assert_deltas_close(_deltas(full), ref)
        default = merge(adapters, WEIGHTS, method, density=density, seed=seed, **kwargs)
        assert {w.rank for w in default.modules.values()} == {5}
        check_config(default.config)
    if method.startswith("dare"):
        a = merge_deltas(adapters, WEIGHTS, method, density=0.5, seed=1, **kwargs)
        b = merge_deltas(adapters, WEIGHTS, method, density=0.5, seed=2, **kwargs)
        assert not all(torch.equal(a[n], b[n]) for n in a)


def test_density_one_prunes_nothing(setup):
    adapters = _xk(setup)
    exact = _deltas(merge(adapters, WEIGHTS, "linear"))
    for method in ["dare_linear", "magnitude_prune"]:
        _assert_deltas_close(merge_deltas(adapters, WEIGHTS, method, density=1.0), exact)


def test_peft_svd_variants_of_pruning(setup):
    """PEFT's ``ties_svd`` is xkern's ``ties`` (prune the deltas, then SVD to max r_i)."""
    pm = setup["pm"]
    pm.add_weighted_adapter(NAMES, WEIGHTS, "m_ties_svd", combination_type="ties_svd", density=0.5,
                            majority_sign_method="frequency")
    merged = merge(_xk(setup), WEIGHTS, "ties", density=0.5, majority_sign_method="frequency")
    ref = _peft_deltas(pm, "m_ties_svd")
    _assert_deltas_close(_deltas(merged), ref, atol=1e-4, rtol=1e-4)  # rank-5 truncation of a full-rank delta


# ---- (c) PEFT's linear is not task arithmetic ----------------------------------------------------


def test_peft_linear_is_not_task_arithmetic(setup):
    pm = setup["pm"]
    names, weights = ["t0", "t3"], [0.6, 0.4]  # PEFT's linear needs equal ranks
    pm.add_weighted_adapter(names, weights, "m_lin", combination_type="linear")
    peft_lin = _peft_deltas(pm, "m_lin")
    adapters = _xk(setup, names)
    task_sum = {name: sum(w * a.modules[name].delta() for w, a in zip(weights, adapters, strict=True))
                for name in adapters[0].modules}
    for name in task_sum:
        rel = (peft_lin[name] - task_sum[name]).norm() / task_sum[name].norm()
        assert rel > 0.1, f"{name}: PEFT linear unexpectedly close to the weighted sum ({rel:.3g})"
    merged = merge(adapters, weights, "linear")
    _assert_deltas_close(_deltas(merged), task_sum, atol=1e-6, rtol=1e-6)
    assert {w.rank for w in merged.modules.values()} == {8}
    # weights=None: the uniform average for the summing methods, weight 1 for the TIES methods
    avg = merge(adapters, None, "linear")
    _assert_deltas_close(_deltas(avg), {n: (adapters[0].modules[n].delta() + adapters[1].modules[n].delta()) / 2
                                        for n in task_sum}, atol=1e-6, rtol=1e-6)
    ties_default = merge_deltas(adapters, None, "ties", density=0.5)
    ties_ones = merge_deltas(adapters, [1.0, 1.0], "ties", density=0.5)
    assert all(torch.equal(ties_default[n], ties_ones[n]) for n in task_sum)


# ---- (d) a saved merge loads in PEFT and reproduces the deltas -----------------------------------


@pytest.mark.parametrize(("method", "kwargs"), [("cat", {}), ("ties", {"density": 0.5}), ("svd", {"rank": 3})])
def test_saved_merge_loads_in_peft(setup, tmp_path, method, kwargs):
    from peft import PeftModel

    merged = merge(_xk(setup), WEIGHTS, method, **kwargs)
    path = save_adapter(merged, tmp_path / method)
    # xkern round trip (the config's rank_pattern must agree with the saved ranks)
    again = load_adapter(path)
    for name, w in merged.modules.items():
        assert torch.equal(again.modules[name].A, w.A) and torch.equal(again.modules[name].B, w.B)
        assert again.modules[name].scale == 1.0
    if method == "cat":
        assert merged.config["rank_pattern"]  # down_proj has rank 11, the rest 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(_fresh_base(setup), str(path)).eval()
    want = _deltas(merged)
    _assert_deltas_close(_peft_deltas(loaded, "default"), want, atol=1e-6, rtol=1e-6)
    # model outputs: PEFT with the adapter == the dense base with every delta added to its weight
    dense = _fresh_base(setup)
    with torch.no_grad():
        for name, d in want.items():
            dense.get_submodule(name).weight += d
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(loaded(input_ids=ids).logits, dense(input_ids=ids).logits, **TOL)


# ---- (e) fold into NF4 ---------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "blocksize", "double_quant"),
                         [(torch.float32, 64, True), (torch.bfloat16, 128, False)])
def test_fold_requantizes_exactly(setup, dtype, blocksize, double_quant):
    merged = merge(_xk(setup), WEIGHTS, "cat")
    state = setup["base_state"]
    base = {name: quantize_nf4(state[f"{name}.weight"].to(dtype), blocksize=blocksize, double_quant=double_quant)
            for name in merged.modules}
    base["model.layers.0.self_attn.k_proj"] = quantize_nf4(state["model.layers.0.self_attn.k_proj.weight"])
    for weight in [1.0, 0.5]:
        out = fold(base, merged, weight=weight)
        assert out["model.layers.0.self_attn.k_proj"] is base["model.layers.0.self_attn.k_proj"]
        for name, w in merged.modules.items():
            q = base[name]
            expect = quantize_nf4(q.dequantize(torch.float32) + weight * w.delta(), blocksize=blocksize,
                                  double_quant=double_quant).dequantize(dtype)
            got = out[name]
            assert got.dtype == dtype and got.blocksize == blocksize and got.double_quant == double_quant
            assert torch.equal(got.dequantize(), expect), name
            # folding changes the weight by about the delta (up to NF4's re-quantization error)
            moved = (got.dequantize(torch.float32) - q.dequantize(torch.float32) - weight * w.delta()).abs()
            assert moved.mean() < (weight * w.delta()).abs().mean()
    # keys with a ".weight" suffix are found too
    suffixed = {f"{n}.weight": t for n, t in base.items()}
    out = fold(suffixed, merged)
    assert set(out) == set(suffixed)


def test_fold_errors(setup):
    merged = merge(_xk(setup), WEIGHTS, "cat")
    state = setup["base_state"]
    base = {name: quantize_nf4(state[f"{name}.weight"]) for name in merged.modules}
    missing = dict(base)
    del missing["model.layers.1.self_attn.v_proj"]
    with pytest.raises(AdapterError, match=r"model\.layers\.1\.self_attn\.v_proj"):
        fold(missing, merged)
    wrong = dict(base)
    wrong["model.layers.0.mlp.down_proj"] = quantize_nf4(torch.randn(64, 32))  # transposed shape
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.mlp\.down_proj.*shape"):
        fold(wrong, merged)
    dense = dict(base)
    dense["model.layers.0.self_attn.q_proj"] = torch.randn(32, 32)
    with pytest.raises(AdapterError, match="not an NF4Tensor"):
        fold(dense, merged)
    with pytest.raises(AdapterError, match="finite"):
        fold(base, merged, weight=float("nan"))


def test_fold_fan_in_fan_out():
    torch.manual_seed(1)
    a = LoraAdapter(default_config(2, 4, ["c_attn"], fan_in_fan_out=True),
                    {"h.0.c_attn": LoraWeights(torch.randn(2, 16), torch.randn(48, 2), 2.0)})
    base = {"h.0.c_attn": quantize_nf4(torch.randn(16, 48))}  # Conv1D weight is [in, out]
    out = fold(base, a)
    expect = quantize_nf4(base["h.0.c_attn"].dequantize() + a.modules["h.0.c_attn"].delta().T).dequantize()
    assert torch.equal(out["h.0.c_attn"].dequantize(), expect)


# ---- input checks --------------------------------------------------------------------------------


def _synthetic(shapes: dict[str, tuple[int, int]], r: int = 2, alpha: float = 4, seed: int = 0, **cfg) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {name: LoraWeights(torch.randn(r, k, generator=g), torch.randn(n, r, generator=g), alpha / r)
               for name, (n, k) in shapes.items()}
    return LoraAdapter(default_config(r, alpha, sorted({m.rsplit(".", 1)[-1] for m in shapes}), **cfg), modules)


SHAPES = {"layers.0.q_proj": (8, 6), "layers.0.v_proj": (4, 6)}


def test_merge_refuses_mismatched_inputs():
    a = _synthetic(SHAPES)
    b = _synthetic(SHAPES, r=3, seed=1)
    with pytest.raises(AdapterError, match="empty"):
        merge([], None, "linear")
    with pytest.raises(AdapterError, match="unknown merge method"):
        merge([a, b], None, "average")
    with pytest.raises(AdapterError, match="layers.0.v_proj"):
        merge([a, _synthetic({"layers.0.q_proj": (8, 6)})], None, "cat")
    with pytest.raises(AdapterError, match="layers.0.k_proj"):
        merge([a, _synthetic({**SHAPES, "layers.0.k_proj": (4, 6)})], None, "cat")
    with pytest.raises(AdapterError, match=r"layers\.0\.v_proj.*different shapes"):
        merge([a, _synthetic({"layers.0.q_proj": (8, 6), "layers.0.v_proj": (4, 7)})], None, "svd")
    with pytest.raises(AdapterError, match="3 weights for 2 adapters"):
        merge([a, b], [1.0, 1.0, 1.0], "linear")
    with pytest.raises(AdapterError, match="finite"):
        merge([a, b], [1.0, float("inf")], "linear")
    for method in ["ties", "dare_linear", "dare_ties", "magnitude_prune"]:
        with pytest.raises(AdapterError, match="density"):
            merge([a, b], None, method)
        for density in [0.0, -0.1, 1.5]:
            with pytest.raises(AdapterError, match="density"):
                merge([a, b], None, method, density=density)
    with pytest.raises(AdapterError, match="majority_sign_method"):
        merge([a, b], None, "ties", density=0.5, majority_sign_method="mean")
    for rank in [0, -1, 2.5]:
        with pytest.raises(AdapterError, match="rank"):
            merge([a, b], None, "svd", rank=rank)
    with pytest.raises(AdapterError, match="fan_in_fan_out"):
        merge([a, _synthetic(SHAPES, fan_in_fan_out=True)], None, "cat")


def test_synthetic_merge_config_and_copy_fields(tmp_path: Path):
    a = _synthetic(SHAPES, task_type="CAUSAL_LM", base_model_name_or_path="tiny")
    b = _synthetic(SHAPES, r=3, seed=1)
    merged = merge([a, b], [1.0, 2.0], "cat")
    assert merged.config["task_type"] == "CAUSAL_LM" and merged.config["base_model_name_or_path"] == "tiny"
    assert merged.config["r"] == merged.config["lora_alpha"] == 5 and merged.config["rank_pattern"] == {}
    want = {n: a.modules[n].delta() + 2.0 * b.modules[n].delta() for n in SHAPES}
    _assert_deltas_close(_deltas(load_adapter(save_adapter(merged, tmp_path / "m"))), want, atol=1e-6, rtol=1e-6)
    # svd with a rank above min(N, K) is clipped per module
    svd = merge([a, b], None, "svd", rank=6)
    assert {n: w.rank for n, w in svd.modules.items()} == {"layers.0.q_proj": 5, "layers.0.v_proj": 4}
    assert svd.config["r"] in (4, 5) and len(svd.config["rank_pattern"]) == 1
    _assert_deltas_close(_deltas(load_adapter(save_adapter(svd, tmp_path / "s"))), _deltas(svd))
