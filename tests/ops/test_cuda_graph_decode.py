"""A whole mixed-adapter decode step of XkernModel captured in one CUDA graph and replayed (GPU only)."""

import pytest
import torch

import xkern
from tests.helpers import tiny_model
from xkern.nn import BASE


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", None])  # None: the dispatch's choice (cuda decode kernel if built)
def test_mixed_adapter_decode_step_replays_from_a_cuda_graph(backend, monkeypatch):
    if backend:
        monkeypatch.setenv("XKERN_BACKEND", backend)
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.bfloat16, device="cuda", progress=False)
    for i in range(3):
        xm.add_adapter(f"a{i}", r=4 + 4 * i, seed=i, init_lora_weights=False)  # ranks differ per adapter
    names = ["a0", "a2", BASE, "a1", "a2", "a0"]
    vocab = xm.model.config.vocab_size
    static_ids = torch.randint(0, vocab, (len(names), 1), device="cuda")
    graph, static_logits = xm.capture_cuda_graph(static_ids, names, use_cache=False)
    with torch.no_grad():
        for seed in (1, 2):
            static_ids.copy_(torch.randint(0, vocab, static_ids.shape, device="cuda",
                                           generator=torch.Generator(device="cuda").manual_seed(seed)))
            graph.replay()
            torch.cuda.synchronize()
            eager = xm(static_ids, adapter_names=names, use_cache=False).logits
            torch.testing.assert_close(static_logits.float(), eager.float(), rtol=1e-3, atol=1e-3)
            assert torch.isfinite(static_logits).all()


def test_what_a_graph_reads_outlives_the_caches_that_held_it():
    """CPU-side rule of ownership: the resources a capture keeps stay alive after the model drops its banks (an
    adapter deleted and the bank rebuilt), so a replay never reads memory handed to something else."""
    import gc
    import weakref

    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    for i in range(2):
        xm.add_adapter(f"a{i}", r=4, seed=i, init_lora_weights=False)
    ids = torch.randint(0, xm.model.config.vocab_size, (2, 3))
    with torch.no_grad():
        xm(ids, adapter_names=["a0", "a1"], use_cache=False)
    kept = xm.graph_resources()
    banks = [b for b, _ in kept[0] if b is not None]
    assert banks, "a forward left no adapter bank to keep"
    old = [weakref.ref(b[1]) for b in banks]  # the stacked A banks the forward read
    xm.delete_adapter("a1")
    xm.add_adapter("a2", r=8, seed=5, init_lora_weights=False)
    with torch.no_grad():
        xm(ids, adapter_names=["a0", "a2"], use_cache=False)  # the layers stack new banks
    gc.collect()
    assert all(r() is not None for r in old)  # still held by what the capture kept
    del kept, banks
    gc.collect()
    assert all(r() is None for r in old)  # and by nothing else: the rule is what kept them


@pytest.mark.gpu
def test_a_replay_after_the_caches_churn_computes_the_captured_forward():
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.bfloat16, device="cuda", progress=False)
    for i in range(3):
        xm.add_adapter(f"a{i}", r=4 + 4 * i, seed=i, init_lora_weights=False)
    names = ["a0", "a2", BASE, "a1"]
    static_ids = torch.randint(0, xm.model.config.vocab_size, (len(names), 1), device="cuda")
    graph, static_logits = xm.capture_cuda_graph(static_ids, names, use_cache=False)
    with torch.no_grad():
        expected = xm(static_ids, adapter_names=names, use_cache=False).logits.clone()
        for n in range(1, 300):  # more row routings than the device cache keeps
            xm(torch.ones(n, 1, dtype=torch.long, device="cuda"), adapter_names=["a0"] * n, use_cache=False)
        xm.delete_adapter("a1")  # the banks the graph read are dropped by the layers and rebuilt
        xm.add_adapter("a1", r=4, seed=9, init_lora_weights=False)
        xm(static_ids, adapter_names=names, use_cache=False)
        torch.cuda.empty_cache()
        junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(64)]  # reuse freed memory
        graph.replay()
        torch.cuda.synchronize()
        del junk
    torch.testing.assert_close(static_logits.float(), expected.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_out_of_range_ids_on_the_gpu_raise_and_leave_the_context_usable():
    from xkern.errors import InputError
    from xkern.ops import RowRouting

    with pytest.raises(InputError, match=r"adapter_ids must lie in \[-1, 2\]"):
        RowRouting.build(torch.tensor([0, 3, -1], device="cuda"), 3)
    ok = RowRouting.build(torch.tensor([0, 2, -1], device="cuda"), 3)
    assert ok.starts.tolist() == [0, 1, 2, 2, 3]  # the CUDA context still works
