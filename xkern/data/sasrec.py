"""SASRec (Kang & McAuley, ICDM 2018): the standard ID-based sequential recommender, as a baseline row.

A causal self-attention encoder over item-id embeddings; the hidden state at the last position
scores every item by a dot product with its (shared) embedding. Trained on the training sequences
with cross-entropy over all items at every position (the full-softmax variant, which trains
faster and ranks better than the original's one sampled negative), early-stopped on the
validation users' last item. Small enough to train on the CPU in minutes on these domains.

Positions count from the end of a sequence, so the newest item always has position 0 however
long the history; sequences are left-padded in a batch and padding never serves as a key.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xkern.data.domain import DomainData
from xkern.errors import InputError


@dataclass(frozen=True)
class SASRecConfig:
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3  # epochs without a better validation loss before stopping
    seed: int = 0
    threads: int = 1  # its matmuls are tiny: one thread is fastest, and a busy second core slows two a lot


class SASRec(nn.Module):
    """Item ids are shifted by one inside the model: 0 is padding."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        self.items = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.positions = nn.Embedding(cfg.max_len, cfg.hidden)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, dim_feedforward=cfg.hidden * 4, dropout=cfg.dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def batch(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Left-padded ``[B, L]`` of shifted ids, each history cut to its last ``max_len`` items."""
        cut = [list(h)[-self.cfg.max_len:] for h in histories]
        width = max(1, max(len(h) for h in cut))
        out = torch.zeros(len(cut), width, dtype=torch.long)
        for b, h in enumerate(cut):
            if h:
                out[b, width - len(h):] = torch.tensor(h, dtype=torch.long) + 1
        return out

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, H]`` of left-padded shifted ids ``[B, L]``."""
        b, length = seq.shape
        pos = torch.arange(length - 1, -1, -1, device=seq.device).clamp(max=self.cfg.max_len - 1)
        h = self.drop(self.items(seq) * math.sqrt(self.cfg.hidden) + self.positions(pos))
        pad = seq == 0
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).triu(1)
        blocked = causal.unsqueeze(0) | pad.unsqueeze(1)  # [B, Lq, Lk]: future keys and padding keys
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=seq.device)  # a query always sees itself
        mask = blocked.repeat_interleave(self.cfg.heads, dim=0)
        h = self.encoder(h * (~pad).unsqueeze(-1), mask=mask)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every real item (``[..., n_items]``, unshifted ids)."""
        return hidden @ self.items.weight[1:].T


def _next_item_batches(seqs: list[list[int]], model: SASRec, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(len(seqs))
    for s in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[s:s + batch_size]]
        inputs = model.batch([c[:-1] for c in chunk])
        targets = model.batch([c[1:] for c in chunk]) - 1  # -1 where padded: ignored
        yield inputs, targets


def _val_loss(model: SASRec, val: list[list[int]], batch_size: int = 512) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val), batch_size):
            chunk = val[s:s + batch_size]
            h = model(model.batch([c[:-1] for c in chunk]))[:, -1]
            target = torch.tensor([c[-1] for c in chunk])
            total += float(F.cross_entropy(model.logits(h), target, reduction="sum"))
            n += len(chunk)
    model.train()
    return total / max(n, 1)


@dataclass
class SASRecFit:
    model: SASRec
    epochs: int
    best_epoch: int
    val_loss_start: float
    val_loss_best: float
    trainable_params: int
    seconds: float


def fit_sasrec(data: DomainData, cfg: SASRecConfig | None = None, progress: bool = False) -> SASRecFit:
    """Train on ``data.train``; keep the epoch with the lowest validation loss on ``data.val``."""
    cfg = cfg or SASRecConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _fit(data, cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(data: DomainData, cfg: SASRecConfig, progress: bool) -> SASRecFit:
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train = [s[-(cfg.max_len + 1):] for s in data.train.values() if len(s) >= 2]
    val = [s[-(cfg.max_len + 1):] for s in data.val.values() if len(s) >= 2]
    if not train:
        raise InputError(f"{data.name}: no training sequence with two or more items")
    model = SASRec(data.n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = best = _val_loss(model, val) if val else math.nan
    best_state, best_epoch, stale = copy.deepcopy(model.state_dict()), 0, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"sasrec {data.name}", disable=not progress, leave=False)
    epoch = 0
    for epoch in bar:
        for inputs, targets in _next_item_batches(train, model, cfg.batch_size, rng):
            loss = F.cross_entropy(model.logits(model(inputs)).flatten(0, 1), targets.flatten(), ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not val:
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
            continue
        current = _val_loss(model, val)
        bar.set_postfix(val=f"{current:.3f}")
        if current < best - 1e-4:
            best, best_state, best_epoch, stale = current, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return SASRecFit(model, epoch, best_epoch, start, best, params, round(time.perf_counter() - t0, 1))


class SASRecScorer:
    """The scorer contract of :mod:`xkern.data.evaluate` over a trained SASRec."""

    def __init__(self, fit: SASRecFit) -> None:
        self.fit = fit

    @classmethod
    def train(cls, data: DomainData, cfg: SASRecConfig | None = None, progress: bool = False) -> SASRecScorer:
        return cls(fit_sasrec(data, cfg, progress))

    def __call__(self, histories: Sequence[Sequence[int]], candidates: np.ndarray) -> np.ndarray:
        model = self.fit.model
        with torch.no_grad():
            h = model(model.batch(histories))[:, -1]  # [B, H]
            cand = torch.as_tensor(np.asarray(candidates), dtype=torch.long) + 1
            return torch.einsum("bh,bch->bc", h, model.items(cand)).numpy().astype(np.float64)

    def summary(self) -> dict[str, Any]:
        f = self.fit
        return {"config": asdict(f.model.cfg), "epochs": f.epochs, "best_epoch": f.best_epoch,
                "val_loss_start": f.val_loss_start, "val_loss_best": f.val_loss_best,
                "trainable_params": f.trainable_params, "seconds": f.seconds}
