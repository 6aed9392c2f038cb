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
