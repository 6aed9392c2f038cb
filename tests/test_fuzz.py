"""Property-based tests (hypothesis): whatever the input, xkern either computes what its reference
computes or raises one of its own errors naming the thing that is wrong, and leaves a model as it was.

Families: ``lora_linear`` on random shapes, ranks, ids, dtypes, NaN/Inf and empty batches (native CPU
backend against the torch reference, and bad ids / scales refused); PEFT adapter directories with
flipped bytes, truncated files, wrong JSON types and missing keys; bitsandbytes NF4 state dicts with
a damaged quant-state JSON. ``derandomize`` keeps CI reproducible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import xkern
from tests.helpers import random_lora_bank, tiny_model
from xkern import NF4Tensor, quantize_nf4
from xkern.errors import FormatError, InputError, InputTypeError, NotFoundError, XkernError
from xkern.ops import lora_linear
from xkern.ops.backends import cpu_native

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BACKENDS = ["torch"] + (["cpu"] if cpu_native.extension() is not None else [])


# ------------------------------------------------------------------------------------------------ ops

@st.composite
def lora_problems(draw):
    m = draw(st.sampled_from([0, 1, 2, 3, 7, 16, 17, 40]))
    n = draw(st.integers(1, 48))
    k = draw(st.integers(1, 160))
    ranks = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    a, b = random_lora_bank(ranks, n, k, g)
    weight = quantize_nf4((torch.randn(n, k, generator=g) / k**0.5).to(dtype),
                          double_quant=draw(st.booleans()))
    x = torch.randn(m, k, generator=g).to(dtype)
    bad_rows = draw(st.lists(st.tuples(st.integers(0, max(m - 1, 0)), st.integers(0, k - 1),
                                       st.sampled_from([float("nan"), float("inf"), float("-inf")])),
                             max_size=3)) if m else []
    for row, col, value in bad_rows:
        x[row, col] = value
    ids = torch.tensor(draw(st.lists(st.integers(-1, len(ranks) - 1), min_size=m, max_size=m)), dtype=torch.long)
    scale = torch.rand(len(ranks), generator=g) + 0.5
    return x, weight, a.to(dtype), b.to(dtype), scale, ids


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(problem=lora_problems())
def test_lora_linear_matches_the_reference_on_any_valid_input(backend, problem):
    x, weight, a, b, scale, ids = problem
    got = lora_linear(x, weight, a, b, scale, ids, backend=backend)
    ref = lora_linear(x, weight, a, b, scale, ids, backend="torch")
    assert got.shape == ref.shape == (x.shape[0], weight.shape[0]) and got.dtype == x.dtype
    finite_in = torch.isfinite(x).all(dim=1)
    # a NaN or Inf in a row reaches that row's outputs only; the other rows are untouched and agree
    assert torch.isfinite(got[finite_in]).all()
    assert not torch.isfinite(got[~finite_in]).any()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}[x.dtype]
    torch.testing.assert_close(got[finite_in].float(), ref[finite_in].float(), rtol=tol,
                               atol=tol * max(1.0, ref[finite_in].float().abs().max().item() if finite_in.any() else 1))


@FUZZ
@given(problem=lora_problems(), bad=st.sampled_from(["id-high", "id-low", "scale-str", "scale-len", "ids-len",
                                                    "x-k", "x-int"]))
def test_lora_linear_refuses_bad_arguments_with_its_own_error(problem, bad):
    x, weight, a, b, scale, ids = problem
    n_adapters = a.shape[0]
    if bad in ("id-high", "id-low") and x.shape[0] == 0:
        return  # no row to carry a bad id
    if bad == "id-high":
        ids = ids.clone()
        ids[0] = n_adapters
    elif bad == "id-low":
        ids = ids.clone()
        ids[0] = -2
    elif bad == "scale-str":
        scale = "2"
    elif bad == "scale-len":
        scale = torch.ones(n_adapters + 1)
    elif bad == "ids-len":
        ids = torch.cat([ids, ids.new_zeros(1)])
    elif bad == "x-k":
        x = torch.zeros(x.shape[0], weight.shape[1] + 1, dtype=x.dtype)
    elif bad == "x-int":
        x = torch.zeros(x.shape, dtype=torch.int32)
    with pytest.raises((InputError, InputTypeError)) as err:
        lora_linear(x, weight, a, b, scale, ids)
    named = {"id-high": "adapter_ids", "id-low": "adapter_ids", "scale-str": "scale", "scale-len": "scale",
             "ids-len": "adapter_ids", "x-k": "x", "x-int": "x"}[bad]
    assert named in str(err.value)


# -------------------------------------------------------------------------------------- adapter files

@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A tiny NF4 Llama and one of its adapters written in PEFT format."""
    xm = xkern.load_model(tiny_model("llama", seed=0), dtype=torch.float32, progress=False)
    xm.add_adapter("src", r=4, lora_alpha=8, init_lora_weights=False, seed=3)
    path = tmp_path_factory.mktemp("adapter") / "src"
    xm.save_adapter("src", path)
    xm.delete_adapter("src")
    return xm, path


def _state(xm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in xm.state_dict().items()}


def _assert_unchanged(xm, before_names, before_state):
    assert xm.list_adapters() == before_names
    after = _state(xm)
    assert after.keys() == before_state.keys()
    for k in before_state:
        assert torch.equal(after[k], before_state[k]), k


def _try_load(xm, path: Path) -> None:
    """Load as a new adapter: it either loads (and runs) or raises xkern's error naming the file or field;
    on error the model is exactly as before."""
    names, state = xm.list_adapters(), _state(xm)
    try:
        xm.load_adapter(path, "fuzzed")
    except XkernError as e:
        assert str(path) in str(e), str(e)
        _assert_unchanged(xm, names, state)
        return
    try:
        out = xm(input_ids=torch.randint(0, 100, (2, 5)), adapter_names=["fuzzed", xkern.adapters.BASE])
        assert out.logits.shape[:2] == (2, 5)
    finally:
        xm.delete_adapter("fuzzed")


def _damage(src: Path, tmp_path_factory, data, damage) -> Path:
    """A copy of the adapter directory with one of its two files rewritten by ``damage(bytes) -> bytes``."""
    path = tmp_path_factory.mktemp("fuzzed") / "a"
    shutil.copytree(src, path)
    name = data.draw(st.sampled_from(["adapter_model.safetensors", "adapter_config.json"]))
    (path / name).write_bytes(damage((path / name).read_bytes()))
    return path


def _flip(data):
    def damage(raw: bytes) -> bytes:
        blob = bytearray(raw)
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4)):
            blob[pos] ^= data.draw(st.integers(1, 255))
        return bytes(blob)
    return damage


@FUZZ
@given(data=st.data())
def test_adapter_with_flipped_bytes(saved_adapter, tmp_path_factory, data):
    xm, src = saved_adapter
    _try_load(xm, _damage(src, tmp_path_factory, data, _flip(data)))


@FUZZ
@given(data=st.data())
def test_adapter_with_truncated_files(saved_adapter, tmp_path_factory, data):
    xm, src = saved_adapter
    _try_load(xm, _damage(src, tmp_path_factory, data, lambda raw: raw[: data.draw(st.integers(0, len(raw) - 1))]))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True),
                        st.text(max_size=6), st.lists(st.integers(0, 3), max_size=3),
                        st.dictionaries(st.text(max_size=4), st.integers(0, 8), max_size=2))


@FUZZ
@given(data=st.data())
def test_adapter_config_with_wrong_types_or_missing_keys(saved_adapter, tmp_path_factory, data):
    xm, src = saved_adapter
    path = tmp_path_factory.mktemp("cfg") / "a"
    shutil.copytree(src, path)
    config = json.loads((path / "adapter_config.json").read_text())
    for key in data.draw(st.lists(st.sampled_from(sorted(config)), min_size=1, max_size=3, unique=True)):
        if data.draw(st.booleans()):
            del config[key]
        else:
            config[key] = data.draw(JSON_VALUES)
    (path / "adapter_config.json").write_text(json.dumps(config))
    _try_load(xm, path)


def test_adapter_directory_that_is_missing_or_empty(saved_adapter, tmp_path):
    xm, _ = saved_adapter
    with pytest.raises(NotFoundError, match="not found"):
        xm.load_adapter(tmp_path / "nope", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        xm.load_adapter(tmp_path / "empty", "x")
    assert "x" not in xm.list_adapters()


# ------------------------------------------------------------------------------- bitsandbytes state

@FUZZ
@given(data=st.data())
def test_bnb_state_dict_with_damaged_quant_state(data):
    t = quantize_nf4(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)),
                     double_quant=data.draw(st.booleans()))
    sd = t.to_bnb_state_dict("w")
    key = "w.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()).decode())
    how = data.draw(st.sampled_from(["field", "drop", "bytes", "truncate", "not-object"]))
    if how == "field":
        field, value = data.draw(st.sampled_from(sorted(meta))), data.draw(JSON_VALUES)
        number = (int, float)
        # another number in a numeric field is a different, well-formed weight: no file format can tell
        assume(not (isinstance(meta[field], number) and isinstance(value, number) and not isinstance(value, bool)))
        meta[field] = value
        raw = json.dumps(meta).encode()
    elif how == "drop":
        del meta[data.draw(st.sampled_from(sorted(meta)))]
        raw = json.dumps(meta).encode()
    elif how == "not-object":
        raw = json.dumps(list(meta)).encode()
    else:
        raw = json.dumps(meta).encode()
        raw = _flip(data)(raw) if how == "bytes" else raw[: data.draw(st.integers(0, len(raw) - 1))]
    sd = {**sd, key: torch.tensor(list(bytes(raw)), dtype=torch.uint8)}
    try:
        got = NF4Tensor.from_bnb_state_dict(sd, "w")
    except FormatError as e:
        assert "'w" in str(e) or "w." in str(e), str(e)
        return
    # accepted: then it must decode to the same weight (the damage hit a field that does not matter)
    torch.testing.assert_close(got.dequantize(torch.float32).reshape(-1), t.dequantize(torch.float32).reshape(-1))
