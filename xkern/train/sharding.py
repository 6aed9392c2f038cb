"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the training loop: shard, gather for saving, release.

What is sharded: the module's parameters, trainable (LoRA A/B, X-Cross integrators and head) and
frozen (embeddings, norms, an unquantized ``lm_head``), one FSDP group per transformer block (the
classes ``transformers`` lists in ``_no_split_modules``) plus the root. What is replicated: the NF4
base weights. They are buffers, not parameters, and stay whole on every rank: they are frozen (no
gradient or optimizer state to shard), and sharding them would add an all-gather of the whole base
in every forward and again in every backward (the input gradient needs the weight). The measured
memory per rank is in ``docs/scale-out.md``.

Mixed precision: on CUDA with bf16 autocast, parameters are gathered in bf16 and gradients reduced
in float32 (``MixedPrecisionPolicy``); the sharded parameters and the optimizer stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from xkern.errors import InputError


def _fsdp() -> Any:
    from torch.distributed import fsdp

    return fsdp


def transformer_blocks(hf_model: nn.Module | None) -> list[nn.Module]:
    """The blocks ``transformers`` says must not be split across devices (one FSDP group each)."""
    if hf_model is None:
        return []
    names = set(getattr(hf_model, "_no_split_modules", None) or ())
    return [m for m in hf_model.modules() if type(m).__name__ in names]


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, _fsdp().FSDPModule)


def _groups(module: nn.Module) -> list[Any]:
    """The FSDP groups inside ``module`` (the blocks and the root ``shard`` wrapped)."""
    return [m for m in module.modules() if is_sharded(m)]


def shard(module: nn.Module, hf_model: nn.Module | None, param_groups: Sequence[dict[str, Any]],
          bf16: bool = False) -> list[dict[str, Any]]:
    """``fully_shard`` the blocks of ``hf_model`` and ``module`` (the root); returns ``param_groups`` remapped.

    Sharding replaces each parameter by a DTensor parameter of the same name, so the optimizer must
    be built on the returned groups. A module sharded by an earlier call is resharded, not wrapped twice.
    """
    fsdp = _fsdp()
    names = {id(p): n for n, p in module.named_parameters()}
    missing = [p for g in param_groups for p in g["params"] if id(p) not in names]
    if missing:
        raise InputError(f"parallel='fsdp' shards the parameters of the module it trains; {len(missing)} trained "
                         "parameter(s) live outside it (as X-Cross's co-trained LoRA): use parallel='ddp'")
    if is_sharded(module):
        for m in _groups(module):
            m.reshard()
            m.set_reshard_after_forward(True)
    else:
        policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else fsdp.MixedPrecisionPolicy()
        for block in transformer_blocks(hf_model):
            fsdp.fully_shard(block, mp_policy=policy)
        fsdp.fully_shard(module, mp_policy=policy)
    now = dict(module.named_parameters())
    return [{**g, "params": [now[names[id(p)]] for p in g["params"]]} for g in param_groups]


def set_gradient_sync(module: nn.Module, on: bool) -> None:
    """FSDP's ``no_sync``: skip the reduce-scatter on all but the last micro-step of an accumulation."""
    module.set_requires_gradient_sync(on)


@contextlib.contextmanager
def whole_parameters(module: nn.Module) -> Iterator[None]:
    """Every rank gathers the full parameters (collective) for the body, then shards them again."""
    groups = _groups(module)
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()


def release(module: nn.Module) -> None:
    """Leave ``module`` with whole parameters after training, so it serves and saves like an unsharded one."""
    for m in _groups(module):
        m.unshard()
        m.set_reshard_after_forward(False)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a (possibly sharded) tensor; collective for a DTensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param`` is: sharded the same way for a DTensor, else a copy on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype).clone()


def optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, by_name: bool) -> dict[str, Any]:
    """The optimizer state to checkpoint: whole tensors keyed by parameter name when ``by_name``
    (collective under FSDP; loads under any sharding), else ``opt.state_dict()`` (keyed by position)."""
    if not by_name:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    for m in _groups(module):  # a forward without backward (validation) leaves the root unsharded:
        m.reshard()  # register the sharded parameters the optimizer holds again
    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                         by_name: bool) -> None:
    if not by_name:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))
