"""The quickstart's language model: a tiny Llama over a word tokenizer, pretrained on catalog text, on NF4.

Nothing is downloaded for the quickstart, so its base is a small random-initialized Llama over a
word-level tokenizer built from the catalog titles and the prompt templates. A short full-weight
"pretraining" on catalog text (random titles in random order: the language of the catalog, no user
behaviour) stands in for a pretrained LLM; then xkern quantizes it to NF4 and freezes it.
``xkern train-lora --model tiny``, the WeaveRec experiment and the quickstart all build it here.

The pretrained weights are kept by a key of everything they depend on (the config, the vocabulary
and the titles): the package ships the quickstart's (``xkern/train/assets/``), and any other is
written to ``$XKERN_CACHE`` (default ``~/.cache/xkern``) after its first pretraining.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


ASSET_DIR = Path(__file__).resolve().parent / "assets"
_FORMAT = "xkern-tiny-lm/1"


def cache_dir() -> Path:
    """Where pretrained tiny bases are kept: ``$XKERN_CACHE/tiny-lm`` (default ``~/.cache/xkern/tiny-lm``)."""
    return Path(os.environ.get("XKERN_CACHE") or Path.home() / ".cache" / "xkern") / "tiny-lm"


def pretrain_key(tokenizer: Any, domains: dict[str, DomainData], cfg: TinyLMConfig) -> str:
    """A hash of everything the pretrained weights depend on: config, vocabulary, titles, format."""
    blob = json.dumps({"format": _FORMAT, "config": asdict(cfg), "vocab": sorted(tokenizer.get_vocab().items()),
                       "titles": {n: list(d.titles) for n, d in sorted(domains.items())}}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _stored(key: str) -> Path | None:
    for folder in (ASSET_DIR, cache_dir()):
        path = folder / f"{key}.safetensors"
        if path.is_file():
            return path
    return None


def _save(base: torch.nn.Module, losses: list[float], key: str, folder: Path | None = None) -> None:
    from safetensors.torch import save_file

    folder = folder or cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
        save_file(state, str(tmp), metadata={"format": _FORMAT, "losses": json.dumps(losses)})
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / f"{key}.safetensors")  # atomic: a reader never sees half a file
    except OSError:  # a read-only home is not an error: the next run pretrains again
        pass


def _dense_base(tokenizer: Any, c: TinyLMConfig) -> torch.nn.Module:
    """The random-initialized float32 Llama (seeded by ``c.seed``) that pretraining starts from."""
    import transformers

    torch.manual_seed(c.seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=c.hidden_size, intermediate_size=2 * c.hidden_size,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.heads,
        max_position_embeddings=512, initializer_range=c.init_range, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(config)


def build_tiny_lm(domains: dict[str, DomainData], cfg: TinyLMConfig | None = None, *,
                  cache: bool = True) -> TinyLM:
    """Tokenizer, pretrained base and its NF4 :class:`XkernModel` (no adapters) for ``domains``.

    With ``cache`` the pretrained weights come from the package's assets or the cache when their key
    matches (the same weights a pretraining here would give), and a new pretraining is cached.
    """
    c = cfg or TinyLMConfig()
    tokenizer = word_tokenizer(_vocab_texts(list(domains.values()), c.max_history))
    base = _dense_base(tokenizer, c)
    key = pretrain_key(tokenizer, domains, c) if cache and c.pretrain_steps > 0 else None
    path = _stored(key) if key else None
    if path is not None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        base.load_state_dict(load_file(str(path)))
        with safe_open(str(path), "pt") as f:
            losses = json.loads(f.metadata().get("losses", "[]"))
        base.eval()
    else:
        losses = _pretrain(base, tokenizer, domains, c)
        if key:
            _save(base, losses, key)
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


def write_asset(domains: dict[str, DomainData], cfg: TinyLMConfig | None = None) -> Path:
    """Pretrain (no cache) and write the dense weights into the package's assets: how the shipped file was
    made, for the quickstart's domains (``make_synthetic(SyntheticConfig())``) and the default config."""
    c = cfg or TinyLMConfig()
    tokenizer = word_tokenizer(_vocab_texts(list(domains.values()), c.max_history))
    base = _dense_base(tokenizer, c)
    losses = _pretrain(base, tokenizer, domains, c)
    key = pretrain_key(tokenizer, domains, c)
    _save(base, losses, key, ASSET_DIR)
    return ASSET_DIR / f"{key}.safetensors"
