"""Training X-Cross (and single-adapter scorers): cross-entropy over the positive and K sampled negatives.

``train(xc, data)`` trains the integrators, ``w`` and the head of an :class:`XCrossModel` on any
:class:`~xkern.rec.DomainData` (its ``train`` sequences; ``val`` for early stopping, never ``test``).
Each training example is one position of a user's sequence: the history before it, the true next
item and ``n_neg`` uniform negatives outside the user's items, freshly drawn every epoch from a
seeded generator. Validation uses fixed negatives; the best state by validation loss is restored
at the end. ``train_adapter_scorer`` trains one LoRA adapter together with a scoring head the same
way (a 1-stream ``XCrossModel`` plus the adapter's A/B): the per-domain scorers X-Cross mixes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xkern.nn.model import XkernModel
from xkern.rec.data import DomainData
from xkern.rec.evaluate import evaluate_scorer
from xkern.rec.lm import next_item_pairs
from xkern.rec.metrics import evaluate_ranking
from xkern.rec.negatives import build_candidates, sample_uniform, user_rng
from xkern.train.objectives import pad_batch
from xkern.xcross.model import XCrossModel


@dataclass
class XCrossTrainConfig:
    """Hyper-parameters of :func:`train` (all have working defaults)."""

    n_neg: int = 4  # K sampled negatives per training example
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # examples (users) per optimizer step; each is 1 + n_neg pairs x n streams
    lr: float = 1e-3
    extra_lr: float | None = None  # learning rate of extra_params (adapter weights); default lr
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    max_per_user: int | None = 1  # training positions per user sequence (the last ones)
    max_train_users: int | None = None  # cap on training users (seeded choice)
    val_neg: int = 9  # fixed negatives per validation user
    max_val_users: int | None = 200
    eval_every: int | None = None  # optimizer steps between validations; default once per epoch
    patience: int = 2  # validations without improvement before stopping
    seed: int = 0
    score_batch_size: int = 64
    progress: bool = True


@dataclass
class XCrossTrainResult:
    steps: int
    train_loss: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "mrr", "hr@1"}
    best_step: int = 0
    best_val_loss: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    n_train_examples: int = 0
    n_trainable: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Example = tuple[list[int], np.ndarray, int]  # history, candidate items [1 + K], target column


def candidate_examples(data: DomainData, split: str = "train", n_neg: int = 4, seed: int = 0, epoch: int = 0,
                       max_per_user: int | None = 1, users: set[int] | None = None) -> list[Example]:
    """(history, candidates, target column) per example; negatives avoid the user's items in this domain."""
    out: list[Example] = []
    for user, hist, tgt in next_item_pairs(data, split, max_per_user):
        if users is not None and user not in users:
            continue
        rng = user_rng(seed, data.name, f"xcross-{split}", int(user), len(hist), epoch)
        neg = sample_uniform(data.n_items, set(hist) | {tgt} | data.user_items(user), n_neg, rng)
        pos = int(rng.integers(0, n_neg + 1))
        out.append((list(hist), np.insert(neg, pos, tgt).astype(np.int64), pos))
    return out


def _pick_users(train: dict[int, list[int]], cap: int | None, seed: int) -> set[int] | None:
    if cap is None or cap >= len(train):
        return None
    users = sorted(train)
    perm = np.random.default_rng(seed).permutation(len(users))
    return {users[i] for i in perm[:cap]}


def example_loss(xc: XCrossModel, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy of the targets among their candidates, scores [B, 1 + K])."""
    enc = xc.encoder
    assert enc is not None
    rows = [enc.pair_ids(h, int(c)) for h, cands, _ in batch for c in cands]
    ids, mask = pad_batch(rows, enc.pad_id)
    scores = xc(ids, mask).view(len(batch), -1)
    target = torch.tensor([t for _, _, t in batch], device=scores.device)
    return F.cross_entropy(scores, target), scores


@torch.no_grad()
def validate(xc: XCrossModel, examples: Sequence[Example], batch_size: int = 64) -> dict[str, float]:
    """Mean loss, MRR and HR@1 over fixed candidate lists (eval mode, no gradients)."""
    if not examples:
        return {}
    was = xc.training
    xc.eval()
    per = max(1, batch_size // len(examples[0][1]))
    losses, scores = [], []
    try:
        for s in range(0, len(examples), per):
            chunk = examples[s:s + per]
            loss, sc = example_loss(xc, chunk)
            losses.append(float(loss) * len(chunk))
            scores.append(sc.float().cpu())
    finally:
        xc.train(was)
    all_scores = torch.cat(scores).numpy()
    m = evaluate_ranking(all_scores, np.array([t for _, _, t in examples]), ks=(1,))
    return {"loss": sum(losses) / len(examples), "mrr": float(m["MRR"]), "hr@1": float(m["HR@1"])}


def train(xc: XCrossModel, data: DomainData, *, config: XCrossTrainConfig | None = None,
          extra_params: Sequence[nn.Parameter] = (), output_dir: str | os.PathLike | None = None,
          callback: Callable[[int, float], None] | None = None, **overrides: Any) -> XCrossTrainResult:
    """Train the integrators, ``w`` and the head of ``xc`` (plus ``extra_params``) on ``data``.

    ``data.train`` gives the training examples (1 positive + ``n_neg`` negatives each), ``data.val``
    the validation lists (``val_neg`` fixed negatives) used for early stopping: after every
    ``eval_every`` steps the validation loss is measured, the best state is kept, and training
    stops after ``patience`` validations without improvement. The best state is restored at the end.
    ``output_dir``: the trained X-Cross parameters (``xcross/``) and ``train_log.json`` go there.
    Keyword overrides set :class:`XCrossTrainConfig` fields.
    """
    from tqdm.auto import tqdm

    cfg = config or XCrossTrainConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"unknown training option {key!r}")
        setattr(cfg, key, value)
    if not isinstance(xc, XCrossModel):
        raise TypeError(f"xc must be an XCrossModel, got {type(xc).__name__}")
    if xc.tokenizer is None:
        raise ValueError("the XCrossModel needs a tokenizer (XCrossModel(..., tokenizer=...))")
    if cfg.batch_size < 1 or cfg.n_neg < 1:
        raise ValueError("batch_size and n_neg must be >= 1")
    xc.set_domain(data.titles, data.name)
    users = _pick_users(data.train, cfg.max_train_users, cfg.seed)
    first = candidate_examples(data, "train", cfg.n_neg, cfg.seed, 0, cfg.max_per_user, users)
    if not first:
        raise ValueError(f"{data.name}: no training examples (sequences need >= 2 items)")
    val_examples = candidate_examples(data, "val", cfg.val_neg, cfg.seed, -1, None)[: cfg.max_val_users or None]

    for p in xc.model.parameters():
        p.requires_grad_(False)
    own = xc.trainable_parameters()
    extra = list(extra_params)
    params = own + extra
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": own, "lr": cfg.lr}]
    if extra:
        groups.append({"params": extra, "lr": cfg.extra_lr or cfg.lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    steps_per_epoch = max(len(first) // cfg.batch_size, 1)
    total = cfg.max_steps if cfg.max_steps is not None else max(int(math.ceil(cfg.epochs * steps_per_epoch)), 1)
    eval_every = cfg.eval_every or steps_per_epoch
    result = XCrossTrainResult(steps=0, n_train_examples=len(first),
                               n_trainable=sum(p.numel() for p in params))
    start = time.perf_counter()

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    best = snapshot()
    bad = 0
    if val_examples:
        v = validate(xc, val_examples, cfg.score_batch_size)
        result.val.append({"step": 0, **v})
        result.best_val_loss, result.best_step = v["loss"], 0

    xc.train()
    bar = tqdm(total=total, desc=f"x-cross {'+'.join(xc.adapters)}", disable=not cfg.progress)
    step, epoch, examples = 0, 0, first
    try:
        while step < total:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                batch = [examples[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
                factor = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                loss, _ = example_loss(xc, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                step += 1
                result.train_loss.append(float(loss.detach()))
                bar.update(1)
                post = {"loss": f"{result.train_loss[-1]:.4f}"}
                if result.best_val_loss is not None:
                    post["best_val"] = f"{result.best_val_loss:.4f}"
                bar.set_postfix(post)
                if callback is not None:
                    callback(step, result.train_loss[-1])
                if val_examples and (step % eval_every == 0 or step == total):
                    v = validate(xc, val_examples, cfg.score_batch_size)
                    result.val.append({"step": step, **v})
                    if result.best_val_loss is None or v["loss"] < result.best_val_loss:
                        result.best_val_loss, result.best_step, best, bad = v["loss"], step, snapshot(), 0
                    else:
                        bad += 1
                        if bad >= cfg.patience:
                            result.stopped_early = True
                            break
            if result.stopped_early:
                break
            epoch += 1
            examples = candidate_examples(data, "train", cfg.n_neg, cfg.seed, epoch, cfg.max_per_user, users)
    finally:
        bar.close()
        xc.eval()
        for p in params:
            p.requires_grad_(False)
    if val_examples:
        with torch.no_grad():
            for p, b in zip(params, best, strict=True):
                p.copy_(b)
    else:
        result.best_step = step
    result.steps = step
    result.seconds = time.perf_counter() - start
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        xc.save(out / "xcross")
        log = {"adapters": xc.adapters, "config": asdict(cfg), "trainable": xc.num_trainable(),
               "extra_trainable": sum(p.numel() for p in extra), **result.to_dict()}
        (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return result


def train_adapter_scorer(model: XkernModel, adapter: str, data: DomainData, tokenizer: Any, *,
                         pooling: str = "auto", head_dim: int | None = None, max_history: int = 5,
                         max_tokens: int = 128, config: XCrossTrainConfig | None = None,
                         **overrides: Any) -> tuple[XCrossModel, XCrossTrainResult]:
    """Train LoRA ``adapter`` (already added to ``model``) together with a scoring head on ``data``.

    Returns the 1-stream :class:`XCrossModel` (adapter + head) and the training result. The number of
    trainable parameters is the adapter's A/B plus the head.
    """
    xc = XCrossModel(model, [adapter], pooling=pooling, head_dim=head_dim, tokenizer=tokenizer,
                     titles=data.titles, domain=data.name, max_history=max_history, max_tokens=max_tokens)
    res = train(xc, data, config=config, extra_params=model.adapter_parameters(adapter), **overrides)
    return xc, res


def init_head_from(xc: XCrossModel, sources: Sequence[XCrossModel]) -> None:
    """Set ``xc``'s head to the mean of the source scorers' heads (same shapes)."""
    if not sources:
        raise ValueError("no source heads")
    with torch.no_grad():
        for name, p in xc.head.named_parameters():
            p.copy_(torch.stack([dict(s.head.named_parameters())[name].detach() for s in sources]).mean(0))


def evaluate(xc: XCrossModel, data: DomainData, split: str = "test", n_neg: int = 29, seed: int = 0,
             max_users: int | None = None, ks: Sequence[int] = (1, 3, 10), batch_size: int = 64,
             progress: bool = False) -> dict[str, float]:
    """HR@K / NDCG@K / MRR of ``xc`` on ``data``'s ``split`` (target + ``n_neg`` uniform negatives)."""
    cands = build_candidates(data, split, n_neg, "uniform", seed, max_users)
    xc.set_domain(data.titles, data.name)
    users_per_call = max(1, 4 * batch_size // (n_neg + 1))
    return evaluate_scorer(xc.scorer(batch_size), cands, ks, batch_size=users_per_call, progress=progress,
                           desc="+".join(xc.adapters))
