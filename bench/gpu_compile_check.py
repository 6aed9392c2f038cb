"""Compile every Triton kernel x every configuration its launcher can pick x dtype for sm_80 and sm_90a,
ahead of time, on a machine without a GPU, and record what the GPU would be asked for.

Triton compiles for a ``GPUTarget`` without a driver and ships ``ptxas`` / ``cuobjdump`` under
``triton/backends/nvidia/bin``, so registers, spills, shared memory and SASS are readable here. The
cases come from ``bench/compile_cases.py`` (built from the launchers' own tables).

Per record: kernel, path (decode / mid / large / dequantize / xcross-nN; see docs/kernels.md), config,
arch, dtype, compiles, regs, spill_bytes (ptxas spill stores), shared_bytes (the compiled kernel's
``metadata.shared``), shared_limit (opt-in maximum per block: sm_80 163 KiB, sm_90a 227 KiB),
tensor_core (HMMA / HGMMA instructions in the SASS), and ``loop``: the SASS instructions of the
kernel's main loop (the outermost backward branch), by class, with the elements of W decoded per
iteration where the kernel decodes NF4.

    python bench/gpu_compile_check.py --out bench/results/gpu-compile-check.json [--only nf4] [--jobs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):  # the package, and compile_cases.py beside this script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Real launches mark every pointer and integer argument divisible by 16 as such (``tt.divisibility``), which
# decides vectorization; the check assumes so for all but the row counts and ranks, as in a model's layers.
_NOT_DIVISIBLE = {"M", "R", "T", "numel"}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCH_NAME = {80: "sm_80", 90: "sm_90a"}
_INSTR = re.compile(r"/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P\w+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)(?P<rest>[^;]*);")
_LABEL = re.compile(r"^\s*(?P<label>\.L_x_\d+):")
_HEX = re.compile(r"\s*(?:`\()?0x([0-9a-f]+)")
_BRA = re.compile(r"`\((?P<label>\.L_x_\d+)\)")


def _bare_package() -> None:
    """Import ``xkern`` without its package face (``xkern/__init__`` pulls in transformers & co.), so the check
    runs in a minimal environment (torch + triton + numpy), e.g. a second venv with another Triton."""
    try:
        import xkern  # noqa: F401
    except ImportError:
        import types
        face = types.ModuleType("xkern")
        face.__path__ = [str(ROOT / "xkern")]
        sys.modules["xkern"] = face


# The issue-bound ceiling of a decode loop on an H200: an SM issues at most 4 warp-instructions (128
# thread-instructions) per clock, so a loop taking ``p`` SASS instructions per decoded element decodes at most
# ``128 / p`` elements per clock per SM; times 132 SMs x 1.98 GHz x the bytes of an element (NF4 code, absmax
# byte, absmax2 share: double quantization, blocksize 64) is the weight bandwidth it allows.
H200_SMS, H200_GHZ, H200_HBM_TBS = 132, 1.98, 4.8
BYTES_PER_ELEMENT = 0.5 + 1 / 64 + 4 / (64 * 256)
ISSUE_PER_CLOCK = 128


def issue_bound_tbs(per_element: float) -> float:
    """The weight bandwidth (TB/s) an H200 can decode at when issue is the only limit."""
    return ISSUE_PER_CLOCK / per_element * H200_SMS * H200_GHZ * 1e9 * BYTES_PER_ELEMENT / 1e12


def _bin(tool: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _classify(op: str) -> str:
    base = op.split(".")[0]
    if base in ("HMMA", "HGMMA", "IMMA", "WGMMA"):
        return "mma"
    if base in ("LDG", "LDGSTS", "LDGDEPBAR", "UBLKCP", "UTMALDG"):
        return "global_load"
    if base in ("STG", "RED", "ATOM", "ATOMG"):
        return "global_store"
    if base in ("LDS", "LDSM", "STS", "ATOMS"):
        return "shared"
    if base in ("LDL", "STL"):
        return "local(spill)"
    if base in ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "FMNMX", "FSEL", "F2F", "F2FP", "I2F", "F2I",
                "FSETP", "MUFU", "HSETP2", "FCHK"):
        return "float"
    if base in ("BRA", "BAR", "BSYNC", "BSSY", "EXIT", "WARPSYNC", "DEPBAR", "NOP", "YIELD", "WARPGROUP", "SYNCS",
                "ARRIVES", "CCTL", "MEMBAR", "ERRBAR", "RET", "CALL"):
        return "control"
    if base in ("SHFL", "PRMT", "MOV", "SEL", "S2R", "S2UR", "CS2R", "R2UR", "UMOV", "VOTE", "VOTEU", "P2R", "R2P",
                "PLOP3", "ULDC", "LDC", "UPRMT", "USEL"):
        return "move"
    return "integer"


def sass_main_loop(sass: str, prefer: tuple[str, ...] = ()) -> dict:
    """The main loop of the SASS by instruction class: the largest span closed by a backward branch or, with
    ``prefer`` (opcode bases such as ``("HMMA", "LDS")``), the span holding the most of those instructions
    (the smallest such span), leaving out branches from past the first unconditional EXIT back before it:
    out-of-line code (sm_80's divergent-shuffle paths) returning into a loop is not a loop."""
    instrs: list[tuple[int, str, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    first_exit = 1 << 62
    for line in sass.splitlines():
        lm = _LABEL.match(line)
        if lm:
            pending.append(lm.group("label"))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group("addr"), 16)
            for lab in pending:
                labels[lab] = addr
            pending.clear()
            instrs.append((addr, m.group("op"), m.group("rest")))
            if m.group("op") == "EXIT" and not m.group("pred"):
                first_exit = min(first_exit, addr)
    best = None
    best_key = None
    for addr, op, rest in instrs:
        if not op.startswith("BRA"):
            continue
        b = _BRA.search(rest)
        h = _HEX.match(rest)
        target = labels.get(b.group("label")) if b else (int(h.group(1), 16) if h else None)
        if target is not None and target < addr:
            span = (target, addr)
            if prefer and target < first_exit < addr:
                continue
            if prefer:
                hits = sum(1 for a, o, _ in instrs if span[0] <= a <= span[1] and o.split(".")[0] in prefer)
                key = (hits, -(span[1] - span[0]))
            else:
                key = (span[1] - span[0],)
            if best_key is None or key > best_key:
                best, best_key = span, key
    total = Counter(_classify(op) for _, op, _ in instrs)
    tc = sum(1 for _, op, _ in instrs if op.split(".")[0] in ("HMMA", "HGMMA"))
    if best is None:
        return {"instructions": 0, "by_class": {}, "kernel_instructions": len(instrs), "tensor_core": tc,
                "kernel_by_class": dict(total)}
    body = [op for addr, op, _ in instrs if best[0] <= addr <= best[1]]
    return {"instructions": len(body), "by_class": dict(Counter(_classify(op) for op in body)),
            "kernel_instructions": len(instrs), "tensor_core": tc, "kernel_by_class": dict(total)}


def _ptxas_numbers(log: str) -> tuple[int | None, int | None]:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def compile_one(case, arch: int) -> dict:
    """Compile ``case`` for ``arch`` and measure it (an exception is recorded, not raised)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    rec = {"kernel": case.kernel, "config": case.config, "arch": ARCH_NAME[arch], "dtype": case.dtype,
           "path": case.path, "shared_limit": SHARED_LIMIT[arch]}
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(case.fn.arg_names)
             if case.signature[name] not in ("constexpr", "fp32") and name not in _NOT_DIVISIBLE}
    src = triton.compiler.ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=attrs)
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as e:  # noqa: BLE001 - a failed compilation is a result
        rec.update(compiles=False, error=f"{type(e).__name__}: {str(e)[-600:]}", regs=None, spill_bytes=None,
                   shared_bytes=None, tensor_core=None)
        return rec
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    regs, spill = _ptxas_numbers(buf.getvalue())
    if os.environ.get("XKERN_CUBIN_DUMP"):  # for reading one case's SASS by hand
        Path(os.environ["XKERN_CUBIN_DUMP"]).write_bytes(k.asm["cubin"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
        if regs is None:
            res = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", res)
            regs, spill = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    loop = sass_main_loop(sass)
    elems = case.config.get("decoded_per_iteration")
    if elems is None and case.kernel.startswith("nf4_lora") and "BLOCK_K" in case.config:
        elems = case.config["BLOCK_N"] * case.config["BLOCK_K"]
    if elems:
        loop["decoded_elements"] = elems
        # per thread: each of the num_warps * 32 threads decodes elems / threads elements per iteration
        loop["per_element"] = (round(loop["instructions"] * case.num_warps * 32 / elems, 2)
                               if loop["instructions"] else None)
    rec.update(compiles=True, regs=regs, spill_bytes=spill, shared_bytes=int(k.metadata.shared),
               tensor_core=loop["tensor_core"], loop=loop)
    return rec


def _work(item):
    idx, arch = item
    _bare_package()
    from compile_cases import compile_cases

    return compile_one(compile_cases()[idx], arch)


def _selected(case, only: str | None, exclude: str | None) -> bool:
    name = f"{case.kernel} {case.path} {case.dtype}"
    return (not only or any(o in name for o in only.split("|"))) and not (exclude and exclude in name)


def run(only: str | None = None, archs=(80, 90), jobs: int = 1, limit: int | None = None,
        exclude: str | None = None) -> list[dict]:
    _bare_package()
    from compile_cases import compile_cases
    cases = compile_cases()
    items = [(i, a) for i, c in enumerate(cases) for a in archs if _selected(c, only, exclude)]
    if limit:
        items = items[:limit]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            return list(ex.map(_work, items))
    return [compile_one(cases[i], a) for i, a in items]


def _record_key(r: dict) -> str:
    return json.dumps([r["kernel"], r["path"], r["config"], r["dtype"], r["arch"]], sort_keys=True)


def problems(records: list[dict]) -> list[str]:
    """What the check rejects: a failed compilation, shared memory over the limit, spills on the decode, mid
    (every layout) and shrink paths, a 16-bit base GEMM without tensor-core instructions."""
    out = []
    for r in records:
        name = f"{r['kernel']} {r['path']} {r['config']} {r['arch']} {r['dtype']}"
        if r.get("skipped"):
            continue
        if not r["compiles"]:
            out.append(f"{name}: does not compile ({r.get('error')})")
            continue
        if r["shared_bytes"] > r["shared_limit"]:
            out.append(f"{name}: shared {r['shared_bytes']} > {r['shared_limit']}")
        if r["path"].split("-")[0] in ("decode", "mid", "shrink") and r["spill_bytes"]:
            out.append(f"{name}: {r['spill_bytes']} bytes of spills")
        if r["path"] in ("decode", "mid", "large", "shrink") and r["dtype"] != "float32" and not r["tensor_core"]:
            out.append(f"{name}: no HMMA/HGMMA in the SASS")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu-compile-check.json")
    ap.add_argument("--only", help="cases whose 'kernel path dtype' contains this string (alternatives separated by |)")
    ap.add_argument("--exclude", help="leave out cases whose 'kernel path dtype' contains this string")
    ap.add_argument("--skip", help="record cases whose 'kernel path dtype arch' contains this string as skipped, "
                    "with --skip-reason, instead of compiling them (unless --merge brings a compiled record)")
    ap.add_argument("--skip-reason", default="")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="earlier outputs whose records are kept unless this run recompiled them")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--limit", type=int)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    t0 = time.perf_counter()
    records = run(args.only, tuple(args.arch), args.jobs, args.limit, args.exclude)
    seen = {_record_key(r) for r in records}
    from compile_cases import compile_cases
    current = {_record_key({"kernel": c.kernel, "path": c.path, "config": c.config, "dtype": c.dtype,
                            "arch": ARCH_NAME[a]}) for c in compile_cases() for a in args.arch}
    for path in args.merge:
        for r in json.loads(path.read_text())["records"]:
            if _record_key(r) not in seen and _record_key(r) in current:  # stale configurations are dropped
                records.append(r)
                seen.add(_record_key(r))
    if args.skip:
        for c in compile_cases():
            for a in args.arch:
                rec = {"kernel": c.kernel, "config": c.config, "arch": ARCH_NAME[a], "dtype": c.dtype, "path": c.path,
                       "shared_limit": SHARED_LIMIT[a]}
                if args.skip in f"{c.kernel} {c.path} {c.dtype} {ARCH_NAME[a]}" and _record_key(rec) not in seen:
                    rec.update(compiles=None, skipped=args.skip_reason, regs=None, spill_bytes=None,
                               shared_bytes=None, tensor_core=None)
                    records.append(rec)
                    seen.add(_record_key(rec))
    bad = problems(records)
    doc = {"triton": triton.__version__, "wall_s": round(time.perf_counter() - t0, 1),
           "compile_s_total": round(sum(r.get("compile_s") or 0 for r in records), 1),
           "merged_from": [p.name for p in args.merge],
           "problems": bad, "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(records)} compilations in {doc['wall_s']} s (triton {triton.__version__}); {len(bad)} problems")
    for p in bad:
        print("  " + p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
