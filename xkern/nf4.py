"""NF4 4-bit weight format, byte-for-byte compatible with bitsandbytes.

A weight of shape ``[N, K]`` is flattened row-major and cut into blocks of ``blocksize``
consecutive elements. Each element stores the index of the nearest NF4 code of ``w / absmax``;
two codes share a byte, element ``2i`` in the high nibble. With double quantization (the QLoRA
default), the per-block ``absmax`` values are themselves stored as 8-bit codes of bitsandbytes'
signed dynamic map, in blocks of 256, around their mean (``offset``).

Everything here is plain torch so it runs anywhere; the fused kernels read the same tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import cache

import torch

from xkern.errors import FormatError, InputError, InputTypeError

NF4_CODE_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@cache
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry NF4 code table (float32) on ``device``; a fresh copy, so callers may not corrupt the cache."""
    return _nf4_code_cpu().to(device, copy=True)


@cache
def _dynamic_code_cpu() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (dynamic exponent + fraction), sorted, 256 entries.

    Built by the published construction (Dettmers, 8-bit approximations): for each exponent
    level i, the midpoints of a linspace(0.1, 1) grid scaled by 10^(i-6), both signs, plus 0 and 1.
    """
    values: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        n_fraction = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        grid = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


@cache
def _nf4_byte_table_cpu() -> torch.Tensor:
    """float32 ``[256, 2]``: packed byte b -> (code[b >> 4], code[b & 15]), so one gather decodes two weights."""
    code = _nf4_code_cpu()
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry signed dynamic code used for double-quantized absmax (float32), a fresh copy."""
    return _dynamic_code_cpu().to(device, copy=True)


def _blockwise_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and values scaled into [-1, 1], rounding exactly as bitsandbytes does.

    Full blocks multiply by the reciprocal of absmax, a trailing partial block divides by it: the
    two differ in the last ulp, and byte-exactness needs the same choice.
    """
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted code; a value on a midpoint takes the lower entry.

    This is the rule of bitsandbytes' torch and CUDA kernels. Its native CPU library searches the
    8-bit code with a bucketed search that, for about 0.1-0.3% of double-quantized absmax values lying
    close to a midpoint (within 10% of the gap), picks the neighbouring code (see docs/formats.md).
    """
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)



class QuantStateError(FormatError):
    """A bitsandbytes NF4 state dict that is incomplete or damaged (the message names the weight and key)."""

@dataclass(frozen=True)
class NF4Tensor:
    """A frozen NF4-quantized weight: packed codes plus (optionally double-quantized) block scales.

    Attributes:
        packed: uint8 ``[ceil(numel / 2)]``, two codes a byte, high nibble first.
        absmax: float32 ``[n_blocks]`` when not double-quantized, else uint8 codes of the
            dynamic map (``absmax - offset`` quantized in blocks of 256).
        shape: the logical shape of the original weight.
        dtype: the dtype the weight had, and the default dequantization dtype.
        blocksize: elements per quantization block.
        absmax2: float32 ``[ceil(n_blocks / 256)]`` nested scales (double quantization only).
        code2: float32 ``[256]`` nested code (double quantization only).
        offset: float32 scalar tensor, mean of the absmax values (double quantization only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        numel = math.prod(self.shape)
        if self.packed.dtype != torch.uint8:
            raise InputTypeError(f"packed must be uint8, got {self.packed.dtype}")
        if self.packed.numel() != (numel + 1) // 2:
            raise InputError(f"packed has {self.packed.numel()} bytes, shape {tuple(self.shape)} needs "
                             f"{(numel + 1) // 2}")
        if self.blocksize not in VALID_BLOCKSIZES:
            raise InputError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {self.blocksize}")
        if self.dtype not in _FLOAT_DTYPES:
            raise InputTypeError(f"dtype must be one of {_FLOAT_DTYPES}, got {self.dtype}")
        n_blocks = -(-numel // self.blocksize)
        if self.absmax.numel() != n_blocks:
            raise InputError(f"absmax has {self.absmax.numel()} entries, expected {n_blocks}")
        nested = (self.absmax2, self.code2, self.offset)
        if any(t is not None for t in nested) and not all(t is not None for t in nested):
            raise InputError("double quantization needs absmax2, code2 and offset together")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise InputTypeError(f"double-quantized absmax must be uint8, got {self.absmax.dtype}")
            if self.absmax2.numel() != -(-n_blocks // NESTED_BLOCKSIZE):
                raise InputError(f"absmax2 has {self.absmax2.numel()} entries, expected "
                                 f"{-(-n_blocks // NESTED_BLOCKSIZE)}")
            if self.code2.numel() != 256:
                raise InputError(f"code2 must have 256 entries, got {self.code2.numel()}")
        elif self.absmax.dtype != torch.float32:
            raise InputTypeError(f"absmax must be float32, got {self.absmax.dtype}")
        devices = {t.device for t in (self.packed, self.absmax, *nested) if t is not None}
        if len(devices) != 1:
            raise InputError(f"NF4Tensor parts are on different devices: {sorted(map(str, devices))}")

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return self.absmax.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus scales (what a kernel must read)."""
        parts = [self.packed, self.absmax, self.absmax2, self.code2, self.offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax), absmax2=move(self.absmax2),
                       code2=move(self.code2), offset=move(self.offset))

    def block_scales(self) -> torch.Tensor:
        """Per-block absmax as float32, decoding the nested quantization if present."""
        if not self.double_quant:
            return self.absmax
        n = self.absmax.numel()
        values = self.code2[self.absmax.long()]
        rem = n % NESTED_BLOCKSIZE
        full = n - rem
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        out[:full] = (values[:full].view(-1, NESTED_BLOCKSIZE) * self.absmax2[: full // NESTED_BLOCKSIZE, None]
                      ).reshape(-1)
        if rem:
            out[full:] = values[full:] * self.absmax2[-1]
        return out + self.offset

    def parts(self) -> tuple[list[torch.Tensor], list[int]]:
        """``(tensors, meta)``: the storage as a flat tensor list and ints (N, K, blocksize), the form custom ops take.

        ``tensors`` is ``[packed, absmax]`` or, double-quantized, ``[packed, absmax, absmax2, code2, offset]``;
        :meth:`from_parts` inverts it. Changing the layout changes only these two methods.
        """
        if len(self.shape) != 2:
            raise InputError(f"parts() needs a 2-D weight, got shape {tuple(self.shape)}")
        tensors = [self.packed, self.absmax]
        if self.double_quant:
            tensors += [self.absmax2, self.code2, self.offset.reshape(1)]
        return tensors, [int(self.shape[0]), int(self.shape[1]), int(self.blocksize)]

    @classmethod
    def from_parts(cls, tensors: list[torch.Tensor], meta: list[int],
                   dtype: torch.dtype = torch.float32) -> NF4Tensor:
        """The inverse of :meth:`parts` for parts that came from an ``NF4Tensor`` (not checked again: a hot path)."""
        packed, absmax, *nested = tensors
        n, k, blocksize = meta
        absmax2, code2, offset = nested if nested else (None, None, None)
        out = object.__new__(cls)
        for name, value in (("packed", packed), ("absmax", absmax), ("shape", torch.Size((n, k))), ("dtype", dtype),
                            ("blocksize", blocksize), ("absmax2", absmax2), ("code2", code2),
                            ("offset", None if offset is None else offset.reshape(()))):
            object.__setattr__(out, name, value)
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, ``code[q] * absmax[block]`` computed in float32 and cast to ``dtype``."""
        return dequantize_nf4(self, dtype)

    # ---- bitsandbytes serialization -------------------------------------------------------

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """State-dict entries of a bitsandbytes ``Linear4bit`` parameter named ``prefix``."""
        meta: dict[str, object] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        out = {
            prefix: self.packed.view(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": nf4_code(self.device),
        }
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.absmax2
            out[f"{prefix}.nested_quant_map"] = self.code2.clone()
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=float(self.offset.item()))
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(
            list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8, device=self.device)
        return out

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
        """Read the serialized keys of a bitsandbytes NF4 ``Linear4bit`` parameter, without re-quantizing.

        Missing keys, a damaged quant-state JSON or parts that do not fit together raise
        :class:`QuantStateError` naming ``prefix`` and the key.
        """
        try:
            return cls._read_bnb(state_dict, prefix)
        except QuantStateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RuntimeError) as exc:
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise QuantStateError(f"bitsandbytes weight {prefix!r}: {detail}") from exc

    @classmethod
    def _read_bnb(cls, state_dict: dict[str, torch.Tensor], prefix: str) -> NF4Tensor:
        def need(key: str) -> torch.Tensor:
            if key not in state_dict:
                raise QuantStateError(f"missing key {key!r} in the bitsandbytes state dict")
            if not isinstance(state_dict[key], torch.Tensor):
                raise QuantStateError(f"{key!r} is a {type(state_dict[key]).__name__}, not a tensor")
            return state_dict[key]

        packed = need(prefix)
        qs_key = f"{prefix}.quant_state.bitsandbytes__nf4"
        if qs_key not in state_dict:
            if f"{prefix}.quant_state.bitsandbytes__fp4" in state_dict:
                raise InputError(f"{prefix} is FP4-quantized; xkern reads NF4 only")
            raise QuantStateError(f"missing key {qs_key!r}: {prefix} is not an NF4 bitsandbytes weight")
        try:
            meta = json.loads(bytes(need(qs_key).cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QuantStateError(f"corrupt quant state in {qs_key!r}: {exc}") from exc
        if not isinstance(meta, dict):
            raise QuantStateError(f"quant state {qs_key!r} must be a JSON object, got {type(meta).__name__}")
        for key, kinds in (("shape", list), ("dtype", str), ("blocksize", int)):
            if not isinstance(meta.get(key), kinds) or isinstance(meta.get(key), bool):
                raise QuantStateError(f"quant state {qs_key!r}: {key}={meta.get(key)!r} is missing or of the wrong "
                                      "type")
        if not meta["shape"] or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                        for d in meta["shape"]):
            raise QuantStateError(f"quant state {qs_key!r}: shape={meta['shape']!r} must be positive integers")
        if meta.get("quant_type") != "nf4":
            raise InputError(f"{prefix}: quant_type {meta.get('quant_type')!r}, expected 'nf4'")
        quant_map = need(f"{prefix}.quant_map").float().cpu()
        if not torch.equal(quant_map, _nf4_code_cpu()):
            raise InputError(f"{prefix}.quant_map is not the NF4 code table")
        dtype = getattr(torch, meta["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise QuantStateError(f"quant state {qs_key!r}: dtype={meta['dtype']!r} is not a torch dtype")
        if packed.dtype != torch.uint8:  # bitsandbytes allows other storage dtypes viewing the same bytes
            packed = packed.contiguous().view(torch.uint8)
        nested = {}
        if f"{prefix}.nested_absmax" in state_dict:
            if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
                raise InputError(f"{prefix}: nested blocksize {meta['nested_blocksize']} is not supported")
            if isinstance(meta["nested_offset"], bool) or not isinstance(meta["nested_offset"], (int, float)):
                raise QuantStateError(f"quant state {qs_key!r}: nested_offset={meta['nested_offset']!r} is not a "
                                      "number")
            nested = dict(
                absmax2=state_dict[f"{prefix}.nested_absmax"].float(),
                code2=need(f"{prefix}.nested_quant_map").float(),
                offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device),
            )
        return cls(packed=packed.reshape(-1), absmax=need(f"{prefix}.absmax"), shape=torch.Size(meta["shape"]),
                   dtype=dtype, blocksize=int(meta["blocksize"]), **nested)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``weight`` to NF4 exactly as bitsandbytes ``quantize_4bit(quant_type="nf4")`` does.

    ``double_quant`` is bitsandbytes' ``compress_statistics``.
    """
    if not isinstance(weight, torch.Tensor):
        raise InputTypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise InputTypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if blocksize not in VALID_BLOCKSIZES:
        raise InputError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if weight.numel() == 0:
        raise InputError("cannot quantize an empty weight")
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax_and_scaled(flat, blocksize)
    q = _nearest_code(scaled, nf4_code(flat.device))
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), 7)])  # bitsandbytes pads with 0.0, code 7
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Tensor(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
    offset = absmax.mean()
    absmax2, scaled2 = _blockwise_absmax_and_scaled(absmax - offset, NESTED_BLOCKSIZE)
    code2 = dynamic_code(flat.device)
    qabsmax = _nearest_code(scaled2, code2)
    # A nested block whose values all equal the mean (a single block, say) has scale 0: bitsandbytes
    # stores scale 0 and code 0 there, and dequantizes it to exactly ``offset``. Do the same.
    nested_block = torch.arange(qabsmax.numel(), device=flat.device) // NESTED_BLOCKSIZE
    degenerate = absmax2 <= 1e-38
    absmax2 = torch.where(degenerate, torch.zeros_like(absmax2), absmax2)
    qabsmax = torch.where(degenerate[nested_block], torch.zeros_like(qabsmax), qabsmax)
    return NF4Tensor(packed=packed, absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                     absmax2=absmax2, code2=code2, offset=offset)


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch reference dequantization: ``code[q] * absmax[block]`` in float32, then cast to ``dtype``."""
    if not isinstance(t, NF4Tensor):
        raise InputTypeError(f"expected an NF4Tensor, got {type(t).__name__}")
    values = torch.nn.functional.embedding(t.packed.int(), _nf4_byte_table_cpu().to(t.device)).view(-1)
    scales = t.block_scales()
    n, bs = t.numel, t.blocksize
    rem = n % bs
    full = n - rem
    if rem:
        out = torch.empty(n, dtype=torch.float32, device=t.device)
        out[:full] = (values[:full].view(-1, bs) * scales[: full // bs, None]).view(-1)
        out[full:] = values[full:n] * scales[-1]
    else:
        out = (values.view(-1, bs) * scales[:, None]).view(-1)
    return out.view(t.shape).to(dtype or t.dtype)
