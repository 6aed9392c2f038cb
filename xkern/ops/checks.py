"""Input checks shared by the public op functions: one wording for every op's errors."""

from __future__ import annotations

import torch

from xkern.errors import InputError, InputTypeError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: How 16-bit activations are multiplied. ``"native"``: in their own dtype, the way bitsandbytes'
#: ``compute_dtype`` and PEFT do it: the NF4 weight decoded and rounded to that dtype once, one
#: 16-bit product per term, float32 accumulation (error ~1e-3 of the output, the dtype's own
#: rounding). ``"exact"``: float32 products whatever the activation dtype (~1e-6 before the final
#: rounding to the activation dtype). float32 activations are exact under both. A backend may be
#: more exact than asked (never less).
PRECISIONS = ("native", "exact")


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES,
                extra: str = "") -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed[:-1])
        last = str(allowed[-1]).removeprefix("torch.")
        raise InputTypeError(f"{name} must be {names} or {last}{extra}, got {t.dtype}")


def check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return str(precision)


def check_one_device(devices: dict[str, torch.device]) -> None:
    if len(set(devices.values())) != 1:
        raise InputError("all inputs must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devices.items()))
