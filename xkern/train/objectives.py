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
            raise ValueError("empty batch")
        ids = [list(e["input_ids"]) for e in examples]
        if any(len(r) < 2 for r in ids):
            raise ValueError("every causal-LM example needs at least 2 tokens")
        labels = [list(e.get("labels", e["input_ids"])) for e in examples]
        if any(len(a) != len(b) for a, b in zip(ids, labels, strict=True)):
            raise ValueError("labels must have the length of input_ids")
        return ids, labels

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows(examples)
        input_ids, mask = pad_batch(ids, pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": pad_rows(labels, IGNORE)}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], adapter: str) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=adapter)
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


class CandidateScoring:
    """Cross-entropy of the target candidate, candidates scored by their summed log-likelihood."""

    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("empty batch")
        n_cand = {len(e["candidates"]) for e in examples}
        if len(n_cand) != 1 or n_cand.pop() < 2:
            raise ValueError("every example needs the same number (>= 2) of candidates")
        rows, labels, targets = [], [], []
        for e in examples:
            if not 0 <= int(e["target"]) < len(e["candidates"]):
                raise ValueError(f"target {e['target']} out of range for {len(e['candidates'])} candidates")
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
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=adapter)
        scores = sequence_logprob(out.logits, batch["input_ids"], batch["labels"])
        scores = scores.view(-1, int(batch["n_candidates"]))
        return F.cross_entropy(scores, batch["target"])


OBJECTIVES: dict[str, type] = {"causal_lm": CausalLM, "candidates": CandidateScoring}
