"""Training WeaveRec's adapters: one target-only LoRA and one hybrid LoRA per source.

Every adapter starts from the frozen base with a fresh initialization (same seed, so the target and
hybrid adapters differ only by their data) and is trained by :func:`xkern.train.train_lora`, which
saves it in PEFT's format under ``<output_dir>/<name>/adapter``.

:class:`CompletionLM` is the causal-LM objective of :class:`xkern.train.CausalLM` (mean next-token
cross-entropy over the labelled tokens, same value) computed cheaply: rows are LEFT-padded with
explicit positions so every row's completion sits at the end, and the vocabulary projection runs
only on the last ``max completion + 1`` positions (``logits_to_keep``) instead of on the whole
prompt. On a 49k-token vocabulary the projection is most of a small model's cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xkern.data.domain import DomainData
from xkern.data.encoding import IGNORE, pad_batch, pad_rows
from xkern.errors import InputError, InputTypeError
from xkern.train.objectives import CausalLM
from xkern.weave.data import domain_examples, mix_domains


class CompletionLM(CausalLM):
    """Causal-LM loss over the labelled tokens; left padding + ``logits_to_keep`` (see module doc)."""

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows(examples)
        width = max(len(r) for r in ids)
        input_ids, mask = pad_batch(ids, pad_id, left=True)
        lab = pad_rows(labels, IGNORE, left=True)
        labelled = (lab[:, 1:] != IGNORE).any(0).nonzero()
        first = int(labelled[0]) if len(labelled) else width - 2  # first position whose NEXT token is labelled
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab,
                "position_ids": (mask.cumsum(-1) - 1).clamp_min(0), "keep": torch.tensor(width - first)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], adapter: str) -> torch.Tensor:
        keep = int(batch["keep"])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=keep, adapter_names=adapter)
        logits = out.logits[:, :-1].float()  # positions width-keep .. width-2 predict the next token
        target = batch["labels"][:, -keep + 1:] if keep > 1 else batch["labels"][:, :0]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


@dataclass
class WeaveAdapters:
    """Names (in the model) and PEFT directories of the adapters :func:`train` produced."""

    target: str
    hybrids: dict[str, str]
    paths: dict[str, str] = field(default_factory=dict)
    logs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [self.target, *self.hybrids.values()]


def train_adapter(model: Any, name: str, examples: Sequence[dict[str, Any]], *, r: int = 8,
                  lora_alpha: float = 16.0, target_modules: Any = None, seed: int = 0,
                  output_dir: str | os.PathLike | None = None, objective: Any = None,
                  **train_kwargs: Any) -> dict[str, Any]:
    """Create adapter ``name`` (fresh init, ``seed``) and train it on ``examples`` with ``train_lora``."""
    from xkern.train import train_lora

    model.add_adapter(name, r=r, lora_alpha=lora_alpha, target_modules=target_modules, seed=seed)
    res = train_lora(model, name, list(examples), objective=objective or CompletionLM(), seed=seed,
                     output_dir=None if output_dir is None else Path(output_dir) / name, **train_kwargs)
    info = {"examples": len(examples), "steps": res.steps, "seconds": round(res.seconds, 2),
            "first_loss": res.train_loss[0] if res.train_loss else None,
            "final_loss": res.train_loss[-1] if res.train_loss else None}
    if output_dir is not None:
        info["path"] = str(Path(output_dir) / name / "adapter")
    return info


def train(model: Any, target: DomainData | Sequence[dict[str, Any]],
          sources: Sequence[DomainData] | Mapping[str, Sequence[dict[str, Any]]], *,
          tokenizer: Any = None, examples_fn: Callable[[DomainData], list[dict[str, Any]]] | None = None,
          fmt: str = "next_item", max_history: int = 5, per_domain: int | None = None, prefix: str = "weave",
          r: int = 8, lora_alpha: float = 16.0, target_modules: Any = None, seed: int = 0,
          output_dir: str | os.PathLike | None = None, **train_kwargs: Any) -> WeaveAdapters:
    """Train WeaveRec's N+1 adapters on ``model``: ``<prefix>-target`` and ``<prefix>-hybrid-<source>``.

    ``target`` / ``sources``: :class:`DomainData` (turned into examples by ``examples_fn``, default
    :func:`xkern.weave.data.domain_examples` with ``tokenizer``, ``fmt`` and ``max_history``), or
    ready examples (target: a list; sources: a dict name -> list). The hybrid of each source is
    trained on :func:`mix_domains` of target and source examples (``per_domain`` each, equal amounts
    by default, seeded). Each adapter is created fresh with ``r`` / ``lora_alpha`` /
    ``target_modules`` / ``seed`` and trained by ``train_lora`` (``train_kwargs``: ``lr``,
    ``batch_size``, ``epochs``, ``max_steps``, ...); with ``output_dir`` each lands in PEFT format
    in ``<output_dir>/<name>/adapter``.
    """
    if isinstance(target, DomainData):
        if examples_fn is None:
            if tokenizer is None:
                raise InputError("give a tokenizer (or examples_fn) to turn domains into examples")

            def examples_fn(d: DomainData) -> list[dict[str, Any]]:
                return domain_examples(tokenizer, d, fmt, max_history, seed=seed)

        target_ex = examples_fn(target)
        source_ex = {d.name: examples_fn(d) for d in sources}
    else:
        if not isinstance(sources, Mapping):
            raise InputTypeError("with example lists, sources must be a dict name -> examples")
        target_ex, source_ex = list(target), {k: list(v) for k, v in sources.items()}
    mixes = mix_domains(target_ex, source_ex, per_domain, seed)
    common = dict(r=r, lora_alpha=lora_alpha, target_modules=target_modules, seed=seed, output_dir=output_dir)
    out = WeaveAdapters(target=f"{prefix}-target", hybrids={k: f"{prefix}-hybrid-{k}" for k in source_ex})
    out.logs[out.target] = train_adapter(model, out.target, target_ex, **common, **train_kwargs)
    for key, name in out.hybrids.items():
        out.logs[name] = train_adapter(model, name, mixes[key], **common, **train_kwargs)
    out.paths = {n: info["path"] for n, info in out.logs.items() if "path" in info}
    return out
