"""A tiny NF4 Llama with a word-level tokenizer over a small titled domain (fast, CPU)."""

from __future__ import annotations

import pytest
import torch

from xkern.rec.data import DomainData
from xkern.rec.prompts import listwise_prompt, next_item_prompt

WORDS = ["red", "blue", "green", "drill", "saw", "hammer", "ball", "kite", "pro", "mini", "set", "kit"]


def tiny_domain(name: str = "Tools", n_items: int = 40, offset: int = 0) -> DomainData:
    titles = []
    for i in range(n_items):
        k = i + offset
        titles.append(" ".join([WORDS[k % 3], WORDS[3 + (k // 3) % 5], *([WORDS[8 + k % 4]] * (1 + k % 3))]))
    rng = torch.Generator().manual_seed(offset + 7)
    seqs = {u: torch.randperm(n_items, generator=rng)[: 3 + u % 4].tolist() for u in range(30)}
    return DomainData(name=name, n_items=n_items, titles=titles,
                      train={u: s for u, s in seqs.items() if u < 20},
                      val={u: s for u, s in seqs.items() if 20 <= u < 24},
                      test={u: s for u, s in seqs.items() if u >= 24})


def tiny_lm(domains, seed: int = 0, hidden: int = 32):
    import transformers

    from xkern.nn import load_model
    from xkern.rec.tokenizer import word_tokenizer

    texts = []
    for d in domains:
        texts += d.titles + [next_item_prompt(d.titles[:3], d.name),
                             listwise_prompt(d.titles[:3], d.titles[:30], d.name)]
    tok = word_tokenizer(texts + [str(i) for i in range(40)])
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024, initializer_range=0.2,
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    model = load_model(transformers.LlamaForCausalLM(cfg), dtype=torch.float32, progress=False)
    return model, tok


@pytest.fixture(scope="module")
def domain() -> DomainData:
    return tiny_domain()


@pytest.fixture(scope="module")
def lm(domain):
    model, tok = tiny_lm([domain])
    model.add_adapter("a", r=4, init_lora_weights=False, seed=1)
    model.add_adapter("b", r=2, lora_alpha=8, init_lora_weights=False, seed=2)
    return model, tok
