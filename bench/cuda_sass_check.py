"""SASS of the CUDA decode kernels (csrc/nf4_lora_decode.cu) without a GPU: registers, spills and the main
loop's instructions per decoded weight element, for sm_80 and sm_90a, before and after a change.

nvcc (any machine with the toolkit) compiles the launchers to a cubin per architecture with the flags torch's
extension build uses; ``ptxas -v`` gives registers and spills, ``cuobjdump -sass`` (shipped with Triton) the
machine code. The main loop is the backward-branch span holding the most tensor-core (HMMA) and shared-memory
(LDS) instructions; a thread decodes ``HMMA x 8 / NH`` weight elements per iteration of the tensor-core
kernel (one m16n8k16 step takes a 16 x 16 weight tile, 8 elements a thread, shared by NH row halves) and
``RW x 32`` per window of the CUDA-core kernels. "Before" is the csrc of a git commit.

Issue-bound ceiling (no GPU ran this): an SM issues at most 4 warp-instructions (128 thread-instructions) per
clock, so ``p`` instructions per element decode at most ``128 / p`` elements per clock per SM; times the H200's
132 SMs x 1.98 GHz x 0.516 bytes per element (NF4 code, absmax byte, absmax2 share) gives the weight
bandwidth the instruction stream allows before any memory stall.

    python bench/cuda_sass_check.py --before-commit f25717a --out bench/results/cuda-decode-sass.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from gpu_compile_check import (  # noqa: E402
    BYTES_PER_ELEMENT,
    H200_GHZ,
    H200_HBM_TBS,
    H200_SMS,
    ISSUE_PER_CLOCK,
    _bin,
    issue_bound_tbs,
    sass_main_loop,
)

ARCHS = ("80", "90a")
# what torch's extension build adds to every nvcc call
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
_KERNEL = re.compile(r"_ZN5xkern6decode\d+(?P<name>nf4_lora_mma_kernel|nf4_lora_gemv_kernel)I"
                     r"(?P<dtype>6__half|13__nv_bfloat16)(?P<args>(?:L[ib]\d+E)+)E")
_ARG = re.compile(r"L([ib])(\d+)E")


def _nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        raise SystemExit("nvcc not found: put the CUDA toolkit's bin/ on PATH")
    return path


def nvcc_version() -> str:
    out = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def csrc_at(commit: str, dest: Path) -> Path:
    """The csrc/ of ``commit`` extracted under ``dest``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "csrc"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "csrc"


def _parse_kernel(mangled: str) -> dict | None:
    m = _KERNEL.search(mangled)
    if not m:
        return None
    args = [int(v) for _, v in _ARG.findall(m.group("args"))]
    dtype = "float16" if m.group("dtype") == "6__half" else "bfloat16"
    if m.group("name") == "nf4_lora_mma_kernel":
        nh, gk, dq = args
        return {"kernel": "nf4_lora_mma_kernel", "dtype": dtype, "rows": "1-8" if nh == 1 else "9-16", "nh": nh,
                "gk": gk, "double_quant": bool(dq), "path": "tensor-core"}
    mt, rw = args[0], args[1]
    vec = bool(args[2]) if len(args) > 2 else False
    rows = {1: "1", 2: "2", 4: "3-4", 8: "5-8", 16: "9-16"}[mt] if vec else "1-16"
    return {"kernel": "nf4_lora_gemv_kernel", "dtype": dtype, "rows": rows, "mt": mt, "rw": rw,
            "path": "cuda-core" if vec else "generic"}


def measure(csrc: Path, arch: str, workdir: Path) -> list[dict]:
    """Compile ``csrc/nf4_lora_decode.cu`` for ``arch`` and measure every GEMV kernel in it."""
    cubin = workdir / f"decode.sm_{arch}.cubin"
    cmd = [_nvcc(), "-cubin", "-std=c++17", "-O3", "--use_fast_math", *TORCH_NVCC_FLAGS,
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-I", str(csrc), "-o", str(cubin),
           str(csrc / "nf4_lora_decode.cu")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
    ptxas: dict[str, dict] = {}
    current = None
    for line in (res.stdout + res.stderr).splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            continue
        if current:
            spill = re.search(r"(\d+) bytes spill stores", line)
            regs = re.search(r"Used (\d+) registers", line)
            if spill:
                ptxas.setdefault(current, {})["spill_bytes"] = int(spill.group(1))
            if regs:
                ptxas.setdefault(current, {})["regs"] = int(regs.group(1))
    sass_all = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    records = []
    for block in re.split(r"\n\s*Function : ", sass_all)[1:]:
        mangled = block.split()[0]
        info = _parse_kernel(mangled)
        if info is None:
            continue
        loop = sass_main_loop(block, prefer=("HMMA", "LDS"))
        if info["kernel"] == "nf4_lora_mma_kernel":
            elements = loop["by_class"].get("mma", 0) * 8 // info["nh"]
        else:
            elements = info["rw"] * 32
        per = round(loop["instructions"] / elements, 2) if elements else None
        tbs = issue_bound_tbs(per) if per else None
        records.append({**info, "arch": f"sm_{arch}", "mangled": mangled, **ptxas.get(mangled, {}),
                        "loop_instructions": loop["instructions"], "by_class": loop["by_class"],
                        "elements_per_thread_iteration": elements, "per_element": per,
                        "issue_bound_tbs": round(tbs, 2) if tbs else None,
                        "fraction_of_hbm": round(tbs / H200_HBM_TBS, 3) if tbs else None})
    return sorted(records, key=lambda r: (r["kernel"], r["dtype"], r["rows"], r.get("gk", 0),
                                          r.get("double_quant", False)))


def run(before_commit: str | None, archs=ARCHS) -> dict:
    doc: dict = {"nvcc": nvcc_version(), "archs": [f"sm_{a}" for a in archs], "created": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "hbm_tbs": H200_HBM_TBS, "sms": H200_SMS, "ghz": H200_GHZ,
        "bytes_per_element": round(BYTES_PER_ELEMENT, 5), "issue_per_clock": ISSUE_PER_CLOCK, "states": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"after": ROOT / "csrc"}
        if before_commit:
            sources = {"before": csrc_at(before_commit, Path(tmp) / "before"), **sources}
            doc["before_commit"] = before_commit
        for state, csrc in sources.items():
            work = Path(tmp) / state
            work.mkdir(exist_ok=True)
            doc["states"][state] = [r for a in archs for r in measure(csrc, a, work)]
    return doc


def problems(doc: dict, max_per_element: float = 4.0) -> list[str]:
    """What the tensor-core kernel must meet: no spills, at most ``max_per_element`` SASS per element."""
    out = []
    for r in doc["states"]["after"]:
        name = f"{r['mangled']} {r['arch']}"
        if r.get("spill_bytes"):
            out.append(f"{name}: {r['spill_bytes']} bytes of spills")
        if r["kernel"] == "nf4_lora_mma_kernel" and (r["per_element"] is None or r["per_element"] > max_per_element):
            out.append(f"{name}: {r['per_element']} SASS instructions per element (target <= {max_per_element})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-commit", help="also measure csrc/ as of this git commit ('before')")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cuda-decode-sass.json")
    args = ap.parse_args(argv)
    doc = run(args.before_commit)
    doc["problems"] = problems(doc)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for state, records in doc["states"].items():
        for r in records:
            if r["dtype"] == "bfloat16":
                print(f"{state:6} {r['arch']:7} {r['path']:11} rows {r['rows']:5} gk {r.get('gk', '-')!s:3} "
                      f"dq {r.get('double_quant', '-')!s:5} regs {r.get('regs')} spill {r.get('spill_bytes')} "
                      f"loop {r['loop_instructions']} per element {r['per_element']}")
    print("\n".join(doc["problems"]) or "no problems", f"\nwrote {args.out}")
    return 1 if doc["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
