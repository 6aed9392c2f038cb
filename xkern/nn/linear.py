"""``NF4LoRALinear``: a frozen NF4 linear layer with a bank of LoRA adapters, run by the core op.

Every adapter of the layer lives in it as a pair of parameters (``A [r, K]``, ``B [N, r]``) plus a
scale, and each row of a batch gets the bank slot of its sample's adapter, so a mixed batch is ONE
launch of ``xkern.ops.lora_linear``. The parameters are views into one persistent bank per layer
(``[n, r_max, K]`` / ``[n, N, r_max]``, ranks zero-padded; the layout the core op takes), so
inference passes the bank itself: no stacked copy of the adapters per call or per layer, and an
in-place update of a parameter (an optimizer step, ``copy_``) is the bank's update. The bank is
rebuilt (and the parameters re-pointed into it) when adapters are added or removed, or when a
parameter no longer lies in it (``.to()`` moved it, ``.data`` was replaced); adapters of different
dtypes share no bank and are stacked per call. With gradients on, the active adapters are stacked
per call so that gradients flow back to the parameters.

Which adapter each sample uses comes from the :class:`~xkern.nn.routing.SampleRouting` that the
model enters for the length of one call; the layer asks it for the row grouping of its input
(built once per call and shared by all layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xkern.errors import InputError
from xkern.nf4 import NF4Tensor
from xkern.nn.routing import current_routing
from xkern.ops import lora_linear


class NF4LoRALinear(nn.Module):
    """``y = x W^T + b + s_a (x A_a^T) B_a^T`` with W frozen in NF4 and ``a`` the sample's adapter."""

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None, module_name: str = "") -> None:
        super().__init__()
        self.module_name = module_name
        if len(weight.shape) != 2:
            raise InputError(f"NF4LoRALinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        self.register_buffer("weight_packed", weight.packed)
        self.register_buffer("weight_absmax", weight.absmax)
        self.register_buffer("weight_absmax2", weight.absmax2)
        self.register_buffer("weight_code2", weight.code2)
        self.register_buffer("weight_offset", weight.offset)
        if bias is not None and bias.shape != (self.out_features,):
            raise InputError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        # (slot names, A bank, B bank, scales key, scale tensor); see _persistent_bank
        self._bank: tuple[tuple[str, ...], torch.Tensor, torch.Tensor, tuple, torch.Tensor] | None = None
        self._base_bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.precision = "native"  # see xkern.ops.checks.PRECISIONS; XkernModel.set_precision sets every layer

    # ---- weight ---------------------------------------------------------------------------------

    @property
    def nf4_weight(self) -> NF4Tensor:
        """The frozen base weight as an ``NF4Tensor`` (views of this module's buffers)."""
        return NF4Tensor(packed=self.weight_packed, absmax=self.weight_absmax,
                         shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                         blocksize=self.blocksize, absmax2=self.weight_absmax2, code2=self.weight_code2,
                         offset=self.weight_offset)

    def set_nf4_weight(self, weight: NF4Tensor) -> None:
        """Replace the base weight (same shape), e.g. with a merged-and-requantized one."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise InputError(f"weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
        device = self.weight_packed.device
        weight = weight.to(device)
        self.weight_packed, self.weight_absmax = weight.packed, weight.absmax
        self.weight_absmax2, self.weight_code2, self.weight_offset = weight.absmax2, weight.code2, weight.offset
        self.blocksize, self.weight_dtype = weight.blocksize, weight.dtype

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def rank(self, name: str) -> int:
        return int(self.lora_A[name].shape[0])

    def add_adapter(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float,
                    dtype: torch.dtype = torch.float32) -> None:
        """Attach adapter ``name`` (``A [r, K]``, ``B [N, r]``); shapes are checked first."""
        self.check_adapter_shapes(name, A, B)
        if name in self.lora_A:
            raise InputError(f"adapter {name!r} already exists in this layer")
        device = self.weight_packed.device
        self.lora_A[name] = nn.Parameter(A.detach().to(device, dtype).clone(), requires_grad=False)
        self.lora_B[name] = nn.Parameter(B.detach().to(device, dtype).clone(), requires_grad=False)
        self.scales[name] = float(scale)
        self._bank = None

    def check_adapter_shapes(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
            raise InputError(f"adapter {name!r}: A {tuple(A.shape)} and B {tuple(B.shape)} are not [r, K] and [N, r]")
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features:
            raise InputError(f"adapter {name!r}: A {tuple(A.shape)} / B {tuple(B.shape)} do not fit this layer "
                             f"(in_features={self.in_features}, out_features={self.out_features})")

    def delete_adapter(self, name: str) -> None:
        if name in self.lora_A:
            del self.lora_A[name]
            del self.lora_B[name]
            del self.scales[name]
            self._bank = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` for one adapter, float32 ``[N, K]``."""
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scales[name]

    # ---- forward --------------------------------------------------------------------------------

    def _stacked(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``names``' parameters stacked into a new bank (zero-padded ranks; differentiable, dtypes promoted)."""
        r_max = max(self.lora_A[n].shape[0] for n in names)
        a = torch.stack([F.pad(self.lora_A[n], (0, 0, 0, r_max - self.lora_A[n].shape[0])) for n in names])
        b = torch.stack([F.pad(self.lora_B[n], (0, r_max - self.lora_B[n].shape[1])) for n in names])
        return a, b

    def _scale_tensor(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.scales[n] for n in names], dtype=torch.float32, device=device)

    def _persistent_bank(self) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(slot names, A bank, B bank, scales) with every parameter a view of its slot; None when the
        adapters' dtypes or devices differ (they cannot share one bank)."""
        names = tuple(self.lora_A.keys())
        bank = self._bank
        if bank is not None and bank[0] == names and self._in_bank(bank):
            key = tuple(self.scales[n] for n in names)
            if bank[3] != key:  # a scale was changed: only the small scale tensor is rebuilt
                bank = self._bank = (*bank[:3], key, self._scale_tensor(names, bank[1].device))
            return bank[0], bank[1], bank[2], bank[4]
        params = [self.lora_A[n] for n in names] + [self.lora_B[n] for n in names]
        if len({(p.dtype, p.device) for p in params}) != 1:
            self._bank = None
            return None
        with torch.no_grad():
            a, b = self._stacked(names)
            for i, n in enumerate(names):  # re-point every parameter into its slot (same Parameter objects)
                r = self.lora_A[n].shape[0]
                self.lora_A[n].data = a[i, :r]
                self.lora_B[n].data = b[i, :, :r]
        key = tuple(self.scales[n] for n in names)
        self._bank = (names, a, b, key, self._scale_tensor(names, a.device))
        return names, a, b, self._bank[4]

    def _in_bank(self, bank: tuple) -> bool:
        """Whether every parameter is still the view of its slot (not moved by ``.to()``, not replaced)."""
        _, a, b = bank[:3]
        for i, n in enumerate(bank[0]):
            pa, pb = self.lora_A[n], self.lora_B[n]
            if pa.data_ptr() != a[i].data_ptr() or pb.data_ptr() != b[i].data_ptr() \
                    or pa.dtype != a.dtype or pa.device != a.device or pb.stride() != b[i, :, :pb.shape[1]].stride():
                return False
        return True

    def _adapter_bank(self, active: tuple[str, ...],
                      device: torch.device) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bank for a call using ``active``: (slot names, A, B, scales); rows are routed by slot name."""
        if not active:  # base only: a one-slot zero bank that no row selects
            if self._base_bank is None or self._base_bank[0].device != device:
                self._base_bank = (torch.zeros(1, 1, self.in_features, device=device),
                                   torch.zeros(1, self.out_features, 1, device=device), torch.zeros(1, device=device))
            return ("",), *self._base_bank
        needs_graph = torch.is_grad_enabled() and any(
            self.lora_A[n].requires_grad or self.lora_B[n].requires_grad for n in active)
        if not needs_graph:
            bank = self._persistent_bank()
            if bank is not None:
                return bank
        a, b = self._stacked(active)
        return active, a, b, self._scale_tensor(active, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = current_routing()
        active = routing.active(self.lora_A) if routing is not None and self.lora_A else ()
        slots, a, b, s = self._adapter_bank(active, x.device)
        rows = routing.rows(slots, x, self.module_name or "?") if active else None
        y = lora_linear(x, self.nf4_weight, a, b, s, rows, precision=self.precision)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        ranks = {n: self.rank(n) for n in self.adapter_names}
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize={self.blocksize}, "
                f"double_quant={self.weight_absmax2 is not None}, bias={self.bias is not None}, adapters={ranks}")
