"""GPU compile checks without a GPU: Triton compiles for sm_80 / sm_90a ahead of time and its bundled ptxas
and cuobjdump report registers, spills, shared memory and SASS (bench/gpu_compile_check.py).

CI cost: the full matrix (every kernel x launcher configuration x dtype x arch, a few hundred
compilations, ~15 min on 2 cores) runs in the script, which writes the committed
bench/results/gpu-compile-check.json. Here: (1) the committed table must list exactly the launchers'
current configurations and pass every check, so a launcher change without a fresh table fails;
(2) the launchers pick only configurations of that table; (3) a representative subset -- one case per
kernel and path, including the cases that used to fail -- is compiled now and must pass the same
checks (and reproduce the table's numbers under the Triton version that wrote it). ~1 minute.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script

pytest.importorskip("triton")
from xkern.ops.backends import triton_jit as tri  # noqa: E402

CASES = load_script("bench/compile_cases.py")

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "bench" / "results" / "gpu-compile-check.json"
ARCHS = {"sm_80": 80, "sm_90a": 90}


def _check_module():
    return load_script("bench/gpu_compile_check.py")


def _key(kernel, path, config, dtype, arch):
    return kernel, path, json.dumps(config, sort_keys=True), dtype, arch


def test_committed_table_lists_every_launcher_configuration_and_passes():
    doc = json.loads(TABLE.read_text())
    have = {_key(r["kernel"], r["path"], r["config"], r["dtype"], r["arch"]) for r in doc["records"]}
    want = {_key(c.kernel, c.path, c.config, c.dtype, a) for c in CASES.compile_cases() for a in ARCHS}
    assert have == want, (f"rerun bench/gpu_compile_check.py: missing {sorted(want - have)[:3]}, "
                          f"stale {sorted(have - want)[:3]}")
    # every case compiled (X-Cross n = 8 used to take ptxas 5-8 minutes and was recorded as skipped)
    assert not [r for r in doc["records"] if r.get("skipped")]
    assert all(r["compiles"] for r in doc["records"])
    assert _check_module().problems(doc["records"]) == [] and doc["problems"] == []
    for r in doc["records"]:
        assert r["shared_bytes"] <= r["shared_limit"]
        assert r["path"] in ("decode", "mid", "mid-unaligned", "mid-odd", "large", "shrink", "dequantize") \
            or r["path"].startswith("xcross-n")


def test_launchers_pick_only_checked_configurations(monkeypatch):
    monkeypatch.setattr(tri, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        checked = {tuple(sorted((k, v) for k, v in c.config.items() if k in ("BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                                             "num_warps", "num_stages")))
                   for c in CASES.compile_cases() if c.kernel == "nf4_lora_kernel" and c.dtype == name}
        shrink = {(c.config["BLOCK_M"], c.config["BLOCK_K"]) for c in CASES.compile_cases()
                  if c.kernel == "lora_shrink_kernel" and c.dtype == name}
        for m in (1, 3, 16, 17, 64, 256, 257, 4096):
            # aligned, odd and block-unaligned weights (the last two take their own mid tiles)
            for n, k, w_cols in ((4096, 4096, None), (512, 4096, 4096), (14336, 4096, 4096), (4096, 14336, None),
                                 (72, 200, 200), (72, 201, 201), (4096, 4100, 4100), (4100, 4096, 4100)):
                cfg = tri.default_config(m, n, k, cuda, dtype, w_cols)
                got = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "num_warps": cfg.num_warps,
                       "num_stages": cfg.num_stages}
                if not cfg.dequant_base:
                    got["BLOCK_K"] = cfg.block_k
                assert tuple(sorted(got.items())) in checked, (m, n, k, dtype, cfg)
                assert (cfg.shrink_m, cfg.shrink_k) in shrink
                assert 1 <= cfg.split_k <= 16
    xc = {(c.config["n"], c.config["BLOCK_D"], c.config["num_stages"]) for c in CASES.compile_cases()
          if c.kernel == "xcross_fwd_kernel"}
    for n in range(2, 9):
        cfg = tri.xcross_default_config(n, 4096, cuda)
        n_checked = min(x for x, _, _ in xc if x >= n)  # same N_PAD -> same tiles
        assert (n_checked, cfg.block_d, cfg.num_stages) in xc, (n, cfg)


def test_mid_tiles_follow_the_weight_layout(monkeypatch):
    """Odd and block-unaligned weights take the mid tiles the compile check found spill-free for them."""
    monkeypatch.setattr(tri, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert tri.weight_layout(201, 64) == "-odd" and tri.weight_layout(4100, 64) == "-unaligned"
    assert tri.weight_layout(4096, 64) == tri.weight_layout(None, 64) == ""
    for paths, dtype in ((tri.PATHS, torch.bfloat16), (tri.PATHS_FP32, torch.float32)):
        assert tri.default_config(64, 72, 201, cuda, dtype, 201) == paths["mid-odd"] != paths["mid"]
        assert tri.default_config(64, 4096, 4100, cuda, dtype, 4100) == paths["mid-unaligned"] != paths["mid"]
        assert tri.default_config(64, 4096, 4096, cuda, dtype, 4096) == paths["mid"]
        decode = tri.default_config(4, 4096, 4100, cuda, dtype, 4100)  # the decode path has one layout
        assert (decode.block_n, decode.block_k) == (paths["decode"].block_n, paths["decode"].block_k)


# one case per kernel and path, both archs, the cases that used to fail (no-LoRA decode, X-Cross n=4 fp32, n=8)
SUBSET = [
    ("nf4_lora_kernel", "decode", {"direction": "forward", "rank": 0, "SPLIT_K": 2}, "bfloat16", "sm_80"),
    ("nf4_lora_kernel", "decode", {"direction": "input_grad", "rank": 16, "SPLIT_K": 1}, "float16", "sm_90a"),
    ("nf4_lora_kernel", "mid", {"direction": "forward", "rank": 64}, "bfloat16", "sm_90a"),
    ("nf4_lora_kernel", "large", {"direction": "input_grad", "rank": 64}, "float32", "sm_80"),
    ("lora_shrink_kernel", "shrink", {"rows": "mid", "rank": 64}, "bfloat16", "sm_80"),
    ("nf4_dequantize_kernel", "dequantize", {}, "bfloat16", "sm_90a"),
    ("xcross_fwd_kernel", "xcross-n4", {}, "float32", "sm_80"),
    ("xcross_bwd_kernel", "xcross-n4", {}, "bfloat16", "sm_90a"),
    ("xcross_bwd_kernel", "xcross-n8", {}, "bfloat16", "sm_80"),
]


def _find(kernel, path, sub, dtype) -> int:
    for i, c in enumerate(CASES.compile_cases()):
        if (c.kernel, c.path, c.dtype) == (kernel, path, dtype) and all(c.config.get(k) == v for k, v in sub.items()):
            return i
    raise AssertionError(f"no case {kernel} {path} {sub} {dtype}")


_COMPILE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import gpu_compile_check as check
from compile_cases import compile_cases
cases = compile_cases()
print(json.dumps([check.compile_one(cases[i], arch) for i, arch in json.loads(sys.argv[2])]))
"""


@pytest.fixture(scope="module")
def compiled():
    """The subset compiled in one child process: under TRITON_INTERPRET=1 (set by conftest for the CPU tests)
    ``@triton.jit`` gives interpreted functions, which ``triton.compile`` cannot take."""
    items = [(_find(k, p, sub, d), ARCHS[a]) for k, p, sub, d, a in SUBSET]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(ROOT / "bench"), json.dumps(items)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    cases = CASES.compile_cases()
    return {(k, p, d, a): (cases[i], r) for (k, p, _, d, a), (i, _), r in zip(SUBSET, items, records, strict=True)}


@pytest.mark.parametrize("kernel,path,sub,dtype,arch", SUBSET, ids=[f"{k}-{p}-{d}-{a}" for k, p, _, d, a in SUBSET])
def test_representative_compilations_pass_the_checks(kernel, path, sub, dtype, arch, compiled):
    check = _check_module()
    case, rec = compiled[(kernel, path, dtype, arch)]
    assert rec["compiles"], rec.get("error")
    assert check.problems([rec]) == []
    assert rec["shared_bytes"] <= rec["shared_limit"]
    if kernel.startswith("xcross_"):  # was 400 s of ptxas at n = 8 (register tiles of coefficient products)
        assert rec["compile_s"] < 120 and not rec["spill_bytes"], rec
    doc = json.loads(TABLE.read_text())
    import triton
    if doc["triton"] == triton.__version__:  # the same compiler reproduces the committed numbers
        (row,) = [r for r in doc["records"] if _key(r["kernel"], r["path"], r["config"], r["dtype"], r["arch"])
                  == _key(case.kernel, case.path, case.config, case.dtype, arch)]
        assert (rec["regs"], rec["spill_bytes"], rec["shared_bytes"]) == (row["regs"], row["spill_bytes"],
                                                                         row["shared_bytes"])
