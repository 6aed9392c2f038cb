"""Training X-Cross (and single-adapter scorers): cross-entropy over the positive and K sampled negatives.

``train(xc, data)`` trains the integrators, ``w`` and the head of an :class:`XCrossModel` on any
:class:`~xkern.data.DomainData` (its ``train`` sequences; ``val`` for early stopping, never ``test``).
Each training example is one position of a user's sequence: the history before it, the true next
item and ``n_neg`` uniform negatives outside the user's items, freshly drawn every epoch from a
seeded generator. Validation uses fixed negatives; the best state by validation loss is restored
at the end. ``train_adapter_scorer`` trains one LoRA adapter together with a scoring head the same
way (a 1-stream ``XCrossModel`` plus the adapter's A/B): the per-domain scorers X-Cross mixes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xkern.data.domain import DomainData
from xkern.data.evaluate import evaluate_scorer
from xkern.data.examples import next_item_pairs
from xkern.data.metrics import evaluate_ranking
from xkern.data.negatives import build_candidates, sample_uniform, user_rng
from xkern.data.splits import sample_users
from xkern.errors import InputError, InputTypeError
from xkern.fileio import atomic_write_text
from xkern.nn.model import XkernModel
from xkern.train.checkpoint import ParameterCheckpoint
from xkern.train.loop import TrainConfig, fit, option, with_overrides
from xkern.train.trainer import NOT_IDENTITY
from xkern.xcross.model import XCrossModel, adapter_fingerprint


@dataclass
class XCrossTrainConfig(TrainConfig):
    """Options of :func:`train`: the loop's (:class:`~xkern.train.loop.TrainConfig`, X-Cross defaults) and data's."""

    epochs: float = option(3.0, "passes over the training examples")
    batch_size: int = option(8, "examples (users) per step; each is 1 + n_neg pairs x n streams")
    lr: float = option(1e-3, "learning rate of the integrators, w and the head")
    schedule: str = option("constant", "after warm-up: 'linear' decay to 0 or 'constant'",
                         choices=("linear", "constant"))
    patience: int | None = option(2, "stop after this many validations without improvement (None: never)")
    keep_best: bool = option(True, "restore the parameters of the best validation at the end")
    n_neg: int = option(4, "K sampled negatives per training example")
    extra_lr: float | None = option(None, "learning rate of extra_params (adapter weights); default lr")
    w_concat_lr: float | None = option(None, "learning rate of the integrators' W_concat (default lr; 0 freezes "
                                       "them, so only w, the biases and the head train: the low-dimensional "
                                       "part can then take a larger lr)")
    max_per_user: int | None = option(1, "training positions per user sequence (the last ones)")
    max_train_users: int | None = option(None, "cap on training users (seeded choice)")
    val_neg: int = option(9, "fixed negatives per validation user")
    max_val_users: int | None = option(200, "validation users")
    score_batch_size: int = option(64, "(history, candidate) pairs per scoring forward")
    calibrate: bool = option(False, "likelihood scoring: train and validate on each candidate's score minus its "
                             "score after an empty history (PMI; removes the title prior that dominates raw "
                             "likelihoods)")

    def validate(self) -> None:
        super().validate()
        if self.n_neg < 1:
            raise InputError("batch_size and n_neg must be >= 1")
        for name in ("extra_lr", "w_concat_lr"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise InputError(f"{name} must be >= 0 (or None: lr), got {v}")


@dataclass
class XCrossTrainResult:
    steps: int
    train_loss: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "mrr", "hr@1"}
    best_step: int = 0
    best_val_loss: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0  # this call's
    n_train_examples: int = 0
    n_trainable: int = 0
    start_step: int = 0  # the step this call resumed from
    seconds_total: float | None = None  # every call's (None: resumed from a checkpoint that did not keep them)

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
    return set(sample_users(list(train), cap, seed))


def example_loss(xc: XCrossModel, batch: Sequence[Example], forward: nn.Module | None = None,
                 calibrate: bool = False, packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy of the targets among their candidates, scores [B, 1 + K]).

    ``forward``: what runs ``xc``'s forward (its DDP wrapper under ``torchrun``); ``xc`` itself by default.
    ``calibrate`` (likelihood scoring): each score minus the same candidate's score after an empty history,
    both differentiable, so the integrators learn the history-dependent part rather than the title prior.
    ``packed`` (likelihood scoring): each example's prompt once with all its candidates' titles
    (:meth:`XCrossModel.pack`; the empty-history prompt once for the whole batch), the scores of one
    row per (history, candidate) pair, which ``packed=False`` runs.
    """
    if calibrate and xc.scoring != "likelihood":
        raise InputError("calibrate needs scoring='likelihood' (a classification score has no title prior)")
    run = forward or xc
    if packed and xc.scoring == "likelihood":
        rows = xc.pack([(h, cands) for h, cands, _ in batch])
        scores = run(rows.input_ids, rows.attention_mask, packed=rows).view(len(batch), -1)
        if calibrate:
            prior = xc.pack([(None, np.concatenate([cands for _, cands, _ in batch]))])
            scores = scores - run(prior.input_ids, prior.attention_mask, packed=prior).view(len(batch), -1)
    else:
        ids, mask, labels = xc.encode([(h, int(c)) for h, cands, _ in batch for c in cands])
        scores = run(ids, mask, labels).view(len(batch), -1)
        if calibrate:
            ids, mask, labels = xc.encode([([], int(c)) for _, cands, _ in batch for c in cands])
            scores = scores - run(ids, mask, labels).view(len(batch), -1)
    target = torch.tensor([t for _, _, t in batch], device=scores.device)
    return F.cross_entropy(scores, target), scores


@torch.no_grad()
def validate(xc: XCrossModel, examples: Sequence[Example], batch_size: int = 64,
             calibrate: bool = False, prefix_sharing: bool = True) -> dict[str, float]:
    """Mean loss, MRR and HR@1 over fixed candidate lists (eval mode, no gradients), and each example's
    loss (``losses``): two validations of the same examples compare pairwise, so a change can be told
    from the validation set's own noise.

    Likelihood scoring with ``prefix_sharing`` scores each history's prompt once for all its candidates
    (:meth:`XCrossModel.score`): the scores of one row per (history, candidate) pair, which
    ``prefix_sharing=False`` runs, for a fraction of the tokens (a prompt is ~10 titles long)."""
    if not examples:
        return {}
    if prefix_sharing and xc.scoring == "likelihood":
        all_scores = xc.score([h for h, _, _ in examples], np.stack([c for _, c, _ in examples]), batch_size,
                              calibrate=calibrate).float()
    else:
        was = xc.training
        xc.eval()
        per = max(1, batch_size // len(examples[0][1]))
        scores = []
        try:
            for s in range(0, len(examples), per):
                scores.append(example_loss(xc, examples[s:s + per], calibrate=calibrate,
                                           packed=False)[1].float().cpu())
        finally:
            xc.train(was)
        all_scores = torch.cat(scores)
    targets = torch.tensor([t for _, _, t in examples])
    losses = F.cross_entropy(all_scores, targets, reduction="none")
    m = evaluate_ranking(all_scores.numpy(), targets.numpy(), ks=(1,))
    return {"loss": float(losses.mean()), "mrr": float(m["MRR"]), "hr@1": float(m["HR@1"]),
            "losses": [round(float(v), 5) for v in losses]}


class _XCrossEpochs:
    """Fresh seeded negatives every epoch; the order a numpy permutation of (seed, epoch)."""

    def __init__(self, data: DomainData, cfg: XCrossTrainConfig, users: set[int] | None) -> None:
        self.data, self.cfg, self.users = data, cfg, users

    def examples(self, epoch: int) -> list[Example]:
        c = self.cfg
        return candidate_examples(self.data, "train", c.n_neg, c.seed, epoch, c.max_per_user, self.users)

    def order(self, epoch: int, n: int) -> list[int]:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(n).tolist()


def train(xc: XCrossModel, data: DomainData, *, config: XCrossTrainConfig | None = None,
          extra_params: Sequence[nn.Parameter] = (), output_dir: str | os.PathLike | None = None,
          resume: bool = True, callback: Callable[[int, float], None] | None = None,
          stop_after: int | None = None, identity: dict[str, Any] | None = None,
          **overrides: Any) -> XCrossTrainResult:
    """Train the integrators, ``w`` and the head of ``xc`` (plus ``extra_params``) on ``data``.

    ``data.train`` gives the training examples (1 positive + ``n_neg`` negatives each), ``data.val``
    the validation lists (``val_neg`` fixed negatives) used for early stopping: after every
    ``eval_every`` steps the validation loss is measured, the best state is kept, and training
    stops after ``patience`` validations without improvement. The best state is restored at the end.
    ``output_dir``: the trained X-Cross parameters (``xcross/``), ``train_log.json`` and the resumable
    checkpoint (``checkpoint/``: X-Cross's and ``extra_params``' tensors, optimizer, RNG, position;
    written at the end and every ``save_every`` steps, by rank 0 under ``torchrun``) go there; an
    existing checkpoint is resumed when ``resume`` and written by the same run (``identity``, what the
    caller says makes the run, plus X-Cross's config, its streams' adapter fingerprints and the
    training config; any difference is refused naming the fields). ``stop_after``: stop after that
    many optimizer steps of this call (an interruption, for tests). Keyword overrides set
    :class:`XCrossTrainConfig` fields.
    """
    cfg = with_overrides(config or XCrossTrainConfig(), overrides)
    if not isinstance(xc, XCrossModel):
        raise InputTypeError(f"xc must be an XCrossModel, got {type(xc).__name__}")
    if xc.tokenizer is None:
        raise InputError("the XCrossModel needs a tokenizer (XCrossModel(..., tokenizer=...))")
    cfg.validate()
    if cfg.calibrate and xc.scoring != "likelihood":
        raise InputError("calibrate needs scoring='likelihood' (a classification score has no title prior)")
    xc.set_domain(data.titles, data.name)
    users = _pick_users(data.train, cfg.max_train_users, cfg.seed)
    epochs = _XCrossEpochs(data, cfg, users)
    n_examples = len(epochs.examples(0))
    if not n_examples:
        raise InputError(f"{data.name}: no training examples (sequences need >= 2 items)")
    val_examples = candidate_examples(data, "val", cfg.val_neg, cfg.seed, -1, None)[: cfg.max_val_users or None]

    for p in xc.model.parameters():
        p.requires_grad_(False)
    # W_concat gets its own optimizer group only when it has its own rate: the default keeps the one-group
    # layout, so checkpoints written before w_concat_lr existed still resume
    split = {id(q) for q in xc.w_concat} if cfg.w_concat_lr is not None else set()
    frozen = split if cfg.w_concat_lr == 0 else set()
    own = [q for q in xc.trainable_parameters() if id(q) not in split]
    extra = list(extra_params)
    for p in xc.trainable_parameters() + extra:
        p.requires_grad_(id(p) not in frozen)
    groups = [{"params": own, "lr": cfg.lr}]
    if split and not frozen:
        groups.append({"params": list(xc.w_concat), "lr": cfg.w_concat_lr})
    if extra:
        groups.append({"params": extra, "lr": cfg.lr if cfg.extra_lr is None else cfg.extra_lr})
    steps_per_epoch = max(n_examples // cfg.batch_size, 1)
    if cfg.eval_every is None:
        cfg = dataclasses.replace(cfg, eval_every=steps_per_epoch)  # validate once per epoch
    checkpointer = None
    if output_dir is not None:
        run = {**(identity or {}), "xcross": xc.config_dict(), "data": data.meta.get("source", data.name),
               "target": data.name, "train_users": len(data.train if users is None else users),
               "streams": {a: adapter_fingerprint(xc.model, a) for a in xc.adapters},
               "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY}}
        checkpointer = ParameterCheckpoint(checkpoint_names(xc, extra), Path(output_dir) / "checkpoint", resume,
                                           run)
    res = fit(xc, groups, epochs,
              lambda module, batch: example_loss(xc, batch, forward=module, calibrate=cfg.calibrate)[0], cfg,
              validate=(lambda: validate(xc, val_examples, cfg.score_batch_size, cfg.calibrate))
              if val_examples else None,
              validate_at_start=True, desc=f"x-cross {'+'.join(xc.adapters)}", callback=callback,
              checkpointer=checkpointer, stop_after=stop_after, hf_model=xc.model.model)
    result = XCrossTrainResult(steps=res.steps, train_loss=res.train_loss, val=res.evals,
                               best_step=res.best_step if val_examples else res.steps, best_val_loss=res.best_loss,
                               stopped_early=res.stopped_early, seconds=res.seconds, start_step=res.start_step,
                               seconds_total=res.seconds_total, n_train_examples=n_examples,
                               n_trainable=sum(p.numel() for g in groups for p in g["params"]))
    if output_dir is not None and res.rank == 0:  # under torchrun every rank holds the same state
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        xc.save(out / "xcross")
        trainable = xc.num_trainable()
        if frozen:  # the frozen integrators' weights are not trained parameters of this run
            n_frozen = sum(q.numel() for q in xc.w_concat)
            trainable = {**trainable, "integrators": trainable["integrators"] - n_frozen,
                         "total": trainable["total"] - n_frozen, "frozen_w_concat": n_frozen}
        log = {"adapters": xc.adapters, "config": asdict(cfg), "trainable": trainable,
               "extra_trainable": sum(p.numel() for p in extra), "world_size": res.world_size, **result.to_dict()}
        atomic_write_text(out / "train_log.json", json.dumps(log, indent=2) + "\n")
    return result


def checkpoint_names(xc: XCrossModel, extra: Sequence[nn.Parameter]) -> dict[str, nn.Parameter]:
    """Stable names of what :func:`train` trains: ``xcross.<name>`` and ``model.<name>`` for ``extra``."""
    trainable = {id(q) for q in xc.trainable_parameters()}
    named = {f"xcross.{n}": p for n, p in xc.named_parameters() if id(p) in trainable}
    by_id = {id(p): n for n, p in xc.model.named_parameters()}
    for i, p in enumerate(extra):
        named[f"model.{by_id.get(id(p), f'extra{i}')}"] = p
    return named


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
        raise InputError("no source heads")
    with torch.no_grad():
        for name, p in xc.head.named_parameters():
            p.copy_(torch.stack([dict(s.head.named_parameters())[name].detach() for s in sources]).mean(0))


def evaluate(xc: XCrossModel, data: DomainData, split: str = "test", n_neg: int = 29, seed: int = 0,
             max_users: int | None = None, ks: Sequence[int] = (1, 3, 10), batch_size: int = 64,
             progress: bool = False, distributed: bool = False) -> dict[str, float]:
    """HR@K / NDCG@K / MRR of ``xc`` on ``data``'s ``split`` (target + ``n_neg`` uniform negatives).

    ``distributed``: under ``torchrun`` each rank scores its share of the users (same metrics on every rank).
    """
    cands = build_candidates(data, split, n_neg, "uniform", seed, max_users)
    xc.set_domain(data.titles, data.name)
    users_per_call = max(1, 4 * batch_size // (n_neg + 1))
    return evaluate_scorer(xc.scorer(batch_size), cands, ks, batch_size=users_per_call, progress=progress,
                           desc="+".join(xc.adapters), distributed=distributed)
