"""Small shared helpers for the kernel tests (dense float64 references built from first principles)."""

import torch


def dense_lora_reference(x, w_dense, lora_A, lora_B, scale, ids):
    """Row-by-row float64 ``x W^T + s[a] (x A[a]^T) B[a]^T``; differentiable in x, A, B."""
    rows = []
    for m in range(x.shape[0]):
        out = x[m].double() @ w_dense.double().T
        a = int(ids[m])
        if a >= 0:
            out = out + float(scale[a]) * (x[m].double() @ lora_A[a].double().T) @ lora_B[a].double().T
        rows.append(out)
    return torch.stack(rows)
