"""X-Cross rows of the quickstart (``xkern demo``): X-Cross over the per-source LoRAs of the tiny NF4 Llama.

The quickstart's :class:`~xkern.demo.lm.LMDemo` trains one LoRA per source domain (next-item
causal LM). X-Cross runs those adapters as streams of the same frozen base, and trains only its
integrators, stream weights ``w`` and scoring head (fresh) on the target's training users at the
row's fraction (validation and early stopping: the target's ``val`` users), then scores each
candidate by its title's log-likelihood after the next-item prompt under the base's LM head applied to
the mixed streams (``scoring="likelihood"``; ``"head"`` pools and scores with a trained head instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class XCrossDemoConfig:
    n_neg: int = 4
    epochs: float = 8.0
    batch_size: int = 16
    lr: float = 1e-2
    patience: int = 3
    pooling: str = "mean"  # the tiny LM's last token carries little; mean pooling learns (see docs/xcross.md)
    max_val_users: int = 100
    val_neg: int = 9
    max_history: int = 5
    max_tokens: int = 96
    score_batch_size: int = 240
    # the tiny Llama is a decoder: score by the title's log-likelihood under its LM head on the mixed streams,
    # which starts from the source LoRAs' next-item skill ("head": pooled state + a head trained from scratch)
    scoring: str = "likelihood"


def _build(ctx: Any, source_names: Sequence[str], cfg: XCrossDemoConfig):
    from xkern.demo.lm import lm_demo, source_lora
    from xkern.xcross.model import XCrossModel
    from xkern.xcross.train import train

    lm = lm_demo(ctx)
    adapters = [source_lora(ctx, s) for s in source_names]
    xc = XCrossModel(lm.model, adapters, pooling=cfg.pooling, scoring=cfg.scoring, tokenizer=lm.tokenizer,
                     titles=ctx.target.titles,
                     domain=ctx.target.name, max_history=min(cfg.max_history, lm.cfg.max_history),
                     max_tokens=cfg.max_tokens)
    res = train(xc, ctx.target, n_neg=cfg.n_neg, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                patience=cfg.patience, max_val_users=cfg.max_val_users, val_neg=cfg.val_neg, seed=ctx.seed,
                score_batch_size=cfg.score_batch_size, progress=bool(ctx.options.get("progress", False)))
    lm.trained[f"xcross-{ctx.fraction:g}"] = {"adapters": adapters, "steps": res.steps, "best_step": res.best_step,
                                              "best_val_loss": res.best_val_loss, "trainable": xc.num_trainable(),
                                              "seconds": round(res.seconds, 2), "config": asdict(cfg)}
    return xc.scorer(cfg.score_batch_size)


def xcross_methods(source_names: Sequence[str], config: XCrossDemoConfig | None = None) -> list[Any]:
    """Quickstart rows: X-Cross over all source LoRAs, trained on the target at each fraction."""
    from xkern.demo.methods import Method

    cfg = config or XCrossDemoConfig()
    names = list(source_names)
    if not names:
        return []

    def build(ctx: Any):
        return _build(ctx, names, ctx.options.get("xcross_config") or cfg)

    return [Method("xcross", build, f"X-Cross over the LoRAs of {', '.join(names)}: integrators + w trained on the "
                   "target, candidates scored by likelihood (tiny NF4 Llama)", group="sources")]
