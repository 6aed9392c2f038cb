"""Shared helpers of the tests: float64 references, tiny transformers models, tiny titled domains, PEFT adapters.

Plain functions only; fixtures built from them live in tests/conftest.py. Tests import this module
as ``tests.helpers`` (the repository root is on sys.path; see tests/__init__.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from xkern.data.domain import DomainData
from xkern.data.prompts import listwise_prompt, next_item_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
# the workplace's real Amazon domains (XKERN_DATA overrides): tests that need real data read them from there
REAL_DATA = Path(os.environ.get("XKERN_DATA") or REPO_ROOT / ".." / "shared" / "data" / "amazon-xcross").resolve()


class OptionalModule:
    """A module imported when a test first uses it: where it is missing (the GPU image has no bitsandbytes) the tests
    that compare against it skip, and the rest of their file still collects and runs."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        # exc_type=ImportError: a module that is present but cannot be imported (the image) skips too
        return getattr(pytest.importorskip(self._name, exc_type=ImportError), attr)


class PicklePayload:
    """What an attacker plants in a file a loader might unpickle: unpickling it creates ``path`` (it could run
    any command). Tests assert the file never appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def load_script(relative: str):
    """A repository script that is not a package module (``bench/docs_tables.py``, an example), imported."""
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look a class's module up there
    spec.loader.exec_module(module)
    return module


def random_lora_bank(ranks, n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapters of differing ranks zero-padded into one bank: ``A [n, r_max, K]``, ``B [n, N, r_max]``."""
    r_max = max(ranks)
    lora_A = torch.zeros(len(ranks), r_max, k)
    lora_B = torch.zeros(len(ranks), n, r_max)
    for a, r in enumerate(ranks):
        lora_A[a, :r] = torch.randn(r, k, generator=generator) / k**0.5
        lora_B[a, :, :r] = torch.randn(n, r, generator=generator)
    return lora_A, lora_B


def dense_lora_reference(x, w_dense, lora_A, lora_B, scale, ids):
    """Row-by-row float64 ``x W^T + s[a] (x A[a]^T) B[a]^T``; differentiable in x, A, B."""
    rows = []
    for m in range(x.shape[0]):
        out = x[m].double() @ w_dense.double().T
        a = int(ids[m])
        if a >= 0:
            out = out + float(scale[a]) * (x[m].double() @ lora_A[a].double().T) @ lora_B[a].double().T
        rows.append(out)
    return torch.stack(rows)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)


def tiny_config(family: str, **overrides):

    cfg = _tiny_config(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(vocab_size=128, num_key_value_heads=2, **TINY)
    if family == "qwen2":
        return tf.Qwen2Config(vocab_size=128, num_key_value_heads=2, **TINY)
    if family == "mistral":
        return tf.MistralConfig(vocab_size=128, num_key_value_heads=2, **TINY)
    if family == "bert":
        return tf.BertConfig(vocab_size=128, **TINY)
    if family == "deberta-v2":
        return tf.DebertaV2Config(vocab_size=128, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                  position_buckets=8, max_relative_positions=16, **TINY)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM,
           "bert": tf.BertForMaskedLM, "deberta-v2": tf.DebertaV2ForMaskedLM}[family]
    return cls(cfg).eval()


def exact_bnb(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off bitsandbytes' CPU inference fast path, which repacks the weights to bf16 (lossy)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


WORDS = ["red", "blue", "green", "drill", "saw", "hammer", "ball", "kite", "pro", "mini", "set", "kit"]


def titled_domain(name: str = "Tools", n_items: int = 40, offset: int = 0) -> DomainData:
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

    from xkern.data.tokenizer import word_tokenizer
    from xkern.nn import load_model

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


TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
           "bert": ["query", "key", "value", "dense"]}


def save_peft_adapters(family: str, root: Path, n: int) -> dict[str, str]:
    """n PEFT adapters with non-zero B (different ranks), saved in PEFT's format."""
    peft = pytest.importorskip("peft")
    paths = {}
    for i in range(n):
        cfg = peft.LoraConfig(r=2 + 2 * i, lora_alpha=4 + i, target_modules=TARGETS[family], init_lora_weights=False)
        torch.manual_seed(200 + i)
        pm = peft.get_peft_model(tiny_model(family, seed=1), cfg)
        with torch.no_grad():  # PEFT's init_lora_weights=False B is large; keep the adapters' effect moderate
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.3)
        pm.save_pretrained(root / f"s{i}")
        paths[f"s{i}"] = str(root / f"s{i}")
    return paths


def memorizable_examples(n: int = 16, length: int = 10, seed: int = 0, distinct: int = 4) -> list[dict]:
    """``n`` examples drawn from ``distinct`` fixed random sequences (something a LoRA can memorize)."""
    g = torch.Generator().manual_seed(1234)
    pool = torch.randint(3, 128, (distinct, length), generator=g).tolist()
    pick = torch.randint(0, distinct, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": pool[i]} for i in pick]


def record_triton_launches(monkeypatch) -> list[dict]:
    """Patch the Triton backend's launcher to record each launch's meta-parameters (the list it returns)."""
    from xkern.ops.backends import triton_jit

    launches: list[dict] = []
    launch = triton_jit._launch

    def recording(kernel, grid, args, device, num_stages, **meta):
        launches.append(meta)
        return launch(kernel, grid, args, device, num_stages, **meta)

    monkeypatch.setattr(triton_jit, "_launch", recording)
    return launches
