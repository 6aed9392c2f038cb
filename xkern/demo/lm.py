"""LoRA rows of the quickstart: a tiny Llama on NF4 with LoRA adapters, on the embedded data.

The quickstart has no pretrained language model (nothing is downloaded), so the base is a small
random-initialized Llama over a word-level tokenizer, quantized to NF4 by xkern, and frozen. Each
LoRA learns next-item prediction (the next title after the history prompt) on top of it; candidates
are ranked by the log-likelihood of their title. What the rows show is the runtime working end to
end (NF4 base, several adapters, training, batched scoring) and how much each data source gives.

:class:`LMDemo` is shared by all methods of one demo run: it builds the base once and caches every
trained adapter, so X-Cross and WeaveRec rows can reuse the per-domain LoRAs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from xkern.data.domain import DomainData
from xkern.data.encoding import PromptEncoder
from xkern.data.examples import causal_lm_examples
from xkern.serve import PrefixLikelihoodScorer
from xkern.train.tiny import TinyLMConfig, build_tiny_lm


@dataclass
class LMDemoConfig:
    """The quickstart's tiny base (``base``) and how its LoRA rows train and score."""

    base: TinyLMConfig = field(default_factory=TinyLMConfig)
    r: int = 8
    lora_alpha: float = 16.0
    epochs: float = 3.0
    lr: float = 1e-2
    batch_size: int = 32
    max_per_user: int = 2  # training positions per user sequence
    hybrid_max_per_user: int | None = None  # WeaveRec hybrids (target + as many source users); None: max_per_user
    eval_batch_size: int = 240

    @property
    def max_history(self) -> int:
        return self.base.max_history

    @property
    def seed(self) -> int:
        return self.base.seed


class LMDemo:
    """The shared tiny-LM state of one demo run: tokenizer, NF4 base, trained adapters."""

    def __init__(self, domains: dict[str, DomainData], cfg: LMDemoConfig | None = None,
                 progress: bool = False) -> None:
        self.cfg = cfg or LMDemoConfig()
        self.progress = progress
        self.domains = domains
        tiny = build_tiny_lm(domains, self.cfg.base)
        self.tokenizer, self.model, self.pretrain_loss = tiny.tokenizer, tiny.model, tiny.pretrain_loss
        self.trained: dict[str, dict[str, Any]] = {}

    def encoder(self, domain: str) -> PromptEncoder:
        return PromptEncoder(self.tokenizer, domain, max_history=self.cfg.max_history)

    def lora(self, name: str, data: Sequence[DomainData], prompt_domain: str | None = None,
             max_per_user: int | None = None) -> str:
        """Train (once) adapter ``name`` on the next-item examples of ``data``; returns its name."""
        from xkern.train import train_lora

        if name in self.trained:
            return name
        c = self.cfg
        examples = []
        for d in data:
            examples += causal_lm_examples(self.encoder(prompt_domain or d.name), d, "train",
                                           max_per_user or c.max_per_user)
        self.model.add_adapter(name, r=c.r, lora_alpha=c.lora_alpha, seed=c.seed)
        res = train_lora(self.model, name, examples, lr=c.lr, batch_size=c.batch_size, epochs=c.epochs,
                         seed=c.seed, progress=self.progress)
        self.trained[name] = {"examples": len(examples), "steps": res.steps, "final_loss": res.train_loss[-1],
                              "seconds": round(res.seconds, 2)}
        return name

    def scorer(self, adapter: str, target: DomainData) -> PrefixLikelihoodScorer:
        """Candidates ranked by title likelihood, the prompt's KV computed once per user (all LM rows score so)."""
        return PrefixLikelihoodScorer(self.model, self.encoder(target.name), target.titles, adapter, user_batch=32,
                                      row_batch=self.cfg.eval_batch_size)

    def describe(self) -> dict[str, Any]:
        return {"config": asdict(self.cfg), "vocab": len(self.tokenizer), "adapters": self.trained,
                "pretrain_loss": {"first": self.pretrain_loss[:1], "last": self.pretrain_loss[-1:]}}


def lm_demo(ctx: Any) -> LMDemo:
    """The run's shared :class:`LMDemo` (built on first use, kept in ``ctx.options``)."""
    if "lm" not in ctx.options:
        domains = {d.name: d for d in [*ctx.sources, ctx.target]}
        ctx.options["lm"] = LMDemo(domains, ctx.options.get("lm_config"), ctx.options.get("progress", False))
    return ctx.options["lm"]


def source_lora(ctx: Any, source: str) -> str:
    """The adapter trained on source domain ``source`` (shared by every method that needs it).

    With two processes (see :func:`xkern.demo.core.run_demo`) the first source's adapter is trained
    by the worker and the others by the main process, which hands them over as PEFT files in
    ``ctx.options["handoff"]``: the worker, which runs X-Cross over all of them, loads them there.
    """
    lm = lm_demo(ctx)
    name = f"src-{source}"
    handoff = ctx.options.get("handoff")
    if name in lm.trained or name in lm.model.list_adapters():
        return name
    if handoff is not None and ctx.options.get("process") == "worker" and source != ctx.sources[0].name:
        _receive(lm, name, handoff)
        return name
    data = next(d for d in ctx.sources if d.name == source)
    lm.lora(name, [data])
    if handoff is not None and ctx.options.get("process") == "main" and source != ctx.sources[0].name:
        _publish(lm, name, handoff)
    return name


def _publish(lm: LMDemo, name: str, folder: Any) -> None:
    from pathlib import Path

    lm.model.save_adapter(name, Path(folder) / name)
    (Path(folder) / f"{name}.done").write_text("1")  # written after the adapter files: a complete hand-over


def _receive(lm: LMDemo, name: str, folder: Any, timeout: float = 3600.0) -> None:
    import time
    from pathlib import Path

    marker, start = Path(folder) / f"{name}.done", time.monotonic()
    while not marker.exists():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the main process did not hand over adapter {name!r} in {timeout:.0f} s")
        time.sleep(0.2)
    lm.model.load_adapter(Path(folder) / name, name)
    lm.trained[name] = {"trained_by": "the main process (handed over)"}


def target_lora(ctx: Any) -> str:
    """The adapter trained on the target's training users at this run's fraction."""
    lm = lm_demo(ctx)
    return lm.lora(f"tgt-{ctx.fraction:g}".replace(".", "p"), [ctx.target])


def lora_methods(source_names: Sequence[str]) -> list[Any]:
    """Quickstart rows: a LoRA per source domain (zero-shot on the target) and a target-only LoRA."""
    from xkern.demo.methods import Method

    methods = [Method("lora-target", lambda ctx: lm_demo(ctx).scorer(target_lora(ctx), ctx.target),
                      "LoRA on the target's training users (tiny NF4 Llama)")]
    for i, src in enumerate(source_names):  # the first source's LoRA trains in the worker, next to X-Cross
        methods.append(Method(f"lora-{src}", lambda ctx, s=src: lm_demo(ctx).scorer(source_lora(ctx, s), ctx.target),
                              f"LoRA trained on {src} only, scored on the target", uses_target_train=False,
                              group="sources" if i == 0 else "main"))
    return methods
