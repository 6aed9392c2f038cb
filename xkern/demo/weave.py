"""WeaveRec rows of the quickstart (``xkern demo``), on the shared tiny NF4 Llama of the run.

- ``weave-hybrid-<src>``: a LoRA trained on a shuffled mix of the target's training users (at the
  row's fraction) and an equal number of ``src`` training users (seeded sample);
- ``weave-merge``: the uniform task-arithmetic merge of the target LoRA (``lora-target``'s adapter,
  shared through :func:`xkern.demo.lm.target_lora`) and the hybrid LoRAs, served exactly as
  one adapter of rank ``sum r_i``;
- ``weave-target`` (only with ``include_target=True``): the target-only LoRA itself, the same
  adapter (and the same numbers) as the ``lora-target`` row.

All rows score with :class:`xkern.serve.PrefixLikelihoodScorer` (prompt KV computed once per user).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xkern.data.domain import DomainData
from xkern.weave.data import subsample_users


def _tag(ctx: Any) -> str:
    return f"{ctx.fraction:g}".replace(".", "p")


def _scorer(ctx: Any, adapter: str) -> Any:
    from xkern.demo.lm import lm_demo

    return lm_demo(ctx).scorer(adapter, ctx.target)


def _source(ctx: Any, name: str) -> DomainData:
    return next(d for d in ctx.sources if d.name == name)


def hybrid_lora(ctx: Any, source: str) -> str:
    """The hybrid adapter of ``source``: target users + as many ``source`` users, trained once per run."""
    from xkern.demo.lm import lm_demo

    lm = lm_demo(ctx)
    n_target = sum(1 for s in ctx.target.train.values() if len(s) >= 2)
    src = subsample_users(_source(ctx, source), n_target, ctx.seed)
    return lm.lora(f"weave-hyb-{source}-{_tag(ctx)}", [ctx.target, src], max_per_user=lm.cfg.hybrid_max_per_user)


def weave_merge(ctx: Any, source_names: Sequence[str]) -> str:
    """The uniform exact merge of the target LoRA and the hybrids, added to the shared model once."""
    from xkern.demo.lm import lm_demo, target_lora
    from xkern.weave.merging import merge_loaded

    lm = lm_demo(ctx)
    name = f"weave-merge-{_tag(ctx)}"
    if name not in lm.model.list_adapters():
        names = [target_lora(ctx), *(hybrid_lora(ctx, s) for s in source_names)]
        merge_loaded(lm.model, name, names)
    return name


def weave_methods(source_names: Sequence[str], include_target: bool = False) -> list[Any]:
    """Quickstart rows for WeaveRec (see the module docstring)."""
    from xkern.demo.lm import target_lora
    from xkern.demo.methods import Method

    methods = []
    if include_target:
        methods.append(Method("weave-target", lambda ctx: _scorer(ctx, target_lora(ctx)),
                              "WeaveRec's target-only LoRA (same adapter as lora-target)"))
    for src in source_names:
        methods.append(Method(f"weave-hybrid-{src}", lambda ctx, s=src: _scorer(ctx, hybrid_lora(ctx, s)),
                              f"LoRA on a shuffled mix of target and as many {src} users"))
    names = list(source_names)
    methods.append(Method("weave-merge", lambda ctx: _scorer(ctx, weave_merge(ctx, names)),
                          "WeaveRec: uniform merge of the target LoRA and the hybrid LoRAs (exact, rank sum r_i)"))
    return methods
