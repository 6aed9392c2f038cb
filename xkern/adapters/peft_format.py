"""LoRA adapters in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).

An adapter is held in memory as a :class:`LoraAdapter`: the PEFT config (a plain dict) and, per
targeted module, ``A [r, K]``, ``B [N, r]`` (PEFT's ``lora_A.weight`` / ``lora_B.weight``) and the
scale ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Module names are paths inside the wrapped
``transformers`` model (``model.layers.0.self_attn.q_proj``); on disk PEFT prefixes them with
``base_model.model.``. Features xkern does not run are refused with the config field named, before
anything is loaded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch

from xkern.errors import FormatError, NotFoundError
from xkern.fileio import atomic_path, atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BASE = "__base__"  # the adapter name meaning "no adapter" (PEFT's name for it in a mixed batch)


class AdapterError(FormatError):
    """An adapter that cannot be loaded, saved or applied (the message names the field or module)."""


@dataclass
class LoraWeights:
    """One module's LoRA factors: ``delta W = scale * B @ A``."""

    A: torch.Tensor  # [r, K]
    B: torch.Tensor  # [N, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight delta ``scale * B @ A`` ``[N, K]``."""
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scale


@dataclass
class LoraAdapter:
    """A LoRA adapter: its PEFT config and the factors of every module it targets."""

    config: dict[str, Any]
    modules: dict[str, LoraWeights] = field(default_factory=dict)


# Config fields whose non-default values change what the adapter computes and that xkern does not run.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "lora_bias": False,
    "use_qalora": False,
    "megatron_config": None,
    "alora_invocation_tokens": None,
}


def _empty(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _check_types(config: Mapping[str, Any]) -> None:
    """Fields xkern computes with must have the JSON types PEFT writes; a damaged file is named, not crashed on."""
    def number(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterError(f"{key}={value!r} must be a finite number")

    if "r" in config and (isinstance(config["r"], bool) or not isinstance(config["r"], int)):
        raise AdapterError(f"r={config['r']!r} must be an integer")
    if "lora_alpha" in config:
        number("lora_alpha", config["lora_alpha"])
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterError(f"{key}={patterns!r} must be a JSON object")
        for name, value in patterns.items():
            number(f"{key}[{name!r}]", value)
            if key == "rank_pattern" and (not float(value).is_integer() or value <= 0):
                raise AdapterError(f"{key}[{name!r}]={value!r} must be a positive integer")
            try:
                regex.compile(name)
            except regex.error as e:
                raise AdapterError(f"{key} key {name!r} is not a valid regular expression: {e}") from e
    targets = config.get("target_modules")
    if targets is not None and not (isinstance(targets, str) or (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"target_modules={targets!r} must be a string (regex) or a list of strings")
    if isinstance(targets, str):
        try:
            regex.compile(targets)
        except regex.error as e:
            raise AdapterError(f"target_modules={targets!r} is not a valid regular expression: {e}") from e
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if key in config and config[key] is not None and not isinstance(config[key], bool):
            raise AdapterError(f"{key}={config[key]!r} must be true or false")


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse a PEFT config xkern cannot run exactly, naming the offending field."""
    _check_types(config)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"peft_type={config.get('peft_type')!r} is not supported (only LORA)")
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"bias={bias!r} is not supported (LoRA bias terms); only bias='none'")
    for key in _UNSUPPORTED:
        if not _empty(config.get(key)):
            raise AdapterError(f"{key}={config.get(key)!r} is not supported by xkern")
    if int(config.get("r", 8)) <= 0:
        raise AdapterError(f"r must be positive, got {config.get('r')}")
    if config.get("target_modules") in (None, [], ""):
        raise AdapterError("target_modules is empty")


# A pattern from an adapter config is matched under a time bound: a crafted one ("(.*.*)*X") would otherwise
# backtrack for minutes on one module name. `regex` (already a dependency of transformers) takes re's syntax.
PATTERN_SECONDS = 0.25


def _bounded(pattern: str, text: str, full: bool, what: str) -> bool:
    try:
        found = (regex.fullmatch if full else regex.match)(pattern, text, timeout=PATTERN_SECONDS)
    except TimeoutError:
        raise AdapterError(f"{what} pattern {pattern!r} takes too long to match {text!r} (catastrophic "
                           "backtracking); give a simpler pattern") from None
    return found is not None


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any, what: str = "rank_pattern") -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if _bounded(rf"(.*\.)?({key})$", module, False, what):
            return value
    return default


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    r = int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8), "rank_pattern"))
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8), "alpha_pattern"))
    return r, alpha


def module_scale(config: Mapping[str, Any], module: str) -> float:
    r, alpha = module_rank_alpha(config, module)
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def is_target(target_modules: str | Iterable[str], module: str) -> bool:
    """PEFT's rule: a string is a full regex match; a list matches a name or a dotted suffix."""
    if isinstance(target_modules, str):
        return _bounded(target_modules, module, True, "target_modules")
    return any(module == t or module.endswith("." + t) for t in target_modules)


def default_config(r: int, lora_alpha: float, target_modules: str | list[str], **extra: Any) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` dict with PEFT's defaults for the fields xkern writes."""
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "r": int(r),
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules if isinstance(target_modules, str) else sorted(set(target_modules)),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
    }
    cfg.update(extra)
    return cfg


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise NotFoundError(f"{cfg_file} not found (a PEFT adapter directory holds {CONFIG_NAME})")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file} must hold a JSON object")
    check_config(config)
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        bin_file = path.with_name("adapter_model.bin")
        hint = f" ({bin_file.name} exists: re-save it with safe_serialization=True)" if bin_file.exists() else ""
        raise NotFoundError(f"{path} not found{hint}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated or corrupt file
        raise AdapterError(f"cannot read {path}: {e} (the file is corrupt or truncated)") from e


_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<name>[^.]+))?\.weight$")


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory into memory (CPU tensors), checking it is complete.

    Every refusal names the directory (an :class:`AdapterError`, or :class:`NotFoundError` for missing files).
    """
    try:
        return _load_adapter(Path(path))
    except AdapterError as e:
        if str(path) in str(e):
            raise
        raise AdapterError(f"adapter {path}: {e}") from e


def _load_adapter(path: Path) -> LoraAdapter:
    if not path.is_dir():
        raise NotFoundError(f"adapter directory {path} not found")
    config = read_config(path)
    tensors = _read_tensors(path / WEIGHTS_NAME)
    a_of: dict[str, torch.Tensor] = {}
    b_of: dict[str, torch.Tensor] = {}
    for key in tensors:  # name the feature, not just the first unexpected key
        if "lora_embedding_" in key:
            raise AdapterError(f"{key}: embedding adapters (lora_embedding_A/B) are not supported")
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{key}: DoRA weights (use_dora) are not supported")
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{key}: not a LoRA weight (modules_to_save or trainable tokens are not supported)")
        module = m["module"].removeprefix(PEFT_PREFIX)
        (a_of if m["which"] == "A" else b_of)[module] = t
    if not a_of:
        raise AdapterError(f"{path / WEIGHTS_NAME} holds no LoRA weights")
    if set(a_of) != set(b_of):
        missing = sorted(set(a_of) ^ set(b_of))
        raise AdapterError(f"lora_A and lora_B do not pair up for module(s) {missing[:4]}")
    adapter = LoraAdapter(config=config)
    for module in sorted(a_of):
        a, b = a_of[module], b_of[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain")
        r, _ = module_rank_alpha(config, module)
        if a.shape[0] != r:
            raise AdapterError(f"{module}: lora_A has rank {a.shape[0]}, the config (r / rank_pattern) says {r}")
        if not a.dtype.is_floating_point or not b.dtype.is_floating_point:
            raise AdapterError(f"{module}: LoRA weights must be floating point, got {a.dtype} / {b.dtype}")
        adapter.modules[module] = LoraWeights(a, b, module_scale(config, module))
    return adapter


def save_adapter(adapter: LoraAdapter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` as a PEFT directory (``PeftModel.from_pretrained`` loads it)."""
    from safetensors.torch import save_file

    check_config(adapter.config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, w in sorted(adapter.modules.items()):
        r, _ = module_rank_alpha(adapter.config, module)
        expected = module_scale(adapter.config, module)
        if w.rank != r or not math.isclose(w.scale, expected, rel_tol=1e-6):
            raise AdapterError(f"{module}: rank {w.rank} / scale {w.scale} disagree with the config's r={r} / "
                               f"scale {expected} (set rank_pattern / alpha_pattern): PEFT would load it wrongly")
        a = w.A.detach().to("cpu", dtype or w.A.dtype).contiguous()
        b = w.B.detach().to("cpu", dtype or w.B.dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    with atomic_path(path / WEIGHTS_NAME) as tmp:  # an interrupted save leaves the previous files whole
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(path / CONFIG_NAME, json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    return path
