"""A word-level tokenizer for the embedded synthetic data (no hub download needed).

Real models bring their own tokenizer; the quickstart's tiny model uses this one, built from the
words of the titles and the prompt templates, as a ``transformers.PreTrainedTokenizerFast``.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def word_tokenizer(texts: Iterable[str]) -> object:
    """A ``PreTrainedTokenizerFast`` over the words and punctuation of ``texts`` (BOS prepended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab: dict[str, int] = {}
    for tok in SPECIALS.values():
        vocab[tok] = len(vocab)
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            if word not in vocab:
                vocab[word] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk"]))
    tk.pre_tokenizer = pre
    bos = SPECIALS["bos"]
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=SPECIALS["pad"], unk_token=SPECIALS["unk"],
                                   bos_token=bos, eos_token=SPECIALS["eos"])
