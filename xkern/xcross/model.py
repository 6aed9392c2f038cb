"""``XCrossModel``: n LoRA adapters of one NF4 base run as n streams, mixed after every block.

The n streams are the same (history, candidate) pairs, each under its own adapter, stacked on the
batch axis stream-major (``[a_1]*N + [a_2]*N + ...``): every linear layer of the base is therefore
ONE launch of the core op for all streams (the NF4 weight is read once). A forward hook on every
transformer block views the block output ``[n*N, T, d]`` as ``[n, N, T, d]`` and replaces it with
``xcross_integrate`` of it (the next block of stream m reads ``h~_m``). The scorer pools each
stream's final hidden state (after the base's own final norm, if it has one), mixes the streams
with ``w`` and applies the head ``v^T GELU(W_p x + b_p) + b_c``.

Trainable: the per-block ``W_concat`` (optional bias), ``w`` and the head; the base and the
adapters stay frozen. ``n = 1`` is allowed and means "one adapter + a scoring head" (no
integrators): the single-source and target-only LoRA baselines use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xkern.data.encoding import IGNORE, CompletionPairEncoder, PairEncoder, pad_batch, pad_rows
from xkern.data.prompts import MAX_HISTORY
from xkern.errors import InputError, InputKeyError, InputTypeError
from xkern.fileio import atomic_path, atomic_write_text
from xkern.nn import BASE, XkernModel, routing_scope
from xkern.nn.compat import cache_keyword, output_cache
from xkern.ops.xcross_integrate import xcross_integrate
from xkern.serve.scoring import PrefixLikelihoodScorer, select_cache

POOLINGS = ("auto", "first", "last", "mean", "candidate")
INTEGRATOR_NORMS = ("none", "rms")
FORMAT = "xkern-xcross/1"
CONFIG_NAME = "xcross_config.json"
WEIGHTS_NAME = "xcross.safetensors"


# --------------------------------------------------------------------------------------------- helpers

def find_blocks(base: nn.Module, num_layers: int | None = None) -> nn.ModuleList:
    """The transformer blocks of a ``transformers`` base model (``layers`` for Llama, ``encoder.layer`` for BERT)."""
    for path in ("layers", "encoder.layer", "h", "decoder.layers", "transformer.h"):
        mod: Any = base
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and (num_layers is None or len(m) == num_layers)]
    if not lists:
        raise InputError(f"cannot find the transformer blocks of {type(base).__name__}")
    return lists[0]


def is_decoder_model(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_decoder", False):
        return True
    names = [type(model).__name__, *(getattr(cfg, "architectures", None) or [])]
    return any(n.endswith("ForCausalLM") or n.endswith("LMHeadModel") for n in names)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``[B, T, d] -> [B, d]``: first token, last non-pad token (any padding side) or masked mean."""
    if mode == "first":
        return hidden[:, 0]
    if mode == "last":
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).amax(dim=1).clamp_min(0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise InputError(f"pooling must be one of ('first', 'last', 'mean'), got {mode!r}")


class ScoringHead(nn.Module):
    """``score = v^T GELU(W_p x + b_p) + b_c`` (float32)."""

    def __init__(self, hidden: int, head_dim: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, head_dim or hidden)
        self.out = nn.Linear(head_dim or hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.dense(x.float()))).squeeze(-1)


def adapter_fingerprint(model: XkernModel, name: str) -> str:
    """A short hash of an adapter's weights (shapes and values), to tell same-named adapters apart."""
    h = hashlib.blake2b(digest_size=8)
    for module, layer in sorted(model.nf4_layers.items()):
        if name in layer.lora_A:
            h.update(module.encode())
            for t in (layer.lora_A[name], layer.lora_B[name]):
                a = t.detach().float().cpu().contiguous()
                h.update(str(tuple(a.shape)).encode())
                h.update(np.round(a.numpy().astype(np.float64), 5).tobytes())
            h.update(repr(round(layer.scales[name], 6)).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- the model

@dataclass
class PackedPairs:
    """Likelihood rows that hold one prompt and several candidate titles (:meth:`XCrossModel.pack`).

    ``attention_mask`` ``[R, 1, L, L]`` (True: attend) lets a title's tokens see the prompt and their own
    title only, ``position_ids`` place every title right after the prompt, so each title is scored as in
    its own (prompt, title) row. ``predictor[k]`` (a flat index into the ``R x L`` positions) is the
    position whose output predicts token ``target[k]``, which belongs to candidate slot ``slot[k]``;
    ``counts`` holds each slot's title length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    predictor: torch.Tensor
    target: torch.Tensor
    slot: torch.Tensor
    counts: torch.Tensor


class XCrossModel(nn.Module):
    """X-Cross over the adapters ``adapters`` of an :class:`XkernModel` (see the module docstring).

    Args:
        model: the xkern model holding the (frozen) adapters.
        adapters: the n adapter names, one stream each, in stream order.
        beta, gamma: integrator weights of the direct and difference terms (python floats).
        pooling: ``"auto"`` (first token for encoders, last non-pad token for decoders), ``"first"``,
            ``"last"``, ``"mean"`` (all tokens) or ``"candidate"`` (mean over the candidate part of the
            pair only: on real data the [CLS] and mean features of one user's candidates are nearly
            the same vector, the history dominating them; see docs/xcross.md).
        bias: give every integrator a trainable bias (zero-initialized).
        head_dim: width of the head's hidden layer (default: the model's hidden size).
        scoring: ``"head"`` (pool the mixed final hidden state, score it with a trained head; any base)
            or ``"likelihood"`` (decoders: the candidate title's log-likelihood after the next-item
            prompt under the base's frozen LM head applied to the mixed final hidden states, so the
            source LoRAs' own next-item skill is the starting point; nothing but the integrators and
            ``w`` is trained).
        integrator_norm: ``"none"`` (the paper's ``z = W_concat [h_1; ...; h_n]``) or ``"rms"``
            (``z = W_concat [h_1; ...; h_n] / rms``, the root mean square of the token's n streams):
            ``z`` then no longer scales with the hidden states. Decoders such as SmolLM2 carry a few
            "massive activation" tokens (hidden RMS ~1000 against ~5 elsewhere); without the
            normalization, one optimizer step on ``W_concat`` multiplies those tokens' states layer
            after layer and training diverges (docs/xcross.md). The mixing itself is unchanged.
        likelihood_reduce: ``scoring="likelihood"``: a candidate's score is the ``"sum"`` of its title
            tokens' log-probabilities (``LikelihoodScorer``'s score) or their ``"mean"`` (no advantage
            to short titles; the cross-entropy over candidates then starts near chance, not tens of nats
            above it, see docs/xcross.md).
        tokenizer, titles, domain, max_history, max_tokens: how :meth:`score` turns item indices into
            prompts (see :class:`PairEncoder`); set or change them with :meth:`set_domain`.
    """

    def __init__(self, model: XkernModel, adapters: Sequence[str], beta: float = 1.0, gamma: float = 1.0,
                 pooling: str = "auto", bias: bool = False, *, head_dim: int | None = None,
                 scoring: str = "head", integrator_norm: str = "none", likelihood_reduce: str = "sum",
                 tokenizer: Any = None,
                 titles: Sequence[str] | None = None, domain: str | None = None, max_history: int = MAX_HISTORY,
                 max_tokens: int = 128) -> None:
        super().__init__()
        if not isinstance(model, XkernModel):
            raise InputTypeError(f"model must be an XkernModel (xkern.load_model), got {type(model).__name__}")
        adapters = [adapters] if isinstance(adapters, str) else list(adapters)
        if not adapters:
            raise InputError("X-Cross needs at least one adapter")
        if len(set(adapters)) != len(adapters):
            raise InputError(f"adapter names must be distinct, got {adapters}")
        missing = [a for a in adapters if a != BASE and a not in model.list_adapters()]
        if missing:
            raise InputKeyError(f"adapter(s) {missing} are not loaded in the model (loaded: {model.list_adapters()})")
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        for name, v in (("beta", beta), ("gamma", gamma)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputTypeError(f"{name} must be a python float, got {type(v).__name__}")
        self.__dict__["xkern_model"] = model  # not a submodule: its parameters are not X-Cross's
        self.adapters = adapters
        self.beta, self.gamma = float(beta), float(gamma)
        self.decoder = is_decoder_model(model.model)
        self.pooling_mode = pooling if pooling != "auto" else ("last" if self.decoder else "first")
        self.pooling = pooling
        self.__dict__["base"] = model.model.base_model  # frozen, not a submodule
        cfg = model.config
        self.blocks = list(find_blocks(self.base, getattr(cfg, "num_hidden_layers", None)))
        self.hidden_size = int(cfg.hidden_size)
        n, d, n_layers = len(adapters), self.hidden_size, len(self.blocks)
        p = 2 * n * (n - 1)
        self.w_concat = nn.ParameterList([nn.Parameter(torch.zeros(p, n * d)) for _ in range(n_layers)]) \
            if n > 1 else nn.ParameterList()
        self.integrator_bias = nn.ParameterList([nn.Parameter(torch.zeros(p)) for _ in range(n_layers)]) \
            if (bias and n > 1) else nn.ParameterList()
        self.has_bias = bool(bias)
        if integrator_norm not in INTEGRATOR_NORMS:
            raise InputError(f"integrator_norm must be one of {INTEGRATOR_NORMS}, got {integrator_norm!r}")
        self.integrator_norm = integrator_norm
        if likelihood_reduce not in ("sum", "mean"):
            raise InputError(f"likelihood_reduce must be 'sum' or 'mean', got {likelihood_reduce!r}")
        self.likelihood_reduce = likelihood_reduce
        self.w = nn.Parameter(torch.full((n,), 1.0 / n))
        if scoring not in ("head", "likelihood"):
            raise InputError(f"scoring must be 'head' or 'likelihood', got {scoring!r}")
        self.scoring = scoring
        if scoring == "likelihood":
            lm_head = model.model.get_output_embeddings() if hasattr(model.model, "get_output_embeddings") else None
            if not self.decoder or lm_head is None:
                raise InputError("scoring='likelihood' needs a decoder with an LM head; encoders use scoring='head'")
            self.__dict__["lm_head"] = lm_head  # frozen, the base's own
            self.head = nn.Module()  # no trained head
            self.head_dim = 0
        else:
            self.head = ScoringHead(d, head_dim)
            self.head_dim = head_dim or d
        self.to(model.device)
        self._use_cache = "use_cache" in inspect.signature(self.base.forward).parameters
        self.encoder: PairEncoder | None = None
        self._enc_args = {"max_history": max_history, "max_tokens": max_tokens}
        self.tokenizer = tokenizer
        if tokenizer is not None and titles is not None:
            self.set_domain(titles, domain, tokenizer=tokenizer)

    # ---- bookkeeping -------------------------------------------------------------------------------------

    @property
    def model(self) -> XkernModel:
        return self.__dict__["xkern_model"]

    @property
    def n_streams(self) -> int:
        return len(self.adapters)

    @property
    def device(self) -> torch.device:
        return self.w.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Integrators (and their biases), ``w`` and the head: the only parameters X-Cross trains."""
        return [*self.w_concat, *self.integrator_bias, self.w, *self.head.parameters()]

    def num_trainable(self) -> dict[str, int]:
        counts = {"integrators": sum(p.numel() for p in (*self.w_concat, *self.integrator_bias)),
                  "w": self.w.numel(), "head": sum(p.numel() for p in self.head.parameters())}
        counts["total"] = sum(counts.values())
        return counts

    def set_domain(self, titles: Sequence[str], domain: str | None = None, *, tokenizer: Any = None,
                   max_history: int | None = None, max_tokens: int | None = None) -> XCrossModel:
        """Which item titles (and domain name) :meth:`score` writes into the prompts."""
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if self.tokenizer is None:
            raise InputError("no tokenizer: pass tokenizer= to XCrossModel or set_domain")
        if max_history is not None:
            self._enc_args["max_history"] = max_history
        if max_tokens is not None:
            self._enc_args["max_tokens"] = max_tokens
        enc_cls = CompletionPairEncoder if self.scoring == "likelihood" else PairEncoder
        self.encoder = enc_cls(self.tokenizer, titles, domain, **self._enc_args)
        return self

    def encode(self, pairs: Sequence[tuple[Sequence[int], int]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor | None]:
        """``(input_ids, attention_mask, labels)`` of (history, candidate) pairs, right-padded. The third is
        ``scoring="likelihood"``'s labels (the title tokens, :data:`IGNORE` elsewhere), ``pooling="candidate"``'s
        candidate mask (1 on the candidate part of each pair), or None."""
        if self.encoder is None:
            raise InputError("set_domain(titles, domain, tokenizer=...) first: scoring needs item titles")
        if self.scoring == "likelihood":
            rows = [self.encoder.pair(h, int(c)) for h, c in pairs]
            ids, mask = pad_batch([r["input_ids"] for r in rows], self.encoder.pad_id)
            return ids, mask, pad_rows([r["labels"] for r in rows], IGNORE)
        rows = [self.encoder.pair_ids(h, int(c)) for h, c in pairs]
        ids, mask = pad_batch(rows, self.encoder.pad_id)
        if self.pooling_mode != "candidate":
            return ids, mask, None
        span = torch.zeros_like(mask)
        tail = len(self.encoder.tail_ids)
        for i, ((_, c), row) in enumerate(zip(pairs, rows, strict=True)):
            end = len(row) - tail
            span[i, end - len(self.encoder.candidate_ids(int(c))):end] = 1
        return ids, mask, span

    def pack(self, groups: Sequence[tuple[Sequence[int] | None, Sequence[int]]]) -> PackedPairs:
        """One row per ``(history, candidates)`` group (``history=None``: the prompt of an empty history):
        the prompt once, then every candidate's title. Scores from it equal those of one
        (prompt, title) row per candidate, for the prompt's tokens once per group instead of once per
        candidate, and they are differentiable (training; inference reuses a KV cache instead)."""
        enc = self.encoder
        if self.scoring != "likelihood" or not isinstance(enc, CompletionPairEncoder):
            raise InputError("pack() needs scoring='likelihood' and set_domain(...) first")
        rows, positions, segments, predictor, target, slot, counts = [], [], [], [], [], [], []
        for h, cands in groups:
            prompt = enc.prompt_ids(h if h is not None else [])
            ids, pos, seg = list(prompt), list(range(len(prompt))), [0] * len(prompt)
            for j, c in enumerate(cands):
                title = enc.prompts.title(enc.titles[int(c)] or "")  # an empty one scores 0, as in its own row
                for i, tok in enumerate(title):  # the prompt's last position predicts every title's first token
                    predictor.append((len(rows), len(prompt) - 1 if i == 0 else len(ids) + i - 1))
                    target.append(tok)
                    slot.append(len(counts))
                counts.append(len(title))
                ids += title
                pos += range(len(prompt), len(prompt) + len(title))
                seg += [j + 1] * len(title)
            rows.append(ids)
            positions.append(pos)
            segments.append(seg)
        width = max(len(r) for r in rows)
        pad = [width - len(r) for r in rows]
        ids_t = torch.tensor([r + [enc.pad_id] * k for r, k in zip(rows, pad, strict=True)])
        pos_t = torch.tensor([p + [0] * k for p, k in zip(positions, pad, strict=True)])
        seg_t = torch.tensor([g + [-1] * k for g, k in zip(segments, pad, strict=True)])
        q, k = seg_t[:, :, None], seg_t[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal & (k >= 0) & ((k == 0) | (k == q))  # a title sees the prompt and itself, not the others
        mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (never to anything real)
        flat = torch.tensor([r * width + t for r, t in predictor])
        dev = self.device
        return PackedPairs(ids_t.to(dev), mask[:, None].to(dev), pos_t.to(dev), flat.to(dev),
                           torch.tensor(target, device=dev), torch.tensor(slot, device=dev),
                           torch.tensor(counts, device=dev))

    # ---- forward -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _integrators(self, n: int) -> Iterator[None]:
        if n < 2:
            yield
            return
        handles = []
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_hook(self._make_hook(i, n)))
        try:
            yield
        finally:
            for hd in handles:
                hd.remove()

    def _make_hook(self, layer: int, n: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            rows, *rest = h.shape
            hv = h.reshape(n, rows // n, *rest)
            bias = self.integrator_bias[layer].to(h.dtype) if self.has_bias else None
            w = self.w_concat[layer].to(h.dtype)
            if self.integrator_norm == "rms":
                # h~ is linear in h for a fixed z, and z is linear in h: integrating h / s and scaling back by s
                # mixes h itself with z computed from h / s (s: the token's RMS over its n streams)
                scale = hv.float().pow(2).mean(dim=(0, -1), keepdim=True).add(1e-6).sqrt().to(h.dtype)
                mixed = (xcross_integrate(hv / scale, w, self.beta, self.gamma, bias) * scale).reshape(h.shape)
            else:
                mixed = xcross_integrate(hv, w, self.beta, self.gamma, bias).reshape(h.shape)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    def stream_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Each stream's final hidden states ``[n, N, T, d]`` (integrated after every block). The mask is a
        ``[N, T]`` padding mask or a ready ``[N, 1, T, T]`` one (with ``position_ids``: packed rows)."""
        n, rows = self.n_streams, input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        missing = [a for a in self.adapters if a != BASE and a not in self.model.list_adapters()]
        if missing:
            raise InputKeyError(f"adapter(s) {missing} were removed from the model")
        ids = input_ids.repeat(n, 1)  # stream-major: stream m holds rows m*N .. (m+1)*N - 1
        mask = attention_mask.repeat(n, *([1] * (attention_mask.dim() - 1)))
        names = [a for a in self.adapters for _ in range(rows)]
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.repeat(n, 1)
        if self._use_cache:
            kwargs["use_cache"] = False
        with routing_scope(self.model.routing(names, len(names))), self._integrators(n):
            out = self.base(**kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return hidden.reshape(n, rows, *hidden.shape[1:])

    def _title_scores(self, states: torch.Tensor, tokens: torch.Tensor, slot: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
        """Per slot, the summed (or mean) log-probability of its title tokens ``tokens`` predicted from the
        mixed hidden ``states`` ``[K, d]``; ``slot[k]`` says whose token ``k`` is, ``counts`` each slot's length."""
        logits = self.lm_head(states).float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        total = torch.zeros(len(counts), device=self.device).index_add(0, slot, logp)
        if self.likelihood_reduce == "mean":
            total = total / counts.clamp_min(1).to(total.dtype)
        return total

    def _packed_scores(self, packed: PackedPairs) -> torch.Tensor:
        hidden = self.stream_hidden(packed.input_ids, packed.attention_mask, packed.position_ids)
        mixed = (self.w.to(hidden.dtype)[:, None, None, None] * hidden).sum(0)  # [R, L, d]
        states = mixed.reshape(-1, mixed.shape[-1])[packed.predictor]
        return self._title_scores(states, packed.target, packed.slot, packed.counts)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, packed: PackedPairs | None = None) -> torch.Tensor:
        """Scores ``[N]`` of N tokenized (history, candidate) pairs (``labels``: the third item of :meth:`encode`),
        or, given ``packed`` (:meth:`pack`; ``input_ids`` and ``attention_mask`` are its own), one score per
        candidate slot of the packed rows."""
        if packed is not None:
            return self._packed_scores(packed)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.stream_hidden(input_ids, attention_mask)
        n, rows = hidden.shape[:2]
        if self.scoring == "likelihood":
            if labels is None:
                raise InputError("scoring='likelihood' needs labels (XCrossModel.encode gives them)")
            mixed = (self.w.to(hidden.dtype)[:, None, None, None] * hidden).sum(0)  # [N, T, d]
            target = labels.to(self.device)[:, 1:]
            picked = target != IGNORE  # the hidden state at t predicts token t + 1
            row = torch.arange(rows, device=self.device)[:, None].expand_as(target)[picked]
            return self._title_scores(mixed[:, :-1][picked], target[picked], row, picked.sum(1))
        pool_mask, mode = attention_mask, self.pooling_mode
        if mode == "candidate":
            if labels is None:
                raise InputError("pooling='candidate' needs the candidate mask (the third item of XCrossModel.encode)")
            pool_mask, mode = labels.to(self.device) * attention_mask, "mean"
        pooled = pool_hidden(hidden.reshape(n * rows, *hidden.shape[2:]), pool_mask.repeat(n, 1),
                             mode).reshape(n, rows, -1).float()
        mixed = (self.w.float()[:, None, None] * pooled).sum(0)  # pooling is linear: pool(sum w h) = sum w pool(h)
        return self.head(mixed)

    def score(self, histories: Sequence[Sequence[int]], candidates: np.ndarray | Sequence[Sequence[int]],
              batch_size: int = 64, prefix_sharing: bool = True, calibrate: bool = False) -> torch.Tensor:
        """Scores ``[U, C]`` of every (history, candidate) pair, ``batch_size`` pairs (x n streams) per forward.

        ``scoring="likelihood"`` with ``prefix_sharing``: each user's prompt runs once through the n
        streams and its KV cache serves all the user's candidates (the same scores as one forward per
        pair, which ``prefix_sharing=False`` runs, for a fraction of the cost). ``calibrate``: minus
        :meth:`title_prior` (likelihood scoring only).
        """
        if self.encoder is None:
            raise InputError("set_domain(titles, domain, tokenizer=...) first: score needs item titles")
        cands = np.asarray(candidates)
        if cands.ndim != 2 or cands.shape[0] != len(histories):
            raise InputError(f"candidates must be [U={len(histories)}, C], got shape {cands.shape}")
        if calibrate:
            if self.scoring != "likelihood":
                raise InputError("calibrate needs scoring='likelihood' (a classification score has no title prior)")
            return self.score(histories, cands, batch_size, prefix_sharing) - self.title_prior(cands, batch_size)
        if self.scoring == "likelihood" and prefix_sharing:
            return self._score_shared_prefix(histories, cands, batch_size)
        rows = [(h, int(c)) for h, cs in zip(histories, cands, strict=True) for c in cs]
        out = torch.empty(len(rows), dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(rows), batch_size):
                    ids, mask, labels = self.encode(rows[s:s + batch_size])
                    out[s:s + len(ids)] = self(ids, mask, labels).float().cpu()
        finally:
            self.train(was_training)
        return out.reshape(cands.shape)

    def causal_lm(self) -> XCrossCausalLM:
        """This likelihood X-Cross as a causal LM (``input_ids -> logits`` of the w-mixed streams, with a
        KV cache), the interface ``xkern.serve``'s prefix scoring runs on."""
        if self.scoring != "likelihood":
            raise InputError("causal_lm() needs scoring='likelihood'")
        return XCrossCausalLM(self)

    def title_prior(self, candidates: np.ndarray | Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
        """``[U, C]``: each candidate title's score (same reduction) after the prompt of an empty
        history, the user-independent part of a likelihood score; ``score - title_prior`` is the
        domain-conditional PMI (see :class:`xkern.serve.PrefixLikelihoodScorer`)."""
        if self.scoring != "likelihood":
            raise InputError("title_prior needs scoring='likelihood'")
        if self.encoder is None:
            raise InputError("set_domain(titles, domain, tokenizer=...) first: title_prior needs item titles")
        return self._score_shared_prefix(None, np.asarray(candidates), batch_size)

    def _score_shared_prefix(self, histories: Sequence[Sequence[int]] | None, cands: np.ndarray,
                             batch_size: int) -> torch.Tensor:
        """Prefix-shared likelihood scores; ``histories=None``: the empty-history prior of each title."""
        enc = self.encoder
        assert isinstance(enc, CompletionPairEncoder)
        per_user = cands.shape[1]
        scorer = PrefixLikelihoodScorer(self.causal_lm(), enc.prompts, enc.titles,
                                        user_batch=max(8, batch_size // max(per_user, 1)), row_batch=batch_size)
        was_training = self.training
        self.eval()
        try:
            sums = torch.from_numpy(scorer(histories, cands) if histories is not None else scorer.prior(cands))
        finally:
            self.train(was_training)
        if self.likelihood_reduce == "mean":
            counts = torch.tensor([[len(enc.prompts.title(enc.titles[int(c)] or "")) for c in row] for row in cands],
                                  dtype=torch.float64)
            sums = sums / counts.clamp_min(1)
        return sums.float()

    def scorer(self, batch_size: int = 64):
        """A ``xkern.data`` Scorer (numpy out) over :meth:`score`."""
        return lambda histories, candidates: self.score(histories, candidates, batch_size).numpy()

    def train(self, mode: bool = True) -> XCrossModel:
        super().train(mode)
        self.model.train(mode)  # dropout of the base follows X-Cross's mode
        return self

    # ---- save / load -------------------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "adapters": list(self.adapters),
                "adapter_fingerprints": {a: adapter_fingerprint(self.model, a) for a in self.adapters if a != BASE},
                "beta": self.beta, "gamma": self.gamma, "pooling": self.pooling, "bias": self.has_bias,
                "head_dim": self.head_dim, "scoring": self.scoring, "integrator_norm": self.integrator_norm,
                "likelihood_reduce": self.likelihood_reduce,
                "hidden_size": self.hidden_size,
                "num_layers": len(self.blocks),
                "base_model": getattr(self.model.config, "_name_or_path", None) or None,
                "encoder": dict(self._enc_args)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"w_concat.{i}": p for i, p in enumerate(self.w_concat)}
        out.update({f"integrator_bias.{i}": p for i, p in enumerate(self.integrator_bias)})
        out["w"] = self.w
        # parameters, not state_dict(): under FSDP2 state_dict() hands out the shards, not the whole tensors
        out.update({f"head.{k}": v for k, v in self.head.named_parameters()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trainable parameters (safetensors) and the config with the adapters they expect."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(self.state_tensors(), str(tmp), metadata={"format": FORMAT})
        atomic_write_text(path / CONFIG_NAME, json.dumps(self.config_dict(), indent=2) + "\n")
        return path

    def load_state(self, path: str | os.PathLike, strict_fingerprint: bool = True) -> XCrossModel:
        """Load saved parameters into this model; refused when they were trained for other adapters."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg = json.loads((path / CONFIG_NAME).read_text())
        if cfg.get("format") != FORMAT:
            raise InputError(f"{path}: not an X-Cross checkpoint (format {cfg.get('format')!r})")
        if list(cfg["adapters"]) != list(self.adapters):
            raise InputError(f"{path} was trained for adapters {cfg['adapters']}, this model runs {self.adapters}; "
                             f"refusing to load")
        if strict_fingerprint:
            for a, fp in cfg.get("adapter_fingerprints", {}).items():
                now = adapter_fingerprint(self.model, a)
                if now != fp:
                    raise InputError(f"{path}: adapter {a!r} has other weights than the one it was trained with "
                                     f"(fingerprint {now} != {fp}); refusing to load (strict_fingerprint=False "
                                     f"to force)")
        defaults = {"scoring": "head", "integrator_norm": "none", "likelihood_reduce": "sum"}  # older checkpoints
        for key in ("hidden_size", "num_layers", "head_dim", "scoring", "integrator_norm", "likelihood_reduce"):
            mine = {"hidden_size": self.hidden_size, "num_layers": len(self.blocks), "head_dim": self.head_dim,
                    "scoring": self.scoring, "integrator_norm": self.integrator_norm,
                    "likelihood_reduce": self.likelihood_reduce}[key]
            if cfg.get(key, defaults.get(key)) != mine:
                raise InputError(f"{path}: {key}={cfg[key]} but this model has {mine}")
        if bool(cfg["bias"]) != self.has_bias:
            raise InputError(f"{path}: bias={cfg['bias']} but this model has bias={self.has_bias}")
        tensors = load_file(str(path / WEIGHTS_NAME))
        expected = set(self.state_tensors())
        if set(tensors) != expected:
            raise InputError(f"{path}: tensors {sorted(set(tensors) ^ expected)} missing or unexpected")
        with torch.no_grad():
            for i, p in enumerate(self.w_concat):
                p.copy_(tensors[f"w_concat.{i}"])
            for i, p in enumerate(self.integrator_bias):
                p.copy_(tensors[f"integrator_bias.{i}"])
            self.w.copy_(tensors["w"])
            self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        return self

    @classmethod
    def load(cls, path: str | os.PathLike, model: XkernModel, adapters: Sequence[str] | None = None,
             strict_fingerprint: bool = True, **kwargs: Any) -> XCrossModel:
        """Rebuild a saved X-Cross model over ``model``; ``adapters`` (if given) must be the saved ones."""
        cfg = json.loads((Path(path) / CONFIG_NAME).read_text())
        if adapters is not None and list(adapters) != list(cfg["adapters"]):
            raise InputError(f"{path} was trained for adapters {cfg['adapters']}, got {list(adapters)}; "
                             f"refusing to load")
        enc = dict(cfg.get("encoder", {}))
        enc.update({k: kwargs.pop(k) for k in ("max_history", "max_tokens") if k in kwargs})
        xc = cls(model, cfg["adapters"], beta=cfg["beta"], gamma=cfg["gamma"], pooling=cfg["pooling"],
                 bias=cfg["bias"], head_dim=cfg["head_dim"] or None, scoring=cfg.get("scoring", "head"),
                 integrator_norm=cfg.get("integrator_norm", "none"),
                 likelihood_reduce=cfg.get("likelihood_reduce", "sum"), **enc,
                 **kwargs)
        return xc.load_state(path, strict_fingerprint=strict_fingerprint)


class XCrossCausalLM:
    """A likelihood :class:`XCrossModel` seen as a causal LM, for ``xkern.serve.scoring.prefill`` and
    ``score_continuations``: the n streams of B rows run stacked (``[n*B]``, stream-major) with the
    integrators, and the logits are the frozen LM head on ``sum_m w_m h~_m``.

    The KV cache it hands out is the base's own, stream-major (stream s of row b at ``s*B + b``), so no
    call converts it; :meth:`select_cache` gathers a row's entries of every stream (what the scorers call
    instead of ``xkern.serve.scoring.select_cache``), and a cache passed back in is extended in place.
    ``adapter_names`` is ignored: the streams' adapters are X-Cross's.
    """

    def __init__(self, xc: XCrossModel) -> None:
        self.xc = xc
        self.config = xc.model.config

    @property
    def device(self) -> torch.device:
        return self.xc.device

    def eval(self) -> XCrossCausalLM:
        self.xc.eval()
        return self

    def select_cache(self, cache: Any, index: torch.Tensor) -> Any:
        """Rows ``index`` of a stream-major cache of B rows: entries ``s*B + index`` for every stream s."""
        n = self.xc.n_streams
        b = cache.layers[0].keys.shape[0] // n
        rows = (index[None, :] + torch.arange(n, device=index.device)[:, None] * b).reshape(-1)
        return select_cache(cache, rows)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                 logits_to_keep: int = 0, adapter_names: Any = None) -> Any:
        from types import SimpleNamespace

        xc = self.xc
        n, rows = xc.n_streams, input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Any] = {"input_ids": input_ids.repeat(n, 1), "attention_mask": attention_mask.repeat(n, 1),
                                  "use_cache": use_cache}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.repeat(n, 1)
        if cache is not None:
            kwargs[cache_keyword(xc.base)] = cache
        names = [a for a in xc.adapters for _ in range(rows)]
        with routing_scope(xc.model.routing(names, len(names))), xc._integrators(n):
            out = xc.base(**kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        mixed = (xc.w.to(hidden.dtype)[:, None, None, None] * hidden.reshape(n, rows, *hidden.shape[1:])).sum(0)
        return SimpleNamespace(logits=xc.lm_head(mixed), cache=output_cache(out) if use_cache else None)
