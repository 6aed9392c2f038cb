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
from dataclasses import asdict, dataclass
from typing import Any

import torch

from xkern.rec.data import DomainData
from xkern.rec.lm import LikelihoodScorer, PromptEncoder, causal_lm_examples
from xkern.rec.prompts import listwise_prompt, next_item_prompt, pointwise_prompt


@dataclass
class LMDemoConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    init_range: float = 0.2  # with the usual 0.02 a frozen random lm_head cannot produce confident logits
    r: int = 8
    lora_alpha: float = 16.0
    epochs: float = 3.0
    lr: float = 1e-2
    batch_size: int = 32
    max_per_user: int = 2  # training positions per user sequence
    max_history: int = 5
    eval_batch_size: int = 240
    pretrain_steps: int = 200  # base "pretraining" on catalog text (titles in random order, no user behaviour)
    pretrain_lr: float = 3e-3
    seed: int = 0


def _vocab_texts(domains: Sequence[DomainData], max_history: int) -> list[str]:
    titles = [t for d in domains for t in d.titles]
    some = titles[:30]
    texts = list(titles)
    for d in domains:
        texts += [next_item_prompt(some[:max_history], d.name), listwise_prompt(some[:15], some, d.name),
                  pointwise_prompt(some[:15], some[0], d.name)]
    return texts + [str(i) for i in range(100)]


class LMDemo:
    """The shared tiny-LM state of one demo run: tokenizer, NF4 base, trained adapters."""

    def __init__(self, domains: dict[str, DomainData], cfg: LMDemoConfig | None = None,
                 progress: bool = False) -> None:
        import transformers

        from xkern.nn import load_model
        from xkern.rec.tokenizer import word_tokenizer

        self.cfg = cfg or LMDemoConfig()
        self.progress = progress
        self.domains = domains
        self.tokenizer = word_tokenizer(_vocab_texts(list(domains.values()), self.cfg.max_history))
        torch.manual_seed(self.cfg.seed)
        c = self.cfg
        config = transformers.LlamaConfig(
            vocab_size=len(self.tokenizer), hidden_size=c.hidden_size, intermediate_size=2 * c.hidden_size,
            num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.heads,
            max_position_embeddings=512, initializer_range=c.init_range, pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id)
        base = transformers.LlamaForCausalLM(config)
        self.pretrain_loss = self._pretrain(base)
        self.model = load_model(base, dtype=torch.float32, progress=False)
        self.trained: dict[str, dict[str, Any]] = {}

    def _pretrain(self, base: torch.nn.Module) -> list[float]:
        """Teach the random base the language of the catalog (prompt format and title words) but no
        sequential behaviour: random titles of one domain in random order, full-weight training.
        This stands in for the pretrained LLM the quickstart cannot download."""
        c = self.cfg
        if c.pretrain_steps <= 0:
            return []
        gen = torch.Generator().manual_seed(c.seed)
        domains = list(self.domains.values())
        opt = torch.optim.AdamW(base.parameters(), lr=c.pretrain_lr)
        pad = self.tokenizer.pad_token_id
        losses = []
        base.train()
        for _ in range(c.pretrain_steps):
            rows = []
            for _ in range(c.batch_size):
                d = domains[int(torch.randint(len(domains), (1,), generator=gen))]
                pick = torch.randint(d.n_items, (c.max_history + 1,), generator=gen).tolist()
                titles = [d.titles[i] for i in pick]
                rows.append(self.encoder(d.name).prompt(titles[:-1]) + self.encoder(d.name).title(titles[-1], eos=True))
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
            labels = ids.masked_fill(ids == pad, -100)
            loss = base(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        base.eval()
        return losses

    def encoder(self, domain: str) -> PromptEncoder:
        return PromptEncoder(self.tokenizer, domain, max_history=self.cfg.max_history)

    def lora(self, name: str, data: Sequence[DomainData], prompt_domain: str | None = None) -> str:
        """Train (once) adapter ``name`` on the next-item examples of ``data``; returns its name."""
        from xkern.train import train_lora

        if name in self.trained:
            return name
        c = self.cfg
        examples = []
        for d in data:
            examples += causal_lm_examples(self.encoder(prompt_domain or d.name), d, "train", c.max_per_user)
        self.model.add_adapter(name, r=c.r, lora_alpha=c.lora_alpha, seed=c.seed)
        res = train_lora(self.model, name, examples, lr=c.lr, batch_size=c.batch_size, epochs=c.epochs,
                         seed=c.seed, progress=self.progress)
        self.trained[name] = {"examples": len(examples), "steps": res.steps, "final_loss": res.train_loss[-1],
                              "seconds": round(res.seconds, 2)}
        return name

    def scorer(self, adapter: str, target: DomainData) -> LikelihoodScorer:
        return LikelihoodScorer(self.model, self.encoder(target.name), target.titles, adapter,
                                batch_size=self.cfg.eval_batch_size)

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
    """The adapter trained on source domain ``source`` (shared by every method that needs it)."""
    lm = lm_demo(ctx)
    data = next(d for d in ctx.sources if d.name == source)
    return lm.lora(f"src-{source}", [data])


def target_lora(ctx: Any) -> str:
    """The adapter trained on the target's training users at this run's fraction."""
    lm = lm_demo(ctx)
    return lm.lora(f"tgt-{ctx.fraction:g}".replace(".", "p"), [ctx.target])


def lora_methods(source_names: Sequence[str]) -> list[Any]:
    """Quickstart rows: a LoRA per source domain (zero-shot on the target) and a target-only LoRA."""
    from xkern.rec.demo import Method

    methods = [Method("lora-target", lambda ctx: lm_demo(ctx).scorer(target_lora(ctx), ctx.target),
                      "LoRA on the target's training users (tiny NF4 Llama)")]
    for src in source_names:
        methods.append(Method(f"lora-{src}", lambda ctx, s=src: lm_demo(ctx).scorer(source_lora(ctx, s), ctx.target),
                              f"LoRA trained on {src} only, scored on the target", uses_target_train=False))
    return methods
