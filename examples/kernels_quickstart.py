"""Quantize a random layer to NF4, run a mixed-adapter batch through the torch and Triton paths, compare.

    TRITON_INTERPRET=1 python examples/kernels_quickstart.py   # CPU: Triton in its interpreter
    python examples/kernels_quickstart.py                      # GPU
"""

import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import xkern  # noqa: E402
from xkern.ops import lora_linear  # noqa: E402


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    n, k, rank, n_adapters, m = 256, 512, 16, 4, 24
    weight = xkern.quantize_nf4(torch.randn(n, k) / k**0.5).to(device)
    lora_A = torch.randn(n_adapters, rank, k, device=device) / k**0.5
    lora_B = torch.randn(n_adapters, n, rank, device=device) * 0.1
    scale = torch.full((n_adapters,), 2.0, device=device)
    x = torch.randn(m, k, device=device)
    ids = torch.randint(-1, n_adapters, (m,), device=device)  # unsorted; -1 = base only
    print(f"NF4 weight {tuple(weight.shape)}: {weight.nbytes} bytes ({weight.nbytes / weight.numel:.4f} B/param)")
    outputs = {}
    for backend in ("torch", "triton"):
        t0 = time.perf_counter()
        outputs[backend] = lora_linear(x, weight, lora_A, lora_B, scale, ids, backend=backend)
        print(f"{backend:>6}: {(time.perf_counter() - t0) * 1e3:8.1f} ms")
    diff = (outputs["torch"] - outputs["triton"]).abs().max().item()
    print(f"max |torch - triton| = {diff:.2e} over a {m}-row batch with adapters {ids.tolist()}")


if __name__ == "__main__":
    main()
