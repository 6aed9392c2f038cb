"""How much next-item signal plain MiniLM sentence embeddings carry on Amazon Tools (a bi-encoder probe).

Ranks each test user's 30 candidates (the X-Cross real run's: target + 29 uniform negatives, seed 0)
by the cosine similarity between the mean-pooled MiniLM embedding of the user's history titles and
that of each candidate title. No training, dense fp32 MiniLM (transformers): a reference point for
what the X-Cross cross-encoders could learn, not an X-Cross result.

    python examples/minilm_similarity_probe.py --users 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str((ROOT / ".." / "shared" / "data" / "amazon-xcross").resolve()))
    p.add_argument("--domain", default="Tools")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--history", type=int, default=5, help="most recent history titles joined into one text")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from transformers import AutoModel, AutoTokenizer

    from xkern.data.domain import load_processed
    from xkern.data.evaluate import evaluate_scorer
    from xkern.data.negatives import build_candidates
    from xkern.nn.pretrained import minilm_dir

    data = load_processed(args.data, args.domain, seed=args.seed)
    cands = build_candidates(data, "test", 29, "uniform", args.seed, args.users)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModel.from_pretrained(str(minilm_dir())).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 64):
            batch = tok(texts[i:i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            mask = batch["attention_mask"][..., None].float()
            pooled = (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def title(i: int) -> str:
        return data.titles[i] or ""

    def score(histories, candidates) -> torch.Tensor:
        q = embed([" ; ".join(title(i) for i in h[-args.history:]) for h in histories])
        c = embed([title(int(i)) for i in candidates.reshape(-1)]).view(*candidates.shape, -1)
        return (c * q[:, None, :]).sum(-1)

    metrics = evaluate_scorer(score, cands, (1, 10), batch_size=50)
    print(json.dumps({"probe": "MiniLM mean-pooled cosine(history, candidate)", "domain": args.domain, **metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
