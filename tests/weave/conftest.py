"""The serving tests' tiny NF4 Llama and titled domain, shared (see tests/serve/conftest.py)."""

from tests.serve.conftest import domain, lm, tiny_domain, tiny_lm  # noqa: F401  (fixtures and helpers)
