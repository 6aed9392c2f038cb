"""The backend registry: one file per backend, one choice per call, clear errors, forced and declined backends."""

import pkgutil

import pytest
import torch

from xkern import quantize_nf4
from xkern.errors import XkernError
from xkern.ops import backends, lora_linear, registry
from xkern.ops.routing import RowRouting


def test_every_module_of_the_backends_folder_registers_one_backend():
    modules = {m.name for m in pkgutil.iter_modules(backends.__path__)}
    registered = {b.name: b for b in registry.backends().values()}
    assert set(registered) == {"torch", "cpu", "triton", "cuda"}
    assert len(modules) == len(registered)
    for name in registered:
        assert registry.ops_of(name), f"backend {name!r} registers no kernel"


def test_a_backend_added_at_run_time_is_chosen_when_requested(monkeypatch):
    """What a new backend file does (register + kernels) is all the registry needs."""
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(registry, "_KERNELS", dict(registry._KERNELS))
    calls = []
    registry.register_backend("probe", device_types=("cpu",), priority=-1)

    @registry.register_kernel("lora_linear.forward", "probe", supports=lambda x, *rest: x.shape[0] <= 4)
    def fwd(x, weight, A, B, s, routing, precision):
        calls.append(x.shape[0])
        return registry.kernel("lora_linear.forward", "torch")(x, weight, A, B, s, routing, precision)

    w = quantize_nf4(torch.randn(16, 64))
    A, B = torch.randn(2, 4, 64), torch.randn(2, 16, 4)
    ids = torch.tensor([0, 1, -1])
    expected = lora_linear(torch.ones(3, 64), w, A, B, 1.0, ids, backend="torch")
    got = lora_linear(torch.ones(3, 64), w, A, B, 1.0, ids, backend="probe")
    assert calls == [3] and torch.equal(got, expected)
    # declined by its supports(): the next backend of the device runs it
    lora_linear(torch.ones(5, 64), w, A, B, 1.0, torch.zeros(5, dtype=torch.long), backend="probe")
    assert calls == [3]
    # the backward of a backend without an input-grad kernel goes to the next one
    x = torch.ones(3, 64, requires_grad=True)
    lora_linear(x, w, A, B, 1.0, ids, backend="probe").sum().backward()
    assert x.grad is not None and calls == [3, 3]


def test_clear_errors_for_unknown_and_unusable_backends(monkeypatch):
    w = quantize_nf4(torch.randn(16, 64))
    A, B = torch.randn(1, 4, 64), torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        lora_linear(torch.ones(2, 64), w, A, B, 1.0, backend="fast")
    with pytest.raises(RuntimeError, match="needs CUDA tensors") as unusable:
        lora_linear(torch.ones(2, 64), w, A, B, 1.0, backend="cuda")
    assert isinstance(unusable.value, XkernError)  # the command line says it in one line, no traceback
    monkeypatch.setenv("XKERN_BACKEND", "nope")
    with pytest.raises(ValueError, match="XKERN_BACKEND must be one of"):
        lora_linear(torch.ones(2, 64), w, A, B, 1.0)


def test_report_says_why_a_backend_is_off():
    rows = {r["backend"]: r for r in registry.report("cpu")}
    assert rows["torch"]["usable"] and rows["torch"]["why_not"] is None
    assert not rows["cuda"]["usable"] and "cuda" in rows["cuda"]["why_not"]
    if not rows["cpu"]["usable"]:
        assert "xkern._cpu is not built" in rows["cpu"]["why_not"]


def test_row_routing_groups_rows_by_adapter():
    ids = torch.tensor([2, -1, 0, 2, 1, -1, 0])
    r = RowRouting.build(ids, 3)
    assert r.starts.tolist() == [0, 2, 4, 5, 7]
    rows_of = lambda rows: list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()  # noqa: E731
    assert [(a, rows_of(rows)) for a, rows in r.segments()] == [(0, [2, 6]), (1, [4]), (2, [0, 3])]
    stacked = RowRouting.build(torch.tensor([1, 1, 0, 0, 0, -1]), 2).segments()  # consecutive rows: slices
    assert stacked == [(0, slice(2, 5)), (1, slice(0, 2))]
    assert r.ids[r.order.long()].tolist() == sorted(ids.tolist())
    base = RowRouting.base_only(4, 2)
    assert base.starts.tolist() == [0, 4, 4, 4] and base.segments() == []
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 2\]"):
        RowRouting.build(torch.tensor([3]), 3)
