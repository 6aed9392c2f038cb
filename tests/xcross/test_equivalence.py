"""XCrossModel against a naive reference: n separate PEFT models (bitsandbytes NF4 base, the same saved
adapters), run block by block with forward hooks that substitute the integrated hidden states; the
integrator is written out literally (loops over stream pairs, float64) and the head by hand.

Tolerance: both sides dequantize the same NF4 bytes to the same float32 weights; the differences are
float32 summation order (MKL vs the reference matmuls) through 2 blocks, the integrator and the head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xkern
from tests.helpers import exact_bnb
from xkern.xcross import XCrossModel

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

ATOL = 1e-4


class _Stop(Exception):
    pass


def _auto(family: str):
    return transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForMaskedLM


def _inner_and_blocks(pm):
    """The PEFT model's transformer trunk and its block list, named explicitly per family."""
    top = pm.get_base_model()
    if hasattr(top, "bert"):
        return top.bert, list(top.bert.encoder.layer)
    return top.model, list(top.model.layers)


def _run(pm, ids, mask, replaced: list[torch.Tensor], stop_at: int | None):
    """Run one PEFT model with block k's output replaced by replaced[k]; return block stop_at's raw
    output (raising out of the forward), or the trunk's last hidden state when stop_at is None."""
    inner, blocks = _inner_and_blocks(pm)
    handles, seen = [], {}

    def make(k):
        def hook(module, args, output):
            if k == stop_at:
                seen["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()
                raise _Stop
            if k < len(replaced):
                new = replaced[k]
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return output
        return hook

    for k, b in enumerate(blocks):
        handles.append(b.register_forward_hook(make(k)))
    try:
        with torch.no_grad():
            out = inner(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state
    except _Stop:
        return seen["h"]
    finally:
        for hd in handles:
            hd.remove()


def literal_integrator(h: torch.Tensor, w_concat: torch.Tensor, bias, beta: float, gamma: float) -> torch.Tensor:
    """The DESIGN section 4 formula, loop over (m, m'): h [n, B, T, d] float64."""
    n = h.shape[0]
    z = torch.einsum("pk,btk->btp", w_concat.double(), torch.cat(list(h), dim=-1))
    if bias is not None:
        z = z + bias.double()
    half = n * (n - 1)
    out = h.clone()
    idx = 0
    for m in range(n):
        for mp in range(n):
            if mp == m:
                continue
            zd, zi = z[..., idx:idx + 1], z[..., half + idx:half + idx + 1]
            out[m] = out[m] + beta * zd * h[mp] + gamma * zi * (h[m] - h[mp])
            idx += 1
    return out


def _head(xc: XCrossModel, x: torch.Tensor) -> torch.Tensor:
    d, o = xc.head.dense, xc.head.out
    return (F.gelu(x.double() @ d.weight.double().T + d.bias.double()) @ o.weight.double().T).squeeze(-1) \
        + o.bias.double()


def _pool(h: torch.Tensor, mask: torch.Tensor, family: str) -> torch.Tensor:
    if family == "bert":
        return h[:, 0]
    last = torch.tensor([int(torch.nonzero(row).max()) for row in mask])
    return h[torch.arange(h.shape[0]), last]


def reference_scores(pms, xc: XCrossModel, ids, mask, family: str) -> torch.Tensor:
    n, n_layers = len(pms), len(_inner_and_blocks(pms[0])[1])
    mixed: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for layer in range(n_layers):
        raw = torch.stack([_run(pm, ids, mask, mixed[m], layer) for m, pm in enumerate(pms)]).double()
        bias = xc.integrator_bias[layer].detach() if xc.has_bias else None
        new = literal_integrator(raw, xc.w_concat[layer].detach(), bias, xc.beta, xc.gamma)
        for m in range(n):
            mixed[m].append(new[m].float())
    finals = [_run(pm, ids, mask, mixed[m], None).double() for m, pm in enumerate(pms)]
    pooled = torch.stack([_pool(f, mask, family) for f in finals])
    return _head(xc, (xc.w.detach().double()[:, None, None] * pooled).sum(0))


def single_scores(pm, xc: XCrossModel, ids, mask, family: str) -> torch.Tensor:
    h = _run(pm, ids, mask, [], None).double()
    return _head(xc, _pool(h, mask, family))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[3, 4:] = 0
    return ids, mask


@pytest.fixture(scope="module", params=["llama", "bert"])
def family_setup(request, bnb_dirs, peft_adapters):
    family = request.param
    paths = peft_adapters[family]
    xm = xkern.load_model(bnb_dirs[family], dtype=torch.float32, progress=False)
    pms = []
    for name, path in paths.items():
        xm.load_adapter(path, name)
        base = exact_bnb(_auto(family).from_pretrained(bnb_dirs[family]))
        pms.append(peft.PeftModel.from_pretrained(base, path).eval())
    return family, xm, pms


def _randomize(xc: XCrossModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in xc.w_concat:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for p in xc.integrator_bias:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        xc.w.copy_(torch.rand(xc.w.shape, generator=g) + 0.2)


@pytest.mark.parametrize("n,bias,beta,gamma", [(2, False, 1.0, 1.0), (3, True, 0.7, 1.3)])
def test_matches_naive_peft_reference(family_setup, n, bias, beta, gamma):
    family, xm, pms = family_setup
    xc = XCrossModel(xm, [f"s{i}" for i in range(n)], beta=beta, gamma=gamma, bias=bias).eval()
    assert xc.pooling_mode == ("last" if family == "llama" else "first")
    _randomize(xc, seed=n)
    ids, mask = _inputs(n)
    with torch.no_grad():
        got = xc(ids, mask).double()
    want = reference_scores(pms[:n], xc, ids, mask, family)
    # the integrators must matter, or this test would not test them
    plain = XCrossModel(xm, [f"s{i}" for i in range(n)], bias=bias).eval()
    plain.head.load_state_dict(xc.head.state_dict())
    with torch.no_grad():
        plain.w.copy_(xc.w)
        assert (plain(ids, mask).double() - want).abs().max() > 50 * ATOL
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("n", [2, 3])
def test_zero_integrators_one_hot_w_is_the_single_source_model(family_setup, n):
    family, xm, pms = family_setup
    xc = XCrossModel(xm, [f"s{i}" for i in range(n)]).eval()
    assert all(torch.count_nonzero(p) == 0 for p in xc.w_concat)
    torch.testing.assert_close(xc.w.detach(), torch.full((n,), 1.0 / n))
    ids, mask = _inputs(10 + n)
    for m in range(n):
        with torch.no_grad():
            xc.w.copy_(F.one_hot(torch.tensor(m), n).float())
            got = xc(ids, mask).double()
        want = single_scores(pms[m], xc, ids, mask, family)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
        # and the 1-stream scorer over that adapter gives the same
        one = XCrossModel(xm, [f"s{m}"]).eval()
        one.head.load_state_dict(xc.head.state_dict())
        with torch.no_grad():
            one.w.fill_(1.0)
            torch.testing.assert_close(one(ids, mask).double(), want, atol=ATOL, rtol=1e-4)


def test_one_core_op_launch_per_linear_layer_stream_major(family_setup, monkeypatch):
    family, xm, _ = family_setup
    import xkern.nn.linear as lin

    calls = []
    real = lin.lora_linear

    def counting(x, weight, a, b, s, routing, **kw):
        calls.append((x.shape, None if routing is None else routing.ids.clone(), a.shape[0], routing))
        return real(x, weight, a, b, s, routing, **kw)

    monkeypatch.setattr(lin, "lora_linear", counting)
    xc = XCrossModel(xm, ["s0", "s1", "s2"]).eval()
    ids, mask = _inputs(5)
    with torch.no_grad():
        xc(ids, mask)
    trunk = {id(m) for m in xc.base.modules()}  # BERT's MLM head has an NF4 layer outside the trunk
    layers = [lay for lay in xm.nf4_layers.values() if id(lay) in trunk]
    assert len(calls) == len(layers)  # one launch per NF4 linear layer of the trunk, all 3 streams inside
    with_adapters = sum(1 for lay in layers if lay.adapter_names)
    assert sum(1 for c in calls if c[1] is not None) == with_adapters > 0  # gate_proj (llama) has none: base only
    # the rows are grouped once per forward: every layer with the same adapters gets the same RowRouting object
    routings = {id(c[3]) for c in calls if c[3] is not None}
    assert len(routings) == len({tuple(lay.adapter_names) for lay in layers if lay.adapter_names})
    for shape, row_ids, n_bank, _ in calls:
        assert shape[0] == 3 * ids.shape[0]
        if row_ids is None:
            continue
        per_stream = row_ids.view(3, -1)
        assert n_bank == 3
        assert all(bool((per_stream[m] == per_stream[m, 0]).all()) for m in range(3))
        assert len({int(per_stream[m, 0]) for m in range(3)}) == 3
