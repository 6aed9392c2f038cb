"""Training objectives: how a batch of examples becomes tensors and a loss.

An objective has a ``collate(examples, pad_id) -> dict`` and a ``loss(model, batch, adapter) -> Tensor``.

- :class:`CausalLM`: examples ``{"input_ids": [...], "labels": [...] (optional, -100 = ignored)}``;
  the usual shifted next-token cross-entropy averaged over the labelled tokens. Prompt tokens are
  masked by giving them label -100 (see :func:`xkern.data.encoding.prompt_completion_example`).
- :class:`CandidateScoring`: examples ``{"prompt_ids": [...], "candidates": [[...], ...], "target": i}``;
  each candidate's score is the summed log-probability of its tokens after the prompt, and the
  loss is the cross-entropy of the target among the candidates (the positive + sampled negatives).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from xkern.data.encoding import IGNORE, pad_batch, pad_rows, prompt_completion_example
from xkern.errors import InputError


class Objective(Protocol):
    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], adapter: str) -> torch.Tensor: ...


def model_pad_id(model: Any) -> int:
    """The token a model's batches are padded with: its ``pad_token_id``, else its (first) EOS, else 0."""
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        eos = getattr(model.config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, list) else eos
    return int(pad or 0)


def labelled_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, row)`` of every labelled token (label != -100, predicted from the position before it), in
    row-major order. The LM head runs at those positions only where the model supports it
    (``XkernModel.supports_logits_at``, looked up through a DDP wrapper); else on all logits."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels[:, 1:]
    picked = target != IGNORE
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(target)[picked]
    core = getattr(model, "module", model)
    if getattr(core, "supports_logits_at", False):
        at = torch.zeros_like(ids, dtype=torch.bool)
        at[:, :-1] = picked
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=adapter, logits_at=at, use_cache=False).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=adapter).logits[:, :-1][picked]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[picked][:, None]).squeeze(-1)
    return logp, rows


def sequence_logprob(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each row (labels -100 are skipped)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


class CausalLM:
    """Next-token cross-entropy over the labelled tokens (right padding)."""

    @staticmethod
    def rows(examples: Sequence[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
        """``(input_ids, labels)`` rows of a batch, checked (subclasses pad them their own way)."""
        if not examples:
            raise InputError("empty batch")
        ids = [list(e["input_ids"]) for e in examples]
        if any(len(r) < 2 for r in ids):
            raise InputError("every causal-LM example needs at least 2 tokens")
        labels = [list(e.get("labels", e["input_ids"])) for e in examples]
        if any(len(a) != len(b) for a, b in zip(ids, labels, strict=True)):
            raise InputError("labels must have the length of input_ids")
        return ids, labels

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows(examples)
        input_ids, mask = pad_batch(ids, pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": pad_rows(labels, IGNORE)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], adapter: str) -> torch.Tensor:
        logp, _ = labelled_logprobs(model, batch, adapter)
        return -logp.mean()


class CandidateScoring:
    """Cross-entropy of the target candidate, candidates scored by their summed log-likelihood."""

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        if not examples:
            raise InputError("empty batch")
        n_cand = {len(e["candidates"]) for e in examples}
        if len(n_cand) != 1 or n_cand.pop() < 2:
            raise InputError("every example needs the same number (>= 2) of candidates")
        rows, labels, targets = [], [], []
        for e in examples:
            if not 0 <= int(e["target"]) < len(e["candidates"]):
                raise InputError(f"target {e['target']} out of range for {len(e['candidates'])} candidates")
            targets.append(int(e["target"]))
            for cand in e["candidates"]:
                ex = prompt_completion_example(e["prompt_ids"], cand)
                rows.append(ex["input_ids"])
                labels.append(ex["labels"])
        input_ids, mask = pad_batch(rows, pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": pad_rows(labels, IGNORE),
                "target": torch.tensor(targets),
                "n_candidates": torch.tensor(len(examples[0]["candidates"]))}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], adapter: str) -> torch.Tensor:
        logp, rows = labelled_logprobs(model, batch, adapter)
        scores = torch.zeros(batch["input_ids"].shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
        scores = scores.view(-1, int(batch["n_candidates"]))
        return F.cross_entropy(scores, batch["target"])


OBJECTIVES: dict[str, type] = {"causal_lm": CausalLM, "candidates": CandidateScoring}
