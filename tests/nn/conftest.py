"""Tiny random transformers models (and bitsandbytes-quantized copies) shared by the runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def bnb_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> a directory saved by transformers with BitsAndBytesConfig(load_in_4bit, nf4, double quant)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb")
    out = {}
    for family in ("llama", "bert"):
        fp = root / f"{family}-fp32"
        tiny_model(family).save_pretrained(fp)
        auto = AutoModelForCausalLM if family == "llama" else AutoModelForMaskedLM
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
        q = auto.from_pretrained(fp, quantization_config=qcfg, dtype=torch.float32)
        q.save_pretrained(root / family)
        out[family] = root / family
    return out
