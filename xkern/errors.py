"""xkern's own exceptions: what the user got wrong, or which file is damaged, in one line.

They subclass the built-in type a caller would already catch (``ValueError`` for bad values and
damaged files, ``FileNotFoundError`` for missing ones), so ``except ValueError`` keeps working;
the command line turns any of them into one line on stderr and exit code 2.
"""

from __future__ import annotations


class XkernError(Exception):
    """Base of every error xkern raises on purpose."""


class InputError(XkernError, ValueError):
    """A bad argument: wrong value, type, shape, or flags that contradict each other."""


class FormatError(XkernError, ValueError):
    """A file that exists but cannot be read as what it claims to be; the message names the file."""


class NotFoundError(XkernError, FileNotFoundError):
    """A model, adapter, data folder or file that is not where the user said."""


class InputTypeError(XkernError, TypeError):
    """An argument of the wrong type (a list where a tensor belongs, an unsupported dtype)."""


class BackendUnavailableError(XkernError, RuntimeError):
    """The backend asked for (``backend=`` or ``XKERN_BACKEND``) cannot run here, or no backend serves the device."""


class InputKeyError(XkernError, KeyError):
    """A name that is not known here (an adapter that is not loaded, a domain, a row); ``KeyError`` for callers."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""
