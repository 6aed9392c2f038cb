"""The test run's warning filters (``filterwarnings`` in pyproject.toml) turn the next deprecation into a red test.

A warning is attributed to the module whose code the warning's stack level points at; these tests raise
warnings from code that claims to be such a module.
"""

from __future__ import annotations

import pytest


def _warn_from(module: str, category: type[Warning], message: str = "something changed") -> None:
    code = compile(f"import warnings\nwarnings.warn({message!r}, {category.__name__})", f"<{module}>", "exec")
    exec(code, {"__name__": module, category.__name__: category})


def test_a_warning_from_xkern_code_fails_the_test():
    for module in ("xkern", "xkern.nn.model", "xkern.serve.scoring"):
        for category in (DeprecationWarning, FutureWarning, UserWarning, RuntimeWarning):
            with pytest.raises(category):
                _warn_from(module, category)


def test_the_transformers_kv_cache_deprecation_fails_wherever_it_is_attributed():
    with pytest.raises(FutureWarning):
        _warn_from("transformers.utils.deprecation", FutureWarning,
                   "`past_key_values` is deprecated and will be removed; use `cache` instead")


def test_warnings_of_other_libraries_stay_warnings():
    with pytest.warns(DeprecationWarning):
        _warn_from("torch.jit._script", DeprecationWarning)
    with pytest.warns(FutureWarning):
        _warn_from("transformers.modeling_utils", FutureWarning, "another deprecation")
