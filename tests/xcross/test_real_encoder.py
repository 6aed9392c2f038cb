"""The X-Cross encoder path on real data (Amazon Tools, NF4 all-MiniLM-L6-v2): why it does not learn, kept.

The trainer can fit: LoRA + head drive the loss of a fixed batch of real examples to ~0 within a few
steps (if this fails, the gradients do not reach the adapter or the head, and nothing else can learn).
And the [CLS] features of one user's candidates are nearly the same vector, while the mean over the
candidate part (``pooling="candidate"``) tells them apart (docs/xcross.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REAL_DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tools():
    root = REAL_DATA
    if not (root / "Tools" / "train.json").is_file():
        pytest.skip("the real Amazon domains are not in this workplace (set XKERN_DATA)")
    from xkern.data.domain import load_processed

    return load_processed(root, "Tools", max_words=6)


@pytest.fixture(scope="module")
def minilm():
    import xkern
    from xkern.nn.pretrained import load_tokenizer, minilm_dir

    return xkern.load_model(str(minilm_dir()), dtype=torch.float32, progress=False), load_tokenizer(minilm_dir())


def test_lora_and_head_fit_a_fixed_batch_of_real_examples(tools, minilm):
    from xkern.xcross import XCrossModel, candidate_examples
    from xkern.xcross.train import example_loss

    xm, tok = minilm
    torch.manual_seed(0)
    xm.add_adapter("fit", r=8, lora_alpha=16, seed=0)
    try:
        xc = XCrossModel(xm, ["fit"], pooling="candidate", tokenizer=tok, titles=tools.titles,
                         domain=tools.name, max_history=3, max_tokens=80)
        batch = candidate_examples(tools, "train", n_neg=4, seed=0)[:8]
        lora = xm.train_only("fit")
        opt = torch.optim.AdamW([*xc.trainable_parameters(), *lora], lr=1e-3, weight_decay=0.0)
        losses = []
        for _ in range(12):
            loss, _ = example_loss(xc, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert abs(losses[0] - 1.609) < 0.1  # 5 candidates, untrained: chance
        assert losses[-1] < 0.1, losses
        assert all(float(p.grad.abs().sum()) > 0 for p in lora)  # the adapter trains, not only the head
    finally:
        xm.delete_adapter("fit")


def test_candidate_pooling_separates_the_candidates_of_a_user(tools, minilm):
    from xkern.adapters import BASE
    from xkern.xcross import XCrossModel, candidate_examples
    from xkern.xcross.model import pool_hidden

    xm, tok = minilm
    xc = XCrossModel(xm, [BASE], pooling="candidate", tokenizer=tok, titles=tools.titles, domain=tools.name,
                     max_history=3, max_tokens=80)
    users = candidate_examples(tools, "val", n_neg=9, seed=1)[:12]
    ids, mask, span = xc.encode([(h, int(c)) for h, cands, _ in users for c in cands])
    with torch.no_grad():
        hidden = xc.stream_hidden(ids, mask)[0].float()

    def mean_cosine_between_candidates(x: torch.Tensor) -> float:
        x = F.normalize(x.view(len(users), 10, -1), dim=-1)
        cos = x @ x.transpose(1, 2)
        return float(((cos.sum((1, 2)) - 10) / 90).mean())

    first = mean_cosine_between_candidates(pool_hidden(hidden, mask, "first"))
    cand = mean_cosine_between_candidates(pool_hidden(hidden, span, "mean"))
    assert first > 0.9  # [CLS] carries the history: one user's candidates look alike
    assert cand < first - 0.1
