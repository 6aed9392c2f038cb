"""The quickstart (``xkern demo``): synthetic domains, every method as a row, one table.

:mod:`xkern.demo.core` runs the table; :mod:`xkern.demo.methods` says what a row is; the model rows
live in :mod:`xkern.demo.lm` (LoRA on the tiny NF4 Llama), :mod:`xkern.demo.xcross` and
:mod:`xkern.demo.weave`.
"""

from xkern.demo.core import DemoConfig, default_methods, demo_table, model_methods, run_demo
from xkern.demo.methods import DemoContext, Method

__all__ = ["DemoConfig", "DemoContext", "Method", "default_methods", "demo_table", "model_methods", "run_demo"]
