"""Swap the linear layers of a ``transformers`` model for :class:`NF4LoRALinear`.

Plain ``nn.Linear`` (and GPT-2 style ``Conv1D``) layers that are targeted get quantized to NF4 by
xkern; bitsandbytes ``Linear4bit`` layers are taken over as they are (their NF4 bytes, no
re-quantization), whether targeted or not, since leaving them would run a second 4-bit code path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from xkern.adapters.peft_format import is_target
from xkern.errors import InputError
from xkern.nf4 import NF4Tensor, quantize_nf4
from xkern.nn.linear import NF4LoRALinear

# A linear inside a repeated transformer block: model.layers.3.mlp.up_proj, encoder.layer.0.attention...
_IN_BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")


def is_bnb_linear4bit(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a LoRA adapter could target: ``nn.Linear``, ``Conv1D``, bitsandbytes ``Linear4bit``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or _is_conv1d(m) or is_bnb_linear4bit(m)}


def selects(target_modules: str | Iterable[str] | None, name: str) -> bool:
    """xkern's default (``None`` / ``"all-linear"``): every linear inside a transformer block."""
    if target_modules is None or target_modules == "all-linear":
        return _IN_BLOCK.search(name) is not None
    return is_target(target_modules, name)


def _from_bnb(module: nn.Module) -> NF4Tensor:
    state = {k: v for k, v in module.state_dict().items() if k.startswith("weight")}
    return NF4Tensor.from_bnb_state_dict(state, prefix="weight")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_linears(model: nn.Module, target_modules: str | Iterable[str] | None = None,
                     *, blocksize: int = 64, double_quant: bool = True, device: torch.device | None = None,
                     progress: bool = True) -> dict[str, NF4LoRALinear]:
    """Replace targeted linears (and every bitsandbytes ``Linear4bit``) in place; returns the new layers."""
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
    todo = [(n, m) for n, m in linear_layers(model).items() if is_bnb_linear4bit(m) or selects(target_modules, n)]
    if not todo:
        raise InputError(f"target_modules={target_modules!r} selects no linear layer of {type(model).__name__}")
    converted: dict[str, NF4LoRALinear] = {}
    for name, module in tqdm(todo, desc="quantizing to NF4", disable=not progress or len(todo) < 50):
        if is_bnb_linear4bit(module):
            weight = _from_bnb(module)
        else:
            w = module.weight.detach()
            if device is not None:
                w = w.to(device)
            if _is_conv1d(module):
                w = w.T  # Conv1D stores [in, out]
            weight = quantize_nf4(w.contiguous(), blocksize=blocksize, double_quant=double_quant)
        if device is not None:
            weight = weight.to(device)
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        if bias is not None and device is not None:
            bias = bias.to(device)
        layer = NF4LoRALinear(weight, bias, module_name=name)
        _set_submodule(model, name, layer)
        converted[name] = layer
    return converted
