"""Input checks shared by the public op functions: one wording for every op's errors."""

from __future__ import annotations

import torch

from xkern.errors import InputError, InputTypeError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def check_one_device(devices: dict[str, torch.device]) -> None:
    if len(set(devices.values())) != 1:
        raise InputError("all inputs must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devices.items()))
