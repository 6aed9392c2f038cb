"""The results tables of docs/ and the README, generated from the committed JSON under bench/results.

A generated block in a markdown file sits between two markers::

    <!-- generated: NAME -->
    ...
    <!-- end: NAME -->

``python bench/docs_tables.py`` rewrites every block of every doc from its JSON; ``--check`` only
says which blocks differ (exit 1), and ``tests/test_docs.py`` runs that check, so a table cannot
drift from the run it claims to show.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
METRICS = ("HR@1", "HR@3", "HR@10", "NDCG@3", "NDCG@10", "MRR")
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _fmt(v: object, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


# --------------------------------------------------------------------------------------------- quickstart

def demo_table(result: dict) -> str:
    """The demo's table as markdown, with the run's timing and machine."""
    head = "| method | fraction | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for r in result["rows"]:
        frac = r["fraction"] if isinstance(r["fraction"], str) else f"{r['fraction']:g}"
        lines.append(f"| {r['method']} | {frac} | " + " | ".join(f"{r[m]:.4f}" for m in METRICS) + " |")
    run = result.get("run", {})
    n_users = result["rows"][0]["n_users"]
    note = (f"\n{n_users} test users of {result['target']}, {result['config']['n_neg'] + 1} candidates each; "
            f"profile `{result['config'].get('profile', 'full')}`")
    if "wall_seconds" in result:
        note += (f"; {result['wall_seconds']:.1f} s from the command's start to the table "
                 f"({result.get('workers', 1)} process(es) x {result.get('threads', '?')} thread(s))")
    if run:
        note += f"; {run.get('command_seconds', '?')} s wall for `{run.get('command', 'xkern demo')}`"
        if "load_before" in run:
            note += (f", on {run.get('machine', 'the 2-core CPU')} with {result.get('free_cores', '?')} core(s) free "
                     f"when it started (load average {run['load_before']}, which this VM reports near 1 when idle)")
    return "\n".join(lines) + "\n" + note + ".\n"


def quickstart_quick() -> str:
    return demo_table(_load("quickstart-quick.json"))


def quickstart_full() -> str:
    return demo_table(_load("quickstart-full.json"))


def quickstart_time() -> str:
    quick, full = _load("quickstart-quick.json"), _load("quickstart-full.json")
    return "".join(f"- `{r['run']['command']}`: {r['run']['command_seconds']} s wall on {r['run']['machine']}, "
                   f"{r.get('free_cores', '?')} core(s) free ({r.get('workers', 1)} process(es) x "
                   f"{r.get('threads', '?')} thread(s)), {len(r['rows'])} rows, measured {r['run']['date']}.\n"
                   for r in (quick, full))


# --------------------------------------------------------------------------------------------- lora_linear CPU

def _cpu_records() -> tuple[dict, list[dict]]:
    files = sorted(RESULTS.glob("*-lora_linear-cpu.json"))
    data = json.loads(files[-1].read_text())
    return data["info"], data["records"]


def lora_linear_cpu_file() -> str:
    files = sorted(RESULTS.glob("*-lora_linear-cpu.json"))
    info, records = _cpu_records()
    load = info.get("load_average_at_start", ["?"])[0], info.get("load_average_at_end", ["?"])[0]
    return (f"Source: `bench/results/{files[-1].name}` ({len(records)} records; torch {info['torch']}, "
            f"bitsandbytes {info['bitsandbytes']}, native ISA {info['isa']}, copy bandwidth "
            + ", ".join(f"{v:.1f} GB/s on {t} thread(s)" for t, v in info["copy_gbs"].items())
            + f"; load average {load[0]} at the start and {load[1]} at the end of the run).\n")


def lora_linear_cpu_targets() -> str:
    """The issue's targets: min / median of the ratio over the cases of each group, and how many meet it."""
    _, records = _cpu_records()
    groups: list[tuple[str, Callable[[dict], bool], str, float]] = [
        ("M <= 16", lambda r: r["M"] <= 16, "speedup_vs_bnb_default", 1.0),
        ("M >= 128", lambda r: r["M"] >= 128, "speedup_vs_bnb_exact", 1.0),
        ("M >= 128", lambda r: r["M"] >= 128, "speedup_vs_dense", 0.8),
    ]
    lines = ["| rows | dtype | threads | ratio | target | cases meeting it | min | median | max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, pick, key, target in groups:
        for dtype in sorted({r["dtype"] for r in records}):
            for t in sorted({r["threads"] for r in records}):
                vals = [r[key] for r in records if pick(r) and r["dtype"] == dtype and r["threads"] == t]
                if not vals:
                    continue
                met = sum(v >= target for v in vals)
                lines.append(f"| {label} | {dtype} | {t} | {key.removeprefix('speedup_vs_')} | >= {target:g}x | "
                             f"{met}/{len(vals)} | {min(vals):.2f} | {statistics.median(vals):.2f} | "
                             f"{max(vals):.2f} |")
    errs = [r["max_rel_err_xkern"] for r in records if r["dtype"] == "float32"]
    lines.append(f"\nfloat32 error of xkern against float64 (max over {len(errs)} cases, relative to the output's "
                 f"largest magnitude): {max(errs):.2g}; bitsandbytes' default path: "
                 f"{max(r['max_rel_err_bnb_default'] for r in records if r['dtype'] == 'float32'):.2g}.")
    return "\n".join(lines) + "\n"


def lora_linear_cpu_table() -> str:
    """Every shape x M x dtype x threads at 4 adapters (the JSON also has 1 and 16)."""
    _, records = _cpu_records()
    cols = [("N", "N"), ("K", "K"), ("M", "M"), ("dtype", "dtype"), ("threads", "thr"), ("xkern_ms", "xkern ms"),
            ("bnb_default_ms", "bnb ms"), ("bnb_exact_ms", "bnb exact ms"), ("dense_ms", "dense ms"),
            ("bound_ms", "bound ms"), ("speedup_vs_bnb_default", "x vs bnb"), ("speedup_vs_bnb_exact", "x vs exact"),
            ("speedup_vs_dense", "x vs dense"), ("fraction_of_bound", "of bound"), ("max_rel_err_xkern", "err")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        if r["n_adapters"] == 4:
            lines.append("| " + " | ".join(_fmt(r[c]) for c, _ in cols) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- model runtime

def runtime_cpu() -> str:
    """bench_runtime.py's table (latest CPU run), with its settings and the machine's load."""
    files = sorted(RESULTS.glob("*-runtime-cpu.json"))
    data = json.loads(files[-1].read_text())
    cfg, env, summary = data["config"], data["environment"], data["summary"]
    nan = float("nan")
    cols = ["config", "what", "median ms", "tokens/s", "xkern speedup", "peak RSS MiB", "weights MiB (LoRA)",
            "max abs logit diff vs xkern"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in data["rows"]:
        diff = r.get("max_abs_logit_diff_vs_xkern")
        speed = r.get("xkern_speedup")
        lines.append(f"| `{r['config']}` | {r['description']} | {r['median_ms']:.4g} | {r['tokens_per_s']:.4g} | "
                     + ("-" if speed is None else f"{speed:.3g}") + f" | {r['peak_mb']:.0f} | "
                     f"{r['weight_mb']:.1f} ({r['adapter_mb']:.1f}) | " + ("-" if diff is None else f"{diff:.3g}")
                     + " |")
    note = (f"\nSource: `bench/results/{files[-1].name}`: {cfg['model']}, {cfg['dtype']}, forward {cfg['batch']} x "
            f"{cfg['seq']} tokens over {len(cfg['adapter_names'])} adapters (r {cfg['rank']}), training "
            f"{cfg['train_batch']} x {cfg['train_seq']} tokens; {env['torch_threads']} thread(s) per run, "
            f"xkern backend `{env.get('xkern_backend')}`, torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, "
            f"peft {env['peft']}; load average {env['loadavg_start'][0]:.2f} at the start and "
            f"{env['loadavg_end'][0]:.2f} at the end; {cfg['wall_s']:.0f} s in all. First training loss: xkern "
            f"{summary.get('first_loss_xkern', nan):.4f}, PEFT {summary.get('first_loss_peft', nan):.4f}.")
    return "\n".join(lines) + "\n" + note + "\n"


# --------------------------------------------------------------------------------------------- GPU compile check

def _compile_check(name: str) -> dict:
    return _load(name)


_KERNEL_ORDER = ("nf4_lora_kernel", "lora_shrink_kernel", "nf4_dequantize_kernel", "xcross_fwd_kernel",
                 "xcross_bwd_kernel")
_PATH_ORDER = ("decode", "mid", "mid-unaligned", "mid-odd", "large", "shrink", "dequantize")


def _cc_groups(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["kernel"], r["path"]), []).append(r)

    def order(key: tuple[str, str]) -> tuple:
        kernel, path = key
        return (_PATH_ORDER.index(path) if path in _PATH_ORDER else len(_PATH_ORDER), path,
                _KERNEL_ORDER.index(kernel) if kernel in _KERNEL_ORDER else 9)
    return {k: groups[k] for k in sorted(groups, key=order)}


def _cc_summary(doc: dict) -> list[str]:
    lines = []
    for (kernel, path), rs in _cc_groups(doc["records"]).items():
        ok = [r for r in rs if r["compiles"]]
        if not ok:
            lines.append(f"| `{kernel}` | {path} | {len(rs)} | 0 ({sum(bool(r.get('skipped')) for r in rs)} skipped) | "
                         "- | - | - | - | - | - |")
            continue
        over = sum(r["shared_bytes"] > r["shared_limit"] for r in ok)
        spill = [r for r in ok if r["spill_bytes"]]
        tc16 = [r for r in ok if r["dtype"] != "float32"]
        tc = f"{sum(bool(r['tensor_core']) for r in tc16)}/{len(tc16)}" if tc16 else "-"
        per = sorted(r["loop"].get("per_element") for r in ok if r.get("loop", {}).get("per_element"))
        skipped = sum(bool(r.get("skipped")) for r in rs)
        lines.append(f"| `{kernel}` | {path} | {len(rs)} | {len(ok)}" + (f" ({skipped} skipped)" if skipped else "")
                     + f" | {min(r['regs'] for r in ok)}-"
                     f"{max(r['regs'] for r in ok)} | {len(spill)} ({max((r['spill_bytes'] for r in spill), default=0)}"
                     f" B max) | {max(r['shared_bytes'] for r in ok) / 1024:.0f} KiB | {over} | {tc} | "
                     + (f"{per[0]:g}-{per[-1]:g}" if per else "-") + " |")
    return lines


def gpu_compile_summary() -> str:
    """Before / after: per kernel and path, over arch x dtype x rank x direction."""
    head = ("| kernel | path | compilations | compile | registers | with spills (max) | max shared | over the limit | "
            "16-bit with HMMA/HGMMA | SASS per decoded element |")
    out = []
    for label, name in (("Before (the kernels as found)", "gpu-compile-check-before.json"),
                        ("After", "gpu-compile-check.json")):
        doc = _compile_check(name)
        out += [f"**{label}** -- `bench/results/{name}`, Triton {doc['triton']}, {len(doc['records'])} compilations "
                f"(sm_80 limit 163 KiB, sm_90a 227 KiB per block); problems found by the check: "
                f"{len(doc['problems'])}.", "", head, "|" + "---|" * 10, *_cc_summary(doc), ""]
    return "\n".join(out)


def _main_loop_row(doc: dict, kernel: str, path: str, direction: str, rank: int, dtype: str, arch: str) -> dict | None:
    for r in doc["records"]:
        if (r["kernel"], r["path"], r["dtype"], r["arch"]) == (kernel, path, dtype, arch) and r["compiles"] \
                and r["config"].get("direction") == direction and r["config"].get("rank") == rank \
                and r["config"].get("SPLIT_K", 1) <= 2 and r.get("loop", {}).get("decoded_elements"):
            return r
    return None


SASS_CLASSES = ("global_load", "shared", "mma", "float", "integer", "move", "local(spill)", "control")


def gpu_compile_sass() -> str:
    """SASS instructions per K step of nf4_lora_kernel's main loop, before and after (bf16, rank 16)."""
    lines = ["| kernel state | path | direction | arch | tile (N x K) | threads | loop instructions | per element "
             "(per thread) | " + " | ".join(SASS_CLASSES) + " |", "|" + "---|" * (8 + len(SASS_CLASSES))]
    for label, name in (("before", "gpu-compile-check-before.json"), ("after", "gpu-compile-check.json")):
        doc = _compile_check(name)
        for path in ("decode", "mid"):
            for direction in ("forward", "input_grad"):
                for arch in ("sm_80", "sm_90a"):
                    r = _main_loop_row(doc, "nf4_lora_kernel", path, direction, 16, "bfloat16", arch)
                    if r is None:
                        continue
                    c, loop = r["config"], r["loop"]
                    lines.append(f"| {label} | {path} | {direction} | {arch} | {c['BLOCK_N']} x {c['BLOCK_K']} | "
                                 f"{c['num_warps'] * 32} | {loop['instructions']} | {loop['per_element']:g} | "
                                 + " | ".join(str(loop["by_class"].get(k, 0)) for k in SASS_CLASSES) + " |")
    return "\n".join(lines) + "\n"


H200_HBM_TBS = 4.8
H200_SMS, H200_GHZ = 132, 1.98


def gpu_roofline() -> str:
    """The decode path's distance to the H200 bandwidth roofline, from the SASS of the main loop: issue-bound
    elements per clock (4 schedulers x 32 lanes per SM) against the bytes per element of NF4."""
    lines = ["| kernel state | arch | SASS per element | issue-bound elements / clock / SM | issue-bound weight "
             "TB/s | fraction of 4.8 TB/s |", "|---|---|---|---|---|---|"]
    bytes_per_element = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed code + absmax byte + absmax2 (double quant, bs 64)
    for label, name in (("before", "gpu-compile-check-before.json"), ("after", "gpu-compile-check.json")):
        doc = _compile_check(name)
        for arch in ("sm_90a",):
            r = _main_loop_row(doc, "nf4_lora_kernel", "decode", "forward", 16, "bfloat16", arch)
            if r is None:
                continue
            per = r["loop"]["per_element"]
            epc = 128 / per
            tbs = epc * H200_SMS * H200_GHZ * 1e9 * bytes_per_element / 1e12
            lines.append(f"| {label} | {arch} | {per:g} | {epc:.1f} | {tbs:.2f} | {tbs / H200_HBM_TBS:.0%} |")
    return "\n".join(lines) + "\n"


def gpu_compile_triton36() -> str:
    """The same matrix under Triton 3.6 (the GPU image's version), run once in a second venv."""
    doc = _compile_check("gpu-compile-check-triton36.json")
    n_ok = sum(bool(r["compiles"]) for r in doc["records"])
    kinds: dict[str, int] = {}
    for p in doc["problems"]:
        kind = "spills" if "spills" in p else ("shared memory" if "shared" in p else "other")
        kinds[kind] = kinds.get(kind, 0) + 1
    return (f"Triton {doc['triton']} (`bench/results/gpu-compile-check-triton36.json`): {n_ok} of "
            f"{len(doc['records'])} compilations succeed; {len(doc['problems'])} problems"
            + (" (" + ", ".join(f"{v} {k}" for k, v in kinds.items()) + ")" if kinds else "") + ".\n")


def gpu_compile_table() -> str:
    """Every compilation of the after run."""
    doc = _compile_check("gpu-compile-check.json")
    lines = ["| kernel | path | config | arch | dtype | compiles | regs | spill B | shared B | limit B | HMMA | "
             "loop instr |", "|" + "---|" * 12]
    for r in doc["records"]:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(f"| `{r['kernel']}` | {r['path']} | {cfg} | {r['arch']} | {r['dtype']} | {r['compiles']} | "
                     f"{r['regs']} | {r['spill_bytes']} | {r['shared_bytes']} | {r['shared_limit']} | "
                     f"{r['tensor_core']} | {r.get('loop', {}).get('instructions', '-')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- registry

BLOCKS: dict[str, Callable[[], str]] = {
    "quickstart-quick": quickstart_quick,
    "quickstart-full": quickstart_full,
    "quickstart-time": quickstart_time,
    "lora-linear-cpu-file": lora_linear_cpu_file,
    "lora-linear-cpu-targets": lora_linear_cpu_targets,
    "lora-linear-cpu-table": lora_linear_cpu_table,
    "runtime-cpu": runtime_cpu,
    "gpu-compile-summary": gpu_compile_summary,
    "gpu-compile-sass": gpu_compile_sass,
    "gpu-roofline": gpu_roofline,
    "gpu-compile-table": gpu_compile_table,
    "gpu-compile-triton36": gpu_compile_triton36,
}


def render(name: str) -> str:
    if name not in BLOCKS:
        raise KeyError(f"no generator for block {name!r}; known: {sorted(BLOCKS)}")
    return BLOCKS[name]()


def update(path: Path, write: bool) -> list[str]:
    """The names of the blocks of ``path`` that differ from their JSON (rewritten when ``write``)."""
    text = path.read_text()
    stale: list[str] = []

    def sub(m: re.Match) -> str:
        body = render(m.group("name"))
        if body != m.group("body"):
            stale.append(m.group("name"))
        return m.group(1) + body + m.group(4)

    new = BLOCK.sub(sub, text)
    if write and new != text:
        path.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1 if any)")
    args = ap.parse_args(argv)
    stale = {str(p.relative_to(ROOT)): s for p in DOCS if (s := update(p, write=not args.check))}
    for path, names in stale.items():
        print(f"{path}: {'stale' if args.check else 'rewrote'} {', '.join(names)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
