"""The KV-cache keyword: the installed ``transformers``' own name, the old one for releases without it."""

from __future__ import annotations

import dataclasses
import warnings

import torch

import xkern
from tests.helpers import tiny_model
from xkern.nn.compat import cache_field, cache_keyword, output_cache


class _OldForward(torch.nn.Module):
    """A model of a ``transformers`` release before ``cache=``: its forward names ``past_key_values`` only."""

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return input_ids


class _NewForward(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        return input_ids


@dataclasses.dataclass
class _OldOutput:
    logits: object = None
    past_key_values: object = None


@dataclasses.dataclass
class _NewOutput:
    logits: object = None
    cache: object = None


class _Wrapper:
    """What ``XkernModel`` looks like to the helper: the wrapped model's forward decides."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model


def test_a_release_without_cache_gets_past_key_values():
    assert cache_keyword(_OldForward()) == "past_key_values"
    assert cache_keyword(_Wrapper(_OldForward())) == "past_key_values"
    assert cache_field(_OldOutput) == "past_key_values"
    assert output_cache(_OldOutput(past_key_values="kv")) == "kv"


def test_a_release_with_cache_gets_cache():
    assert cache_keyword(_NewForward()) == "cache"
    assert cache_keyword(_Wrapper(_NewForward())) == "cache"
    assert cache_field(_NewOutput) == "cache"
    assert output_cache(_NewOutput(cache="kv")) == "kv"
    assert output_cache(_NewOutput()) is None


def _continues_the_prefix(model, keyword_of) -> None:
    """A prefill's cache, passed back by the chosen keyword, gives the full sequence's last logits, and no
    warning is raised (a deprecated keyword warns, a name the release does not know drops the cache)."""
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        prefix = model(input_ids=ids[:, :6], use_cache=True)
        step = model(input_ids=ids[:, 6:], use_cache=True, **{keyword_of(model): output_cache(prefix)})
        full = model(input_ids=ids)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)


def test_the_installed_transformers_takes_the_chosen_keyword_without_a_warning():
    hf = tiny_model("llama")
    _continues_the_prefix(hf, cache_keyword)
    _continues_the_prefix(xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False), cache_keyword)
