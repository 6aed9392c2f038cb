"""``xkern.load_model``: a ``transformers`` model on an NF4 base with many LoRA adapters.

The wrapper keeps the ``transformers`` model intact (its attention, KV cache and ``generate``) and
only swaps linear layers for :class:`NF4LoRALinear`. Adapters are read and written in PEFT's format.
A forward takes one adapter name per sample, so a batch mixing adapters is one launch of the core
op per linear layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xkern.adapters.peft_format import (
    BASE,
    AdapterError,
    LoraAdapter,
    LoraWeights,
    check_config,
    default_config,
    is_target,
    module_rank_alpha,
    module_scale,
)
from xkern.adapters.peft_format import load_adapter as read_adapter
from xkern.adapters.peft_format import save_adapter as write_adapter
from xkern.errors import FormatError, InputError, InputKeyError, InputTypeError
from xkern.fileio import atomic_path, atomic_write_text
from xkern.nn.compat import cache_field, output_cache
from xkern.nn.linear import NF4LoRALinear
from xkern.nn.patch import linear_layers, quantize_linears
from xkern.nn.routing import SampleRouting, device_routings, routing_scope
from xkern.ops.checks import check_precision

_ATTN_DEFAULT = "sdpa"
# decoders whose forward is lm_head(final hidden states), nothing after the head (see XkernModel.logits_at)
_PLAIN_HEAD_DECODERS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def check_adapter_dtype(dtype: Any) -> None:
    """Adapter weights are float32, bfloat16 or float16 (the kernels read those), refused otherwise."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InputTypeError(f"adapter dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """The LM head's input made contiguous: ``logits_to_keep`` hands it ``hidden[:, -k:]``, a strided view
    that ``F.linear`` cannot fold into one matmul, so it runs a batched matmul over a copy of the head's
    weight per row (453 MB for SmolLM2 at 8 rows; every prefill and every generate step)."""
    x = args[0]
    return args if x.is_contiguous() else (x.contiguous(), *args[1:])


class XkernModel(nn.Module):
    """A ``transformers`` model whose linear layers run NF4 + a bank of LoRA adapters."""

    def __init__(self, model: nn.Module, layers: dict[str, NF4LoRALinear]) -> None:
        super().__init__()
        self.model = model
        self.adapter_configs: dict[str, dict[str, Any]] = {}
        self._layers = layers  # module name (inside self.model) -> layer; not registered twice
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, nn.Linear):
            head.register_forward_pre_hook(_contiguous_input)


    # ---- plumbing -------------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(iter(self._layers.values())).weight_packed.device

    @property
    def nf4_layers(self) -> dict[str, NF4LoRALinear]:
        return dict(self._layers)

    @property
    def precision(self) -> str:
        """How the NF4 layers multiply 16-bit activations (``xkern.ops.checks.PRECISIONS``)."""
        return next(iter(self._layers.values())).precision

    def set_precision(self, precision: str) -> None:
        """``"native"``: bf16/fp16 activations multiplied in their own dtype (the weight rounded to it once,
        float32 accumulation; bitsandbytes' ``compute_dtype`` and PEFT semantics, ~1e-3 of the output);
        ``"exact"``: float32 products (~1e-6 before the final rounding). float32 models are exact under both."""
        precision = check_precision(precision)
        for layer in self._layers.values():
            layer.precision = precision

    def routing(self, adapter_names: str | Sequence[str] | None, batch: int | None = None) -> SampleRouting | None:
        """The routing of one call: ``adapter_names`` checked (one per sample, or one for all); None = base only."""
        if adapter_names is None:
            return None
        if isinstance(adapter_names, str):
            if batch is None:
                raise InputError("a single adapter name needs input_ids (or inputs_embeds) to know the batch size")
            adapter_names = [adapter_names] * batch
        names = list(adapter_names)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise InputTypeError(f"adapter_names must be strings, got {type(bad[0]).__name__}")
        unknown = sorted({n for n in names if n != BASE and n not in self.adapter_configs})
        if unknown:
            raise InputKeyError(f"unknown adapter(s) {unknown}; loaded: {self.list_adapters()} (use {BASE!r} for none)")
        if batch is not None and len(names) != batch:
            raise InputError(f"adapter_names has {len(names)} entries for a batch of {batch}")
        return None if all(n == BASE for n in names) else SampleRouting(tuple(names))

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> int | None:
        for t in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
            if isinstance(t, torch.Tensor):
                return int(t.shape[0])
        return None

    def forward(self, *args: Any, adapter_names: str | Sequence[str] | None = None,
                logits_at: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names``: one per sample (``"__base__"``: none) or one for all.

        ``logits_at`` (a boolean ``[batch, seq]`` mask; decoders whose logits are the LM head of the
        final hidden states, see :attr:`supports_logits_at`): the output's ``logits`` are ``[P, vocab]``
        for the ``P`` selected positions only, in row-major order. Training and scoring need logits at
        their label positions only, and the LM head of a 49,152-word vocabulary is ~20% of SmolLM2's
        FLOPs per position.

        An empty batch (0 samples) returns the model's output with 0 rows (``transformers`` models
        cannot run one: the forward runs on one placeholder sample and the outputs are cut to 0 rows).
        """
        batch = self._batch_size(args, kwargs)
        routing = self.routing(adapter_names, batch)
        with self._running():
            if logits_at is not None:
                return self._selected_logits(args, kwargs, routing, logits_at)
            if batch == 0:
                return self._empty_forward(args, kwargs)
            with routing_scope(routing):
                return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Counts the forwards under way: adapters cannot be added, deleted or replaced while one runs (a hook
        that did it would get an output that is neither the adapter's nor the base's)."""
        self.__dict__["_forwards"] = self.__dict__.get("_forwards", 0) + 1
        try:
            yield
        finally:
            self.__dict__["_forwards"] -= 1

    def _check_not_running(self, what: str) -> None:
        if self.__dict__.get("_forwards", 0):
            raise InputError(f"cannot {what} while a forward or generate of this model runs")

    @property
    def supports_logits_at(self) -> bool:
        """Whether the wrapped model's logits are exactly ``lm_head(decoder(...).last_hidden_state)``: the plain
        decoder families (no logit scaling or soft-capping after the head)."""
        return type(self.model).__name__ in _PLAIN_HEAD_DECODERS

    def _selected_logits(self, args: tuple, kwargs: dict, routing: SampleRouting | None,
                         logits_at: torch.Tensor) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if not self.supports_logits_at:
            raise InputError(f"logits_at needs a plain decoder ({', '.join(sorted(_PLAIN_HEAD_DECODERS))}), "
                             f"got {type(self.model).__name__}")
        if args:
            raise InputError("logits_at needs keyword arguments (input_ids=..., attention_mask=...)")
        for key in ("labels", "logits_to_keep", "return_dict"):
            if kwargs.pop(key, None) is not None:
                raise InputError(f"logits_at computes only the selected logits: {key} cannot be combined with it")
        with routing_scope(routing):
            out = self.model.get_decoder()(**kwargs)
        hidden = out.last_hidden_state
        if logits_at.shape != hidden.shape[:2] or logits_at.dtype != torch.bool:
            raise InputError(f"logits_at must be a bool mask of shape {tuple(hidden.shape[:2])}, "
                             f"got {logits_at.dtype} {tuple(logits_at.shape)}")
        logits = self.model.get_output_embeddings()(hidden[logits_at.to(hidden.device)])
        return CausalLMOutputWithPast(logits=logits, **{cache_field(CausalLMOutputWithPast): output_cache(out)})

    def _empty_forward(self, args: tuple, kwargs: dict) -> Any:
        def one(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 0:
                return torch.zeros((1, *t.shape[1:]), dtype=t.dtype, device=t.device)
            return t

        def cut(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                return t[:0]
            if isinstance(t, tuple):
                return tuple(cut(v) for v in t)
            return None if t is not None and not isinstance(t, (int, float, str, bool)) else t

        with torch.no_grad():
            out = self.model(*(one(a) for a in args), **{k: one(v) for k, v in kwargs.items()})
        if isinstance(out, torch.Tensor):
            return cut(out)
        for key in list(out.keys()):
            out[key] = cut(out[key])
        return out

    @torch.no_grad()
    def generate(self, *args: Any, adapter_names: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``transformers`` ``generate`` (KV cache included), each prompt with its own adapter."""
        with self._running(), routing_scope(self.routing(adapter_names, self._batch_size(args, kwargs))):
            return self.model.generate(*args, **kwargs)

    @torch.no_grad()
    def capture_cuda_graph(self, input_ids: torch.Tensor, adapter_names: str | Sequence[str] | None = None,
                           warmup: int = 2, **kwargs: Any) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """One forward (a decode step) captured in a CUDA graph: ``(graph, logits)``.

        Write the next tokens into ``input_ids`` in place, call ``graph.replay()`` and read ``logits``.
        The warm-up runs on a side stream first, as capture requires: it compiles the kernels and fills
        the routing and bank caches, so the captured forward copies nothing from the host.
        """
        if input_ids.device.type != "cuda":
            raise InputError(f"a CUDA graph needs input_ids on a CUDA device, got {input_ids.device}")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self(input_ids, adapter_names=adapter_names, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self(input_ids, adapter_names=adapter_names, **kwargs).logits
        # the graph holds raw pointers into the banks and routing tables it read: they live as long as the graph,
        # whatever the caches evict or adapters change later (a replay computes the forward as captured)
        graph.xkern_resources = self.graph_resources()
        return graph, logits

    def graph_resources(self) -> tuple:
        """Every cached device tensor a forward reads without building it (adapter banks, row routings).

        :meth:`capture_cuda_graph` keeps these referenced from the graph, so memory a replay reads is never
        freed and handed to something else while the graph lives.
        """
        banks = tuple((layer._bank, layer._base_bank) for layer in self._layers.values())
        return banks, device_routings()

    # ---- adapters -------------------------------------------------------------------------------

    def list_adapters(self) -> list[str]:
        return list(self.adapter_configs)

    def _check_new_name(self, name: str) -> None:
        self._check_not_running(f"add adapter {name!r}")
        if not isinstance(name, str) or not name or "." in name or name == BASE:
            raise InputError(f"invalid adapter name {name!r} (non-empty, no '.', not {BASE!r})")
        if hasattr(nn.ParameterDict(), name):  # "train", "to", ...: the per-layer ParameterDicts refuse them
            raise InputError(f"invalid adapter name {name!r}: it is an attribute of torch.nn.Module")
        if name in self.adapter_configs:
            raise InputError(f"adapter {name!r} already loaded; delete_adapter({name!r}) first")

    def add_lora(self, name: str, adapter: LoraAdapter, dtype: torch.dtype = torch.float32) -> None:
        """Attach an in-memory adapter. Every module and shape is checked before any layer changes."""
        self._check_new_name(name)
        check_adapter_dtype(dtype)
        check_config(adapter.config)
        for module, w in adapter.modules.items():
            layer = self._layers.get(module)
            if layer is None:
                hint = " (it is not a linear layer of this model)" if module not in linear_layers(self.model) else (
                    " (load_model's target_modules left it unquantized)")
                raise AdapterError(f"adapter {name!r} targets module {module!r}, which is not an NF4 layer{hint}")
            try:
                layer.check_adapter_shapes(name, w.A, w.B)
            except ValueError as e:
                raise AdapterError(f"module {module!r}: {e}") from None
        for module, w in adapter.modules.items():
            self._layers[module].add_adapter(name, w.A, w.B, w.scale, dtype=dtype)
        self.adapter_configs[name] = dict(adapter.config)

    def load_adapter(self, path: str | os.PathLike, name: str, dtype: torch.dtype = torch.float32) -> None:
        """Load a PEFT adapter directory as ``name``; on any error the model is left as it was."""
        self._check_new_name(name)
        self.add_lora(name, read_adapter(path), dtype=dtype)

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float | None = None,
                    target_modules: str | Iterable[str] | None = None, *, use_rslora: bool = False,
                    rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                    init_lora_weights: bool | str = True, seed: int | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
        """Create a trainable adapter with PEFT's initialization (A Kaiming-uniform, B zero).

        ``target_modules``: PEFT's rule (a regex string or module-name suffixes); default every NF4
        layer. ``init_lora_weights``: ``True`` (B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or
        ``False`` (B random too: a non-trivial adapter, for tests).
        """
        self._check_new_name(name)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise InputError(f"r must be an integer >= 1, got {r!r}")
        check_adapter_dtype(dtype)
        if target_modules is None:
            target_modules = sorted({n.rsplit(".", 1)[-1] for n in self._layers})
        elif not isinstance(target_modules, str):
            target_modules = sorted(set(target_modules))
        modules = [n for n in self._layers if is_target(target_modules, n)]
        if not modules:
            raise AdapterError(f"target_modules={target_modules!r} matches no NF4 layer of this model")
        others = [n for n in linear_layers(self.model) if is_target(target_modules, n)]
        if others:  # PEFT would also wrap these plain linears: name the NF4 ones exactly instead
            target_modules = sorted(modules)
        config = default_config(r, r if lora_alpha is None else lora_alpha, target_modules, use_rslora=use_rslora,
                                rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                                init_lora_weights=init_lora_weights,
                                base_model_name_or_path=getattr(self.config, "_name_or_path", None) or None)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        adapter = LoraAdapter(config=config)
        for module in modules:
            layer = self._layers[module]
            rank, _ = module_rank_alpha(config, module)
            a = torch.empty(rank, layer.in_features)
            b = torch.zeros(layer.out_features, rank)
            if init_lora_weights == "gaussian":
                a.normal_(0.0, 1.0 / rank, generator=gen)
            elif init_lora_weights in (True, False):
                bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
                a.uniform_(-bound, bound, generator=gen)
                if init_lora_weights is False:
                    b_bound = 1.0 / math.sqrt(rank)
                    b.uniform_(-b_bound, b_bound, generator=gen)
            else:
                raise InputError(f"init_lora_weights={init_lora_weights!r}: expected True, False or 'gaussian'")
            adapter.modules[module] = LoraWeights(a, b, module_scale(config, module))
        self.add_lora(name, adapter, dtype=dtype)

    def get_adapter(self, name: str) -> LoraAdapter:
        """The adapter as a :class:`LoraAdapter` (detached CPU copies)."""
        if name not in self.adapter_configs:
            raise InputKeyError(f"unknown adapter {name!r}; loaded: {self.list_adapters()}")
        out = LoraAdapter(config=dict(self.adapter_configs[name]))
        for module, layer in self._layers.items():
            if name in layer.lora_A:
                out.modules[module] = LoraWeights(layer.lora_A[name].detach().cpu().clone(),
                                                  layer.lora_B[name].detach().cpu().clone(), layer.scales[name])
        return out

    def set_adapter_weights(self, name: str, saved: LoraAdapter, source: str = "the saved adapter") -> None:
        """Copy ``saved``'s factors into adapter ``name`` in place (its parameters, and an optimizer holding them,
        stay the same objects): a checkpoint resumed, a trained adapter continued. ``saved`` must target the same
        modules with the same shapes and scales; if anything differs nothing is copied."""
        self._check_not_running(f"set the weights of adapter {name!r}")
        if name not in self.adapter_configs:
            raise InputKeyError(f"unknown adapter {name!r}; loaded: {self.list_adapters()}")
        mine = {m for m, layer in self._layers.items() if name in layer.lora_A}
        if set(saved.modules) != mine:
            extra, missing = sorted(set(saved.modules) - mine), sorted(mine - set(saved.modules))
            raise AdapterError(f"{source} targets other modules than adapter {name!r}: "
                               f"{len(extra)} more (e.g. {extra[:2]}), {len(missing)} fewer (e.g. {missing[:2]})")
        for module, w in saved.modules.items():
            layer = self._layers[module]
            a, b = layer.lora_A[name], layer.lora_B[name]
            if a.shape != w.A.shape or b.shape != w.B.shape:
                raise AdapterError(f"{source}: {module} has A {tuple(w.A.shape)}, B {tuple(w.B.shape)}; adapter "
                                   f"{name!r} has A {tuple(a.shape)}, B {tuple(b.shape)} (another rank?)")
            if not math.isclose(w.scale, layer.scales[name], rel_tol=1e-6):
                raise AdapterError(f"{source}: {module} scales its update by {w.scale:g} (lora_alpha / r), adapter "
                                   f"{name!r} by {layer.scales[name]:g}")
        with torch.no_grad():
            for module, w in saved.modules.items():
                self._layers[module].lora_A[name].copy_(w.A)
                self._layers[module].lora_B[name].copy_(w.B)

    def save_adapter(self, name: str, path: str | os.PathLike) -> Path:
        """Write adapter ``name`` in PEFT's format (``PeftModel.from_pretrained`` loads it)."""
        return write_adapter(self.get_adapter(name), path)

    def delete_adapter(self, name: str) -> None:
        self._check_not_running(f"delete adapter {name!r}")
        if name not in self.adapter_configs:
            raise InputKeyError(f"unknown adapter {name!r}; loaded: {self.list_adapters()}")
        for layer in self._layers.values():
            layer.delete_adapter(name)
        del self.adapter_configs[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        if name not in self.adapter_configs:
            raise InputKeyError(f"unknown adapter {name!r}; loaded: {self.list_adapters()}")
        return [p for layer in self._layers.values() if name in layer.lora_A
                for p in (layer.lora_A[name], layer.lora_B[name])]

    def train_only(self, name: str) -> list[nn.Parameter]:
        """Freeze every parameter except adapter ``name``'s; returns the trainable ones."""
        for p in self.parameters():
            p.requires_grad_(False)
        params = self.adapter_parameters(name)
        for p in params:
            p.requires_grad_(True)
        return params

    # ---- base checkpoint ------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the base as an NF4 checkpoint that ``transformers`` + bitsandbytes load (adapters excluded)."""
        from safetensors.torch import save_file
        from transformers import BitsAndBytesConfig

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        layers = list(self._layers.values())
        double = {lay.weight_absmax2 is not None for lay in layers}
        blocks = {lay.blocksize for lay in layers}
        if len(double) != 1 or blocks != {64}:
            raise InputError("bitsandbytes checkpoints need blocksize 64 and one double-quant setting for all layers")
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self._layers.items():
            for key, t in layer.nf4_weight.to_bnb_state_dict(f"{name}.weight").items():
                tensors[key] = t.detach().cpu().contiguous()
            if layer.bias is not None:
                tensors[f"{name}.bias"] = layer.bias.detach().cpu().contiguous()
        seen: set[int] = set()
        for key, t in self.model.state_dict().items():
            if any(key.startswith(f"{n}.") for n in self._layers):
                continue
            ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if ptr in seen:  # tied weights (lm_head = embeddings) are stored once
                continue
            seen.add(ptr)
            tensors[key] = t.detach().cpu().contiguous()
        skip = sorted(linear_layers(self.model))  # everything still a plain linear (lm_head, heads)
        compute_dtype = next((t.dtype for t in self.model.parameters() if t.is_floating_point()), torch.float32)
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double.pop(), bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=skip or None)
        config = self.model.config.to_dict()
        config["quantization_config"] = qcfg.to_dict()
        config.pop("_name_or_path", None)
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        atomic_write_text(path / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        gen_cfg = getattr(self.model, "generation_config", None)
        if gen_cfg is not None and hasattr(gen_cfg, "save_pretrained"):
            gen_cfg.save_pretrained(path)
        return path

    def extra_repr(self) -> str:
        return f"nf4_layers={len(self._layers)}, adapters={self.list_adapters()}"


# ---- loading ------------------------------------------------------------------------------------


def _model_class(config: Any, model_class: Any) -> Any:
    import transformers

    if model_class is not None:
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM if getattr(config, "is_decoder", False) or config.model_type in (
        "llama", "mistral", "qwen2", "gpt2") else transformers.AutoModel


def _attn_kwargs(attn_implementation: str | None, device: torch.device | None) -> dict[str, Any]:
    if attn_implementation is not None:
        return {"attn_implementation": attn_implementation}
    import importlib.util

    if device is not None and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return {"attn_implementation": "flash_attention_2"}
    return {"attn_implementation": _ATTN_DEFAULT}


class _PackedGgufAdvice(logging.Filter):
    """Drops transformers' advice to load a GGUF in float32 to keep its weights packed: xkern dequantizes a
    GGUF's weights and re-quantizes them to NF4, so the packed kernels it speaks of never run here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "GGUF checkpoint with its weights packed" not in record.getMessage()


def _load_hf(source: str | os.PathLike, dtype: torch.dtype, model_class: Any, attn: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig

    from xkern.nn.pretrained import refuse_remote_code, resolve

    spec = resolve(str(source))
    path = Path(spec)
    refuse_remote_code(path)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False, **attn}
    if path.is_file():
        directory, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        directory = spec  # a directory, or a hub repo id when downloads are allowed
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False,
                                            **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{source}: not a readable transformers model ({first})") from e
    qcfg = getattr(config, "quantization_config", None)
    if isinstance(qcfg, dict) and qcfg.get("quant_method") == "bitsandbytes":
        if not qcfg.get("load_in_4bit") or qcfg.get("bnb_4bit_quant_type") != "nf4":
            raise InputError(f"{path}: only bitsandbytes 4-bit NF4 checkpoints are supported, got {qcfg}")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError("reading a bitsandbytes NF4 checkpoint needs `pip install bitsandbytes`") from e
    gguf_log, advice = logging.getLogger("transformers.quantizers.quantizer_gguf"), _PackedGgufAdvice()
    gguf_log.addFilter(advice)
    try:
        model = _model_class(config, model_class).from_pretrained(directory, **kwargs)
    finally:
        gguf_log.removeFilter(advice)
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None and "gguf_file" in kwargs:
        del cfg.quantization_config  # GGUF weights were dequantized on load; xkern re-quantizes them to NF4
    return model


_SLOW_BF16_SAID = False


def resolve_dtype(name: str | torch.dtype = "auto",
                  device: torch.device | str | None = None) -> tuple[torch.dtype, str]:
    """The compute dtype for ``name`` (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a dtype), and why.

    ``"auto"`` is bfloat16 where the hardware multiplies bf16 natively (a CPU with AVX512-BF16 or AMX, a
    CUDA GPU that supports bf16: two to three times the float32 rate here, the arithmetic of
    bitsandbytes and PEFT in bf16) and float32 elsewhere. bf16 asked for on a CPU without bf16
    instructions still works, through oneDNN's float32 emulation, and says so once.
    """
    global _SLOW_BF16_SAID
    from xkern.ops.backends.cpu_native import bf16_instructions

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(name, torch.dtype):
        dtype = name
    elif name == "auto":
        if dev.type == "cuda":
            ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return (torch.bfloat16, "auto: the GPU supports bf16") if ok else (torch.float32, "auto: no bf16 GPU")
        found = bf16_instructions()
        if found:
            return torch.bfloat16, f"auto: the CPU multiplies bf16 natively ({', '.join(found)})"
        return torch.float32, "auto: the CPU has no bf16 instructions (AVX512-BF16, AMX), float32 is faster there"
    elif name in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, name)
    else:
        raise InputError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {name!r}")
    if dtype == torch.bfloat16 and dev.type == "cpu" and not bf16_instructions() and not _SLOW_BF16_SAID:
        _SLOW_BF16_SAID = True
        logging.getLogger("xkern").warning("bfloat16 on a CPU without bf16 instructions (AVX512-BF16, AMX): it runs "
                                           "through float32 emulation, slower than float32")
    return dtype, "asked for"


def load_model(model_or_path: nn.Module | str | os.PathLike, quantize: str = "nf4", dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str | None = None, target_modules: str | Iterable[str] | None = None, *,
               model_class: Any = None, blocksize: int = 64, double_quant: bool = True,
               attn_implementation: str | None = None, progress: bool = True,
               precision: str = "native") -> XkernModel:
    """Wrap a ``transformers`` model with NF4 linear layers and an (empty) adapter bank.

    ``model_or_path``: a model directory (safetensors; a bitsandbytes NF4 checkpoint keeps its
    bytes), a ``.gguf`` file, or an ``nn.Module`` (converted in place). ``target_modules``: which
    linears become NF4 (PEFT's matching rules; default every linear inside a transformer block,
    leaving embeddings, ``lm_head`` and task heads in ``dtype``). ``dtype`` is the compute dtype.
    ``precision``: how the NF4 layers multiply 16-bit activations, ``"native"`` (in the compute
    dtype with float32 accumulation, as bitsandbytes and PEFT do) or ``"exact"`` (float32 products);
    see :meth:`XkernModel.set_precision`.
    """
    if quantize != "nf4":
        raise InputError(f"quantize={quantize!r}: only 'nf4' is supported")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputTypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    check_precision(precision)
    device = torch.device(device) if device is not None else None
    if isinstance(model_or_path, XkernModel):
        raise InputTypeError("model is already an XkernModel")
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        if any(isinstance(m, NF4LoRALinear) for m in model.modules()):
            raise InputTypeError("model already holds NF4LoRALinear layers")
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        if attn_implementation is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn_implementation)
    elif isinstance(model_or_path, (str, os.PathLike)):
        model = _load_hf(model_or_path, dtype, model_class, _attn_kwargs(attn_implementation, device))
    else:
        raise InputTypeError(f"model_or_path must be a path or an nn.Module, got {type(model_or_path).__name__}")
    layers = quantize_linears(model, target_modules, blocksize=blocksize, double_quant=double_quant,
                              device=device, progress=progress)
    for p in model.parameters():  # what stays dense computes in dtype too, whatever dtype a checkpoint recorded
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
        p.requires_grad_(False)
    if device is not None:
        model.to(device)
    model.eval()
    xm = XkernModel(model, layers)
    xm.set_precision(precision)
    return xm
