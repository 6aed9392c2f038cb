"""The backends of xkern's ops: every module here registers itself (see :mod:`xkern.ops.registry`).

Importing this package imports each module in it, so a new backend is one new file: it calls
``register_backend`` and decorates its kernels with ``register_kernel``.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
