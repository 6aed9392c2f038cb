"""xkern's test suite, one package so that no test folder becomes a top-level module.

pytest puts the first folder above a test file that has no ``__init__.py`` on ``sys.path``. With
this file that folder is the repository root, so the test packages are ``tests.ops``,
``tests.kernels`` and so on, and cannot shadow an installed distribution of the same name (the
``kernels`` package that transformers imports once did). ``tests/test_layout.py`` holds that rule.
"""
