"""The objectives' label-only LM head: the same losses and gradients as the full logits, at a fraction of the head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xkern
from tests.helpers import tiny_model
from xkern.data.encoding import IGNORE
from xkern.errors import InputError
from xkern.train.objectives import CandidateScoring, CausalLM, sequence_logprob


def _model(family: str) -> xkern.XkernModel:
    xm = xkern.load_model(tiny_model(family), dtype=torch.float32, progress=False)
    xm.add_adapter("a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                   seed=1)
    xm.train_only("a")
    return xm


def _batch(obj, pad: int = 0):
    g = torch.Generator().manual_seed(0)
    if isinstance(obj, CausalLM):
        examples = []
        for n in (7, 4, 9):
            ids = torch.randint(3, 128, (n,), generator=g).tolist()
            examples.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})  # prompt masked
        return obj.collate(examples, pad)
    examples = [{"prompt_ids": torch.randint(3, 128, (5,), generator=g).tolist(),
                 "candidates": [torch.randint(3, 128, (k,), generator=g).tolist() for k in (2, 4, 3)],
                 "target": t} for t in (0, 2)]
    return obj.collate(examples, pad)


def _full_logit_loss(obj, xm, batch):
    logits = xm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names="a").logits
    if isinstance(obj, CausalLM):
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)
    scores = sequence_logprob(logits, batch["input_ids"], batch["labels"]).view(-1, int(batch["n_candidates"]))
    return F.cross_entropy(scores, batch["target"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("objective", [CausalLM, CandidateScoring])
def test_label_only_head_gives_the_full_logits_loss_and_gradients(family, objective):
    xm, obj = _model(family), objective()
    assert xm.supports_logits_at
    batch = _batch(obj)
    params = xm.adapter_parameters("a")
    got = obj.loss(xm, batch, "a")
    got_grads = torch.autograd.grad(got, params)
    ref = _full_logit_loss(obj, xm, batch)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_logits_at_selects_rows_and_refuses_what_it_cannot_do():
    xm = _model("llama")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    at = torch.zeros(2, 6, dtype=torch.bool)
    at[0, 1], at[1, 4], at[1, 5] = True, True, True
    with torch.no_grad():
        full = xm(input_ids=ids, adapter_names="a").logits
        sel = xm(input_ids=ids, adapter_names="a", logits_at=at).logits
    torch.testing.assert_close(sel, full[at], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="bool mask of shape"):
        xm(input_ids=ids, adapter_names="a", logits_at=at[:, :3])
    with pytest.raises(InputError, match="labels cannot be combined"):
        xm(input_ids=ids, adapter_names="a", logits_at=at, labels=ids)
    bert = xkern.load_model(tiny_model("bert"), dtype=torch.float32, progress=False)
    assert not bert.supports_logits_at
    with pytest.raises(InputError, match="plain decoder"):
        bert(input_ids=ids, logits_at=at)
