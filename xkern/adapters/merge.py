"""Merging LoRA adapters on their weight deltas, and folding an adapter into NF4 base weights.

Every method works on the per-module deltas ``dW_i = s_i * B_i @ A_i`` (float32), never on A and B
separately:

- ``linear``: task arithmetic, ``dW = sum_i w_i dW_i``. This is *not* PEFT's
  ``add_weighted_adapter(combination_type="linear")``, which mixes the A and the B matrices
  separately (``(sum_i c_i B_i)(sum_i c_i A_i)``, cross terms included).
- ``cat``: the same sum, named as PEFT names its exact method. Without ``rank`` both ``linear`` and
  ``cat`` return the exact merge as one adapter of rank ``sum_i r_i``: the A matrices concatenated
  along the rank, each B block scaled by ``w_i * s_i``, scale 1.
- ``svd``: the same sum, truncated to rank ``rank`` (default ``max r_i``, PEFT's default).
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the functions of the same names in
  ``peft.utils.merge_utils`` applied to the stacked per-module deltas (``density``,
  ``majority_sign_method`` as PEFT), then truncated by SVD to rank ``rank`` (default ``max r_i``).
  This is PEFT's ``<method>_svd`` combination (PEFT's non-SVD variants prune A and B separately).

Any method given ``rank=k`` returns the truncated SVD of the merged delta per module, with the
singular values on the B side (``B = U_k diag(S_k)``, ``A = V_k^T``, scale 1, PEFT's split), the
rank clipped to ``min(N, K)`` (and, for the sums, to ``sum_i r_i``, beyond which it is exact).

DARE's random masks come from a ``torch.Generator`` seeded with ``seed`` on the deltas' device,
drawn module by module in sorted module-name order and, within a module, adapter by adapter; this
is the stream ``torch.manual_seed(seed)`` followed by ``peft.utils.merge_utils.dare_*`` over the
modules in that order produces (a density of 1 prunes nothing and draws nothing, as in PEFT).

``weights=None`` means the uniform average: ``1/n`` for the summing methods (``linear``, ``cat``,
``svd``, ``dare_linear``, ``magnitude_prune``), ``1`` for the TIES methods (``ties``,
``dare_ties``), whose disjoint merge already divides by the number of agreeing adapters.

The result is a :class:`LoraAdapter` with float32 factors and a PEFT LoRA config that reproduces
the deltas exactly when PEFT loads it: ``lora_alpha == r`` (scale 1), with ``rank_pattern`` /
``alpha_pattern`` entries (escaped full module names) for modules whose rank differs from ``r``,
and ``target_modules`` the union of the modules' last name components.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from xkern.adapters.peft_format import AdapterError, LoraAdapter, LoraWeights, default_config
from xkern.nf4 import NF4Tensor, quantize_nf4

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SUMS = ("linear", "cat", "svd")  # the plain weighted sum: low rank, factorized without a dense SVD
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # need `density`
_TIES = ("ties", "dare_ties")  # sign election + disjoint merge
_SIGN_METHODS = ("total", "frequency")
_CONFIG_COPIED = ("task_type", "base_model_name_or_path", "revision")

__all__ = ["METHODS", "fold", "merge", "merge_deltas"]


# ---- validation ----------------------------------------------------------------------------------


def _check_inputs(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None,
    method: str,
    density: float | None,
    majority_sign_method: str,
    rank: int | None,
) -> tuple[list[str], list[float]]:
    """Refuse inconsistent inputs (naming the module); return the sorted module names and the weights."""
    if method not in METHODS:
        raise AdapterError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    adapters = list(adapters)
    if not adapters:
        raise AdapterError("nothing to merge: the list of adapters is empty")
    for i, a in enumerate(adapters):
        if not isinstance(a, LoraAdapter):
            raise AdapterError(f"adapter {i} is a {type(a).__name__}, not a LoraAdapter")
        if not a.modules:
            raise AdapterError(f"adapter {i} has no modules")
    names = sorted(adapters[0].modules)
    for i, a in enumerate(adapters[1:], start=1):
        missing = sorted(set(names) - set(a.modules))
        extra = sorted(set(a.modules) - set(names))
        if missing:
            raise AdapterError(f"module {missing[0]} is in adapter 0 but not in adapter {i} "
                               f"({len(missing)} module(s) missing); all adapters must target the same modules")
        if extra:
            raise AdapterError(f"module {extra[0]} is in adapter {i} but not in adapter 0 "
                               f"({len(extra)} extra module(s)); all adapters must target the same modules")
    for name in names:
        shapes = []
        for i, a in enumerate(adapters):
            w = a.modules[name]
            if w.A.dim() != 2 or w.B.dim() != 2 or w.A.shape[0] != w.B.shape[1]:
                raise AdapterError(f"module {name}: adapter {i} has A {tuple(w.A.shape)} and B {tuple(w.B.shape)}, "
                                   "which do not chain")
            shapes.append((int(w.B.shape[0]), int(w.A.shape[1])))
        if len(set(shapes)) != 1:
            raise AdapterError(f"module {name}: the adapters' deltas have different shapes {shapes}")
    fan = {bool(a.config.get("fan_in_fan_out", False)) for a in adapters}
    if len(fan) != 1:
        raise AdapterError("the adapters disagree on fan_in_fan_out; their deltas are not in the same layout")

    n = len(adapters)
    if weights is None:
        w = 1.0 if method in _TIES else 1.0 / n
        weight_list = [w] * n
    else:
        weight_list = [float(x) for x in weights]
        if len(weight_list) != n:
            raise AdapterError(f"got {len(weight_list)} weights for {n} adapters")
    if not all(math.isfinite(x) for x in weight_list):
        raise AdapterError(f"weights must be finite, got {weight_list}")

    if method in _PRUNING:
        if density is None:
            raise AdapterError(f"method {method!r} needs a density in (0, 1]")
        if not 0.0 < float(density) <= 1.0:
            raise AdapterError(f"density must be in (0, 1], got {density}")
    if method in _TIES and majority_sign_method not in _SIGN_METHODS:
        raise AdapterError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank <= 0):
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    return names, weight_list


# ---- the merge rules over stacked deltas (PEFT's merge_utils semantics) -------------------------


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries (PEFT's magnitude pruning)."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = 1
    return delta * keep.view(delta.shape)


def _drop_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale by ``1/density`` (DARE)."""
    if density >= 1.0:  # PEFT returns the tensor untouched and draws nothing
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return (delta * keep) / density


def _combine(stacked: torch.Tensor, weights: torch.Tensor, method: str, majority_sign_method: str) -> torch.Tensor:
    """Weighted sum, or TIES' sign election and disjoint mean, over dim 0 of ``stacked`` [n, N, K]."""
    w = weights.view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if method not in _TIES:
        return weighted.sum(dim=0)
    signs = stacked.sign()
    score = stacked.sum(dim=0) if majority_sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(score >= 0, 1, -1)
    agree = signs == elected
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _module_deltas(adapters: Sequence[LoraAdapter], name: str, device: torch.device) -> list[torch.Tensor]:
    return [a.modules[name].delta(torch.float32).to(device) for a in adapters]


def _merged_dense(
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    method: str,
    density: float | None,
    majority_sign_method: str,
    generator: torch.Generator,
) -> torch.Tensor:
    if method in ("ties", "magnitude_prune"):
        deltas = [_keep_largest(d, float(density)) for d in deltas]
    elif method in ("dare_linear", "dare_ties"):
        deltas = [_drop_random(d, float(density), generator) for d in deltas]
    return _combine(torch.stack(deltas, dim=0), weights, method, majority_sign_method)


def _device_of(adapters: Sequence[LoraAdapter]) -> torch.device:
    first = adapters[0].modules[sorted(adapters[0].modules)[0]]
    return first.A.device


def merge_deltas(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None,
    method: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The dense merged delta ``[N, K]`` (float32) of every module, before any factorization.

    Same arguments and semantics as :func:`merge` (``rank`` does not apply); ``merge`` factorizes
    exactly these tensors (or, for the summing methods, their exact low-rank form).
    """
    names, weight_list = _check_inputs(adapters, weights, method, density, majority_sign_method, None)
    device = _device_of(adapters)
    w = torch.tensor(weight_list, dtype=torch.float32, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return {
        name: _merged_dense(_module_deltas(adapters, name, device), w, method, density, majority_sign_method, generator)
        for name in names
    }


# ---- factorization -------------------------------------------------------------------------------


def _concat_factors(
    adapters: Sequence[LoraAdapter], name: str, weights: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-``sum r_i`` factors of ``sum_i w_i s_i B_i A_i``: ``B [N, R]`` (scaled blocks), ``A [R, K]``."""
    a_blocks, b_blocks = [], []
    for adapter, w in zip(adapters, weights, strict=True):
        lw = adapter.modules[name]
        a_blocks.append(lw.A.to(device, torch.float32))
        b_blocks.append(lw.B.to(device, torch.float32) * (w * lw.scale))
    return torch.cat(b_blocks, dim=1), torch.cat(a_blocks, dim=0)


def _truncate_low_rank(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``k`` factors of ``b @ a`` without forming it: QR of both sides, SVD of the small core.

    ``b @ a = Qb (Rb Ra^T) Qa^T``; with ``Rb Ra^T = U S V^T`` the SVD of the product is
    ``(Qb U) S (Qa V)^T``. Computed in float64 and returned as float32 ``(B = U_k S_k, A = V_k^T)``.
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(k, s.numel())
    new_b = (qb @ u[:, :k]) * s[:k]
    new_a = vh[:k] @ qa.T
    return new_b.float().contiguous(), new_a.float().contiguous()


def _truncate_dense(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``k`` factors of a dense delta (float32 SVD, as PEFT): ``B = U_k S_k``, ``A = V_k^T``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(k, s.numel())
    return (u[:, :k] * s[:k]).contiguous(), vh[:k].contiguous()


def _merged_config(adapters: Sequence[LoraAdapter], ranks: Mapping[str, int]) -> dict[str, Any]:
    """A PEFT LoRA config with scale 1 for every module: ``lora_alpha = r``, patterns where ranks differ."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda v: (counts[v], v))
    rank_pattern = {re.escape(name): rk for name, rk in sorted(ranks.items()) if rk != r}
    targets = sorted({name.rsplit(".", 1)[-1] for name in ranks})
    first = adapters[0].config
    extra = {key: first[key] for key in _CONFIG_COPIED if key in first}
    return default_config(
        r, r, targets,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        use_rslora=False,
        fan_in_fan_out=bool(first.get("fan_in_fan_out", False)),
        **extra,
    )


def merge(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None,
    method: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    rank: int | None = None,
    seed: int = 0,
) -> LoraAdapter:
    """Merge LoRA adapters on their weight deltas into one adapter (see the module docstring).

    Args:
        adapters: the adapters; all must target the same modules with the same delta shapes.
        weights: one weight per adapter; ``None`` for the uniform average.
        method: one of ``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``magnitude_prune``.
        density: fraction of entries kept, in ``(0, 1]``; required by the pruning methods.
        majority_sign_method: ``total`` or ``frequency`` (TIES sign election).
        rank: truncate every module to this rank by SVD (clipped to ``min(N, K)``). ``None``: exact
            rank ``sum r_i`` for ``linear`` / ``cat``, ``max r_i`` for the other methods.
        seed: seeds DARE's random masks.

    Returns:
        A new :class:`LoraAdapter` (float32 factors, scale 1, on the first adapter's device).

    Raises:
        AdapterError: inconsistent inputs, naming the module or argument.
    """
    names, weight_list = _check_inputs(adapters, weights, method, density, majority_sign_method, rank)
    adapters = list(adapters)
    device = _device_of(adapters)
    default_rank = max(a.modules[name].rank for a in adapters for name in names)
    k = default_rank if rank is None else int(rank)

    modules: dict[str, LoraWeights] = {}
    if method in _SUMS:
        for name in names:
            b, a = _concat_factors(adapters, name, weight_list, device)
            if rank is not None or method == "svd":
                b, a = _truncate_low_rank(b, a, k)
            modules[name] = LoraWeights(A=a.contiguous(), B=b.contiguous(), scale=1.0)
    else:
        dense = merge_deltas(adapters, weight_list, method, density=density,
                             majority_sign_method=majority_sign_method, seed=seed)
        for name in names:
            b, a = _truncate_dense(dense.pop(name), k)
            modules[name] = LoraWeights(A=a, B=b, scale=1.0)
    config = _merged_config(adapters, {name: w.rank for name, w in modules.items()})
    return LoraAdapter(config=config, modules=modules)


# ---- folding into NF4 base weights ---------------------------------------------------------------


def fold(base: Mapping[str, NF4Tensor], adapter: LoraAdapter, weight: float = 1.0) -> dict[str, NF4Tensor]:
    """Add ``weight * delta`` of every adapter module to its NF4 base weight and re-quantize.

    ``base`` maps module names (``model.layers.0.self_attn.q_proj``, or the same with ``.weight``)
    to NF4 weights ``[N, K]``. Each targeted weight is dequantized to float32, the float32 delta is
    added (transposed for ``fan_in_fan_out`` adapters, whose base weight is ``[K, N]``) and the sum
    is quantized again with the base's ``blocksize`` and ``double_quant``; the result keeps the base's
    dtype. Returns a new dict holding every entry of ``base``, the targeted ones replaced. The
    re-quantization error is that of NF4 itself (about half a code step of each block's absmax).
    """
    if not isinstance(adapter, LoraAdapter):
        raise AdapterError(f"expected a LoraAdapter, got {type(adapter).__name__}")
    weight = float(weight)
    if not math.isfinite(weight):
        raise AdapterError(f"weight must be finite, got {weight}")
    transpose = bool(adapter.config.get("fan_in_fan_out", False))
    keys = {}
    for name in sorted(adapter.modules):
        key = name if name in base else f"{name}.weight" if f"{name}.weight" in base else None
        if key is None:
            raise AdapterError(f"module {name} of the adapter has no base weight to fold into")
        if not isinstance(base[key], NF4Tensor):
            raise AdapterError(f"module {name}: base weight is a {type(base[key]).__name__}, not an NF4Tensor")
        keys[name] = key
    out = dict(base)
    for name, key in keys.items():
        q = base[key]
        delta = adapter.modules[name].delta(torch.float32).to(q.device)
        if transpose:
            delta = delta.T
        if tuple(delta.shape) != tuple(q.shape):
            raise AdapterError(f"module {name}: delta shape {tuple(delta.shape)} does not match the base weight "
                               f"{tuple(q.shape)}")
        folded = quantize_nf4(q.dequantize(torch.float32) + weight * delta, blocksize=q.blocksize,
                              double_quant=q.double_quant)
        out[key] = dataclasses.replace(folded, dtype=q.dtype)
    return out
