"""What each process holds when a LoRA trains over an NF4 base: 1 process, 2 under DDP, 2 under FSDP.

    python bench/bench_fsdp_memory.py      # writes bench/results/fsdp-memory-cpu.json

Counted per rank after a few optimizer steps of `train_lora` (a random Llama: hidden 512, 4 blocks,
vocabulary 16k, LoRA r 16 on every linear layer; gloo, one thread per process): bytes of the NF4
buffers, of the other frozen parameters (embeddings, norms, lm_head), of the trainable parameters,
of their gradients and of the optimizer state (what lives on the rank: a DTensor counts its local
shard), and the mean seconds per step. Plus, computed from shapes and not measured, the same split
for Qwen2-7B (WeaveRec's base) with LoRA r 16 on every linear layer in bf16, at 1 and 8 ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "fsdp-memory-cpu.json"
STEPS = 6

WORKER = r'''
import json, os, sys, time
import torch, transformers
import xkern
from xkern.train import train_lora

torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
xm = xkern.load_model(transformers.LlamaForCausalLM(cfg), dtype=torch.float32, progress=False)
xm.add_adapter("a", r=16, lora_alpha=32, seed=0)
g = torch.Generator().manual_seed(0)
examples = [{"input_ids": torch.randint(0, 16000, (64,), generator=g).tolist()} for _ in range(64)]
held = {}
times = []

def local(t):
    return t.to_local() if hasattr(t, "to_local") else t

def nbytes(ts):
    return sum(local(t).numel() * local(t).element_size() for t in ts)

opt_ref = {}
orig_step = torch.optim.AdamW.step
def step(self, *a, **k):
    out = orig_step(self, *a, **k)
    opt_ref["opt"] = self
    return out
torch.optim.AdamW.step = step

def callback(s, loss):
    times.append(time.perf_counter())
    if s == 2:
        trainable = [p for p in xm.parameters() if p.requires_grad]
        held["trainable"] = nbytes(trainable)
        held["grads"] = nbytes([p.grad for p in trainable if p.grad is not None])
        held["frozen_params"] = nbytes([p for p in xm.parameters() if not p.requires_grad])
        held["nf4_buffers"] = nbytes([b for n, b in xm.named_buffers() if ".weight_" in n])
        held["all_buffers"] = nbytes(list(xm.buffers()))
        held["optimizer_state"] = nbytes([v for st in opt_ref["opt"].state.values() for v in st.values()
                                          if torch.is_tensor(v) and v.dim() > 0])

bs = int(sys.argv[1])
train_lora(xm, "a", examples, batch_size=bs, max_steps=STEPS_HERE, lr=1e-3, progress=False,
           parallel=sys.argv[2], callback=callback)
held["seconds_per_step"] = (times[-1] - times[0]) / (len(times) - 1)
if os.environ.get("RANK", "0") == "0":
    print("HELD " + json.dumps(held))
'''.replace("STEPS_HERE", str(STEPS))


def run(procs: int, parallel: str, tmp: Path) -> dict:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29581"]
    proc = subprocess.run([*launch, str(script), str(8 // procs), parallel], env=env, capture_output=True,
                          text=True, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    held = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("HELD "))[5:])
    return {"processes": procs, "parallel": parallel if procs > 1 else "-", "batch_per_rank": 8 // procs, **held}


def qwen2_7b(ranks: int, fsdp: bool, r: int = 16) -> dict:
    """Bytes per rank for Qwen2-7B (shapes from its config.json), NF4 linear layers, bf16 rest, LoRA r on all."""
    hidden, inter, layers, vocab, heads, kv_heads = 3584, 18944, 28, 152064, 28, 4
    head_dim = hidden // heads
    linears = [(hidden, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden), (hidden, hidden),
               (inter, hidden), (inter, hidden), (hidden, inter)]  # (out, in): q k v o gate up down
    n_weights = layers * sum(o * i for o, i in linears)
    nf4 = n_weights // 2 + n_weights // 64 + n_weights // (64 * 256) * 4  # codes, absmax codes, second-level scales
    frozen = 2 * (2 * vocab * hidden + (2 * layers + 1) * hidden)  # embeddings, untied lm_head, norms (bf16)
    lora = layers * sum(r * (o + i) for o, i in linears)
    share = ranks if fsdp else 1
    return {"processes": ranks, "parallel": "fsdp" if fsdp else ("ddp" if ranks > 1 else "-"), "nf4_buffers": nf4,
            "frozen_params": frozen // share, "trainable": 4 * lora // share, "grads": 4 * lora // share,
            "optimizer_state": 8 * lora // share}


def main() -> int:
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(1, "ddp", Path(tmp)), run(2, "ddp", Path(tmp)), run(2, "fsdp", Path(tmp))]
    computed = [qwen2_7b(1, False), qwen2_7b(8, False), qwen2_7b(8, True)]
    OUT.write_text(json.dumps({"machine": "2-core CPU VM, gloo, 1 thread per process",
                               "model": "random Llama, hidden 512, 4 blocks, vocab 16000, untied lm_head; LoRA r 16 "
                                        "on every linear layer; float32; 8 examples of 64 tokens per step",
                               "steps": STEPS, "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                               "runs": runs, "computed_qwen2_7b": computed}, indent=2) + "\n")
    for r in runs:
        print(json.dumps(r))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
