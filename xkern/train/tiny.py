"""The quickstart's language model: a tiny Llama over a word tokenizer, pretrained on catalog text, on NF4.

Nothing is downloaded for the quickstart, so its base is a small random-initialized Llama over a
word-level tokenizer built from the catalog titles and the prompt templates. A short full-weight
"pretraining" on catalog text (random titles in random order: the language of the catalog, no user
behaviour) stands in for a pretrained LLM; then xkern quantizes it to NF4 and freezes it.
``xkern train-lora --model tiny``, the WeaveRec experiment and the quickstart all build it here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xkern.data.domain import DomainData
from xkern.data.encoding import PromptEncoder
from xkern.data.prompts import listwise_prompt, next_item_prompt, pointwise_prompt
from xkern.data.tokenizer import word_tokenizer
from xkern.nn import XkernModel, load_model


@dataclass
class TinyLMConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    init_range: float = 0.2  # with the usual 0.02 a frozen random lm_head cannot produce confident logits
    max_history: int = 5
    pretrain_steps: int = 200  # base "pretraining" on catalog text (titles in random order, no user behaviour)
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 32
    seed: int = 0


@dataclass
class TinyLM:
    model: XkernModel
    tokenizer: Any
    config: TinyLMConfig
    pretrain_loss: list[float] = field(default_factory=list)

    def encoder(self, domain: str) -> PromptEncoder:
        return PromptEncoder(self.tokenizer, domain, max_history=self.config.max_history)


def _vocab_texts(domains: Sequence[DomainData], max_history: int) -> list[str]:
    titles = [t for d in domains for t in d.titles]
    some = titles[:30]
    texts = list(titles)
    for d in domains:
        texts += [next_item_prompt(some[:max_history], d.name), listwise_prompt(some[:15], some, d.name),
                  pointwise_prompt(some[:15], some[0], d.name)]
    return texts + [str(i) for i in range(100)]


def build_tiny_lm(domains: dict[str, DomainData], cfg: TinyLMConfig | None = None) -> TinyLM:
    """Tokenizer, pretrained base and its NF4 :class:`XkernModel` (no adapters) for ``domains``."""
    import transformers

    c = cfg or TinyLMConfig()
    tokenizer = word_tokenizer(_vocab_texts(list(domains.values()), c.max_history))
    torch.manual_seed(c.seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=c.hidden_size, intermediate_size=2 * c.hidden_size,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.heads,
        max_position_embeddings=512, initializer_range=c.init_range, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    base = transformers.LlamaForCausalLM(config)
    losses = _pretrain(base, tokenizer, domains, c)
    return TinyLM(load_model(base, dtype=torch.float32, progress=False), tokenizer, c, losses)


def _pretrain(base: torch.nn.Module, tokenizer: Any, domains: dict[str, DomainData], c: TinyLMConfig) -> list[float]:
    """Teach the random base the language of the catalog (prompt format and title words) but no
    sequential behaviour: random titles of one domain in random order, full-weight training.
    This stands in for the pretrained LLM the quickstart cannot download."""
    if c.pretrain_steps <= 0:
        return []
    gen = torch.Generator().manual_seed(c.seed)
    domain_list = list(domains.values())
    opt = torch.optim.AdamW(base.parameters(), lr=c.pretrain_lr)
    pad = tokenizer.pad_token_id
    encoders = {d.name: PromptEncoder(tokenizer, d.name, max_history=c.max_history) for d in domain_list}
    losses = []
    base.train()
    for _ in range(c.pretrain_steps):
        rows = []
        for _ in range(c.pretrain_batch_size):
            d = domain_list[int(torch.randint(len(domain_list), (1,), generator=gen))]
            pick = torch.randint(d.n_items, (c.max_history + 1,), generator=gen).tolist()
            titles = [d.titles[i] for i in pick]
            rows.append(encoders[d.name].prompt(titles[:-1]) + encoders[d.name].title(titles[-1], eos=True))
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
