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
if str(ROOT / "bench") not in sys.path:  # gpu_compile_check.py beside this script
    sys.path.insert(0, str(ROOT / "bench"))
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


def quickstart_quick_vs_full() -> str:
    """HR@10 of every row in both profiles, side by side (what the quick profile costs)."""
    quick, full = _load("quickstart-quick.json"), _load("quickstart-full.json")
    key = lambda r: (r["method"], str(r["fraction"]))  # noqa: E731
    full_rows = {key(r): r for r in full["rows"]}
    lines = ["| method | fraction | HR@10 quick | HR@10 full | quick - full |", "|---|---|---|---|---|"]
    for r in quick["rows"]:
        f = full_rows.get(key(r))
        if f is None:
            continue
        frac = r["fraction"] if isinstance(r["fraction"], str) else f"{r['fraction']:g}"
        lines.append(f"| {r['method']} | {frac} | {r['HR@10']:.3f} | {f['HR@10']:.3f} | "
                     f"{r['HR@10'] - f['HR@10']:+.3f} |")
    return "\n".join(lines) + "\n"


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

def _latest(pattern: str) -> Path:
    """The newest dated result (``YYYY-MM-DD-<pattern>``); undated files of a similar name are other benchmarks."""
    files = sorted(RESULTS.glob(f"[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]-{pattern}"))
    if not files:
        raise FileNotFoundError(f"no bench/results/<date>-{pattern}")
    return files[-1]


def runtime_cpu() -> str:
    """bench_runtime.py's table (latest CPU run): every configuration at each dtype, with the run's settings."""
    path = _latest("runtime-cpu.json")
    data = json.loads(path.read_text())
    cfg, env = data["config"], data["environment"]
    cols = ["config", "dtype", "what", "median ms", "tokens/s", "xkern speedup", "peak RSS MiB", "weights MiB (LoRA)",
            "max abs logit diff vs xkern"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in data["rows"]:
        diff = r.get("max_abs_logit_diff_vs_xkern")
        speed = r.get("xkern_speedup")
        lines.append(f"| `{r['config']}` | {r['dtype']} | {r['description']} | {r['median_ms']:.4g} | "
                     f"{r['tokens_per_s']:.4g} | " + ("-" if speed is None else f"{speed:.3g}")
                     + f" | {r['peak_mb']:.0f} | {r['weight_mb']:.1f} ({r['adapter_mb']:.1f}) | "
                     + ("-" if diff is None else f"{diff:.3g}") + " |")
    gemm = ", ".join(f"{d} {v['gflops_per_s']:.0f} GFLOP/s" for d, v in cfg["gemm"].items())
    note = (f"\nSource: `bench/results/{path.name}`: {cfg['model']}, forward {cfg['batch']} x {cfg['seq']} tokens "
            f"over {len(cfg['adapter_names'])} adapters (r {cfg['rank']}), training {cfg['train_batch']} x "
            f"{cfg['train_seq']} tokens, generate {cfg['gen_tokens']} new tokens after {cfg['gen_prompt']}-token "
            f"prompts; CPU {env['cpu']}, {env['torch_threads']} thread(s) per run, xkern backend "
            f"`{env.get('xkern_backend')}`, torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, peft "
            f"{env['peft']}; the machine's GEMM rate on the model's shapes: {gemm}; load average "
            f"{env['loadavg_start'][0]:.2f} at the start and {env['loadavg_end'][0]:.2f} at the end; "
            f"{cfg['wall_s']:.0f} s in all.")
    return "\n".join(lines) + "\n" + note + "\n"


def runtime_targets() -> str:
    """The targets of the model runtime against the latest CPU run, one line each, met or missed by how much."""
    path = _latest("runtime-cpu.json")
    data = json.loads(path.read_text())
    by = {(r["config"], r["dtype"]): r for r in data["rows"]}
    lines = ["| target | dtype | measured | goal | met |", "|---|---|---|---|---|"]
    for dtype, part in data["summary"].items():
        for section, goal in (("forward", 1.2), ("train", 1.5), ("generate", 1.2)):
            key = f"{section}_speedup_vs_fastest"
            if key not in part or (section != "forward" and dtype != "bfloat16"):
                continue
            fastest = part[f"{section}_fastest_baseline"]
            lines.append(f"| {section}: xkern vs the fastest baseline (`{fastest}`) | {dtype} | {part[key]:.2f}x | "
                         f">= {goal}x | {'yes' if part[key] >= goal else 'no'} |")
        mine = by.get(("fwd_xkern", dtype))
        if mine and dtype == "bfloat16" and "fraction_of_gemm_rate" in mine:
            frac = mine["fraction_of_gemm_rate"]
            lines.append(f"| forward: model FLOPs / time against the bf16 GEMM rate | {dtype} | {frac:.0%} | >= 60% | "
                         f"{'yes' if frac >= 0.6 else 'no'} |")
        for section in ("forward", "train", "generate"):
            mine = [r for r in data["rows"] if r["section"] == section and r["dtype"] == dtype
                    and r["config"].endswith("_xkern")]
            rivals = [r for r in data["rows"] if r["section"] == section and r["dtype"] == dtype
                      and not r["config"].endswith("_xkern") and r["config"] != "fwd_peft_dense"]
            if mine and rivals:
                worst = max(mine[0]["peak_mb"] / r["peak_mb"] for r in rivals)
                lines.append(f"| {section}: peak RSS, xkern / PEFT + bnb (highest ratio) | {dtype} | {worst:.2f} | "
                             f"<= 1 | {'yes' if worst <= 1.0 else 'no'} |")
    return "\n".join(lines) + "\n\nSource: `bench/results/" + path.name + "`.\n"


PROFILE_CATEGORIES = [("gemm", "GEMMs (oneDNN / MKL, LM head included)"),
                      ("xkern_nf4_layer", "xkern's NF4 layers outside the GEMMs (decode, LoRA, GEMV)"),
                      ("attention", "attention (SDPA)"), ("elementwise", "elementwise and norms"),
                      ("copies", "copies and layout"), ("other_ops", "other operators"),
                      ("python_and_dispatch", "Python and dispatch (wall - profiled)")]


def profile_forward() -> str:
    """Where the benchmark forward's time goes, before (the landed code of 2026-12-03) and after, per dtype."""
    runs = {(label, dtype): _load(f"2026-12-04-profile-forward-{label}-{dtype}.json")
            for label in ("before", "after") for dtype in ("bfloat16", "float32")}
    lines = ["| where | " + " | ".join(f"{lab} {d} s (share)" for d in ("bfloat16", "float32")
                                        for lab in ("before", "after")) + " |", "|---|" + "---|" * 4]
    for key, what in PROFILE_CATEGORIES:
        cells = []
        for d in ("bfloat16", "float32"):
            for lab in ("before", "after"):
                r = runs[(lab, d)]
                sec = r["seconds"].get(key, 0.0) * r["wall_s"] / r["profiled_wall_s"]
                cells.append(f"{sec:.2f} ({r['shares'].get(key, 0.0):.0%})")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    cells = [f"**{runs[(lab, d)]['wall_s']:.2f}** ({runs[(lab, d)]['tokens_per_s']:.0f} tokens/s)"
             for d in ("bfloat16", "float32") for lab in ("before", "after")]
    lines.append("| forward wall time (median) | " + " | ".join(cells) + " |")
    r = runs[("after", "bfloat16")]
    note = (f"\nSources: `bench/results/2026-12-04-profile-forward-{{before,after}}-{{bfloat16,float32}}.json` "
            f"(`python bench/profile_forward.py`, the before rows on a checkout of the previous landing with its own "
            f"build, each the median-throughput run of three, interleaved); {r['batch']} x {r['seq']} tokens, "
            f"{r['adapters']} adapters r {r['rank']}, CPU {r['cpu']}, {r['threads']} threads, ISA `{r['isa']}`. "
            "Seconds per category are the profiled run's shares applied to the median wall time.")
    return "\n".join(lines) + "\n" + note + "\n"


def train_precision() -> str:
    """bench_train_precision.py: the same LoRA run in bf16 and float32, loss curves side by side."""
    path = _latest("train-precision-cpu.json")
    d = json.loads(path.read_text())
    lines = [f"| dtype | training tokens/s | mean loss, last {d['tail']} steps | step noise | validation loss before "
             "-> after | seconds |", "|---|---|---|---|---|---|"]
    for name, r in d["runs"].items():
        lines.append(f"| {name} | {r['train_tokens_per_s']:.0f} | {r['tail_mean']:.4f} | {r['noise']:.4f} | "
                     f"{r['val_loss_before']:.4f} -> {r['val_loss_after']:.4f} | {r['train_seconds']:.0f} |")
    note = ""
    if "tail_mean_difference" in d:
        note = (f"\nbf16 - float32 over the last {d['tail']} steps: {d['tail_mean_difference']:+.4f} nats, against "
                f"{d['tail_mean_noise']:.4f} (two standard errors of such a mean from the float32 run's step noise): "
                f"{'within' if d['within_noise'] else 'outside'} the noise; largest difference of one step "
                f"{d['max_step_difference']:.4f}; bf16 trains {d['speedup_bf16']:.2f}x as many tokens per second.")
    return ("\n".join(lines) + "\n" + note + f"\n\nSource: `bench/results/{path.name}`: {d['steps']} steps of "
            f"batch {d['batch_size']} (lr {d['lr']:g}), {d['domain']} next-item examples, {d['model']}, LoRA r "
            f"{d['rank']}; CPU {d['cpu']}, {d['threads']} threads, load average "
            + ", ".join(f"{r['load_average']:.2f} ({n})" for n, r in d["runs"].items()) + " at the end of each run.\n")


def scoring_cpu() -> str:
    """bench_scoring.py: seconds per user, and the ranking under bf16 and a title cap, with paired intervals."""
    path = _latest("scoring-cpu.json")
    data = json.loads(path.read_text())
    lines = ["| row | dtype | users | s per user | target | tokens per user |", "|---|---|---|---|---|---|"]
    for r in data.get("speed", []):
        goal = 0.4 if r["row"] == "lora" else 0.8
        tokens = f"{r['tokens_per_user']:.0f}" if "tokens_per_user" in r else "-"
        lines.append(f"| {r['row']} | {r['dtype']} | {r['users']} | {r['s_per_user']:.3f} | <= {goal} | {tokens} |")
    out = "\n".join(lines) + "\n"
    for key, a, b, what in (("precision", "bfloat16", "float32", "bf16 - float32"),
                            ("title_cap", "capped", "full", "titles capped - full")):
        part = data.get(key)
        if not part:
            continue
        diff = part["bfloat16_minus_float32" if key == "precision" else "capped_minus_full"]
        rows = ["", f"| {what} ({part['users']} users) | HR@10 | MRR | seconds |", "|---|---|---|---|"]
        for side in (a, b):
            m = part[side]
            sec = part["seconds"][side]
            rows.append(f"| {side} | {_ci(m['HR@10'])} | {_ci(m['MRR'])} | {sec:.0f} |")
        rows.append(f"| difference [95% CI] | {diff['HR@10']['diff']:+.4f} [{diff['HR@10']['ci_low']:+.4f}, "
                    f"{diff['HR@10']['ci_high']:+.4f}] | {diff['MRR']['diff']:+.4f} [{diff['MRR']['ci_low']:+.4f}, "
                    f"{diff['MRR']['ci_high']:+.4f}] | - |")
        out += "\n".join(rows) + "\n"
    cap = data.get("title_cap", {}).get("cap_tokens")
    out += (f"\nSource: `bench/results/{path.name}`: {data['domain']} test users, {data['candidates']} candidates, "
            f"SmolLM2-135M, CPU {data['cpu']}, {data['threads']} threads, load average "
            f"{data['load_average_start']:.2f} at the start and {data['load_average_end']:.2f} at the end"
            + (f"; title cap {cap} tokens" if cap else "") + ".\n")
    return out


# --------------------------------------------------------------------------------------------- quality

def _ci(v: list[float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def _metric_rows(rows: list[dict]) -> list[str]:
    """Quality rows as table lines: each metric's mean with its 95% bootstrap interval."""
    metrics = list(rows[0]["metrics"])
    lines = ["| method | fraction | users | trainable params | " + " | ".join(metrics) + " |",
             "|" + "---|" * (4 + len(metrics))]
    for r in rows:
        lines.append(f"| {r['method']} | {r['fraction']} | {r['n_users']} | {r['trainable_params']:,} | "
                     + " | ".join(_ci(r["metrics"][m]) for m in metrics) + " |")
    return lines


def quality_table(name: str) -> str:
    """Rows of a quality JSON (``xkern eval`` or a model run): metrics with 95% bootstrap intervals, then
    the paired HR@10 differences of every row against the first trained one."""
    run = _load(name)
    lines = _metric_rows(run["rows"])
    lines += ["", "| A - B (same users) | HR@10 difference [95% CI] | p |", "|---|---|---|"]
    cfg = run.get("config", {})
    floor = 2 / cfg.get("n_boot", 2000)  # no resample on the other side of zero
    for p in run.get("paired", []):
        pval = f"< {floor:.2g}" if p["p"] == 0 else f"{p['p']:.3g}"
        lines.append(f"| {p['a']} - {p['b']} | {p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] | "
                     f"{pval} |")
    note = (f"\nSource: `bench/results/{name}`: {run.get('domain')} {run.get('split')} users, "
            f"{cfg.get('n_neg', 29) + 1} candidates each ({cfg.get('negatives', 'uniform')} negatives, seed "
            f"{run.get('seed')}); intervals: percentile bootstrap over users, {cfg.get('n_boot', 2000)} resamples.")
    if "wall_seconds" in run:
        note += f" {run['wall_seconds']} s wall on {run.get('machine', 'the 2-core CPU VM')}"
        load = run.get("load_average")
        note += f", load average {load[0]} at the start and {load[1]} at the end." if load else "."
    return "\n".join(lines) + "\n" + note + "\n"


def quality_tools_baselines() -> str:
    return quality_table("quality-Tools-baselines.json")


def quality_tools_likelihood() -> str:
    run = _load("quality-Tools-likelihood.json")
    lines = ["| row | trainable params | val loss start -> best | steps |", "|---|---|---|---|"]
    for r in run["rows"]:
        if r.get("val_loss_start") is None or r["method"] == "sasrec" or r.get("score", "likelihood") != "likelihood":
            continue
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['val_loss_start']:.3f} -> "
                     f"{r['val_loss_best']:.3f} | {r.get('steps')} |")
    kinds: dict[str, list[str]] = {}
    for r in run["rows"]:
        if r.get("val_loss_kind") and r.get("score", "likelihood") == "likelihood":
            kinds.setdefault(r["val_loss_kind"], []).append(r["method"])
    what = "; ".join(f"{', '.join(names)}: {kind}" for kind, names in kinds.items())
    pmi_pairs = _pmi_pairs(run)
    agree = run.get("rank_agreement_with_title_prior", {})
    prior = ("" if not agree else "\nShare of test users whose target lands at the same rank as under the title "
             "prior alone (the score after an empty history), per model, raw likelihood / PMI: " + "; ".join(
                 f"{n} {a['likelihood']:.2f} / {a['pmi']:.2f}" for n, a in agree.items()) + ".\n")
    return (quality_table("quality-Tools-likelihood.json") + prior + pmi_pairs + "\nTraining, validation loss on "
            f"each run's own validation users ({what}):\n\n" + "\n".join(lines) + "\n")


def _pmi_pairs(run: dict) -> str:
    """Each model's PMI row minus its raw row on HR@1 and MRR, paired over the same users (from the ranks)."""
    from xkern.data.confidence import paired_comparison

    by = {r["method"]: r for r in run["rows"]}
    n_boot, seed = run["config"].get("n_boot", 2000), run.get("seed", 0)
    lines = []
    for r in run["rows"]:
        if r.get("score") != "pmi" or r.get("same_model_as"):
            continue
        cells = []
        for metric in ("HR@1", "MRR"):
            p = paired_comparison(r["ranks"], by[r["model"]]["ranks"], metric, n_boot, seed)
            cells.append(f"{p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]")
        lines.append(f"| {r['method']} - {r['model']} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return ("\nPMI minus raw likelihood, same model and users (paired bootstrap, 95%):\n\n"
            "| A - B | HR@1 difference | MRR difference |\n|---|---|---|\n" + "\n".join(lines) + "\n")


XCROSS_LR_RUNS = ("xcross-80", "xcross-80-lr1e-4", "xcross-80-lr1e-5", "xcross-80-lr3e-5", "xcross-80-pmi-lr1e-5",
                  "xcross-80-pmi-bias-lr3e-3")


def xcross_likelihood_lr() -> str:
    """The likelihood X-Cross trainings on the 80-user pool at several learning rates: validation per step."""
    lines = ["| run | lr | trained (parameters) | objective | batch (users x candidates) | steps | validation users | "
             "validation loss per step (chance 2.303) | validation MRR first -> best | training loss min / max "
             "(ln 2 = 0.693) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in XCROSS_LR_RUNS:
        log = _load(f"logs/quality-Tools-likelihood/{name}-train_log.json")
        cfg, train = log["config"], [t["loss"] if isinstance(t, dict) else t for t in log["train_loss"]]
        val = ", ".join(f"{v['step']}: {v['loss']:.3f}" for v in log["val"])
        best = next(v for v in log["val"] if v["step"] == log["best_step"])
        what = "biases + w, W_concat frozen" if log["trainable"].get("frozen_w_concat") else "W_concat + w"
        lines.append(f"| {name} | {cfg['lr']:g} | {what} ({log['trainable']['total']:,}) | "
                     f"{'PMI' if cfg.get('calibrate') else 'raw'} | {cfg['batch_size']} x "
                     f"{1 + cfg['n_neg']} | {log['steps']} | {cfg['max_val_users']} | {val} | "
                     f"{log['val'][0]['mrr']:.3f} -> {best['mrr']:.3f} (step {log['best_step']}) | "
                     f"{min(train):.3f} / {max(train):.3f} |")
    return "\n".join(lines) + "\n"


def quality_tools_weave() -> str:
    """examples/weave_amazon.py --quality: WeaveRec's rows with intervals, and each row's validation loss."""
    run = _load("quality-Tools-weave.json")
    lines = ["| row | trainable params | val loss: base -> row |", "|---|---|---|"]
    for r in run["rows"]:
        if r.get("mode") in (None, "likelihood") and r.get("val_loss_best") is not None and r["method"] != "sasrec":
            lines.append(f"| {r.get('model', r['method'])} | {r['trainable_params']:,} | "
                         f"{r['val_loss_start']:.3f} -> {r['val_loss_best']:.3f} |")
    cfg = run["config"]
    return (quality_table("quality-Tools-weave.json") + f"\nTraining: {cfg['train_users']} users per domain, "
            f"{run['train_seconds']:.0f} s of {run['wall_seconds']:.0f} s wall. Validation ({cfg['val_loss']}, "
            f"{cfg['val_users']} users):\n\n" + "\n".join(lines) + "\n")


def _cross_file_pairs(ref: dict, pairs: list[tuple[dict, str, str]], metrics: tuple[str, ...]) -> str:
    """Row A of a run minus row B of ``ref`` (JSONs ranked on the same candidates), paired per user.

    Each run must hold the same users and candidates as ``ref``: their popularity rows (no model, no
    seed) must rank every user's target identically, or the comparison is refused."""
    from xkern.data.confidence import paired_comparison

    def popularity(r: dict) -> list[int]:
        return next(row["ranks"] for row in r["rows"] if row["method"] == "popularity")

    b_rows = {r["method"]: r for r in ref["rows"]}
    n_boot, seed = ref["config"].get("n_boot", 2000), ref.get("seed", 0)
    lines = ["| A - B (same users) | " + " | ".join(f"{m} difference [95% CI]" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for run, a, b in pairs:
        if popularity(run) != popularity(ref):
            raise ValueError("cross-file pairs need the same test users and candidates (popularity ranks differ)")
        a_row = next(r for r in run["rows"] if r["method"] == a)
        cells = []
        for m in metrics:
            d = paired_comparison(a_row["ranks"], b_rows[b]["ranks"], m, n_boot, seed)
            cells.append(f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# the later X-Cross trainings on the 80-user pool that were ranked on the test users, and their JSON
XCROSS_LR_SCORED = {"xcross-80-lr1e-5": "quality-Tools-likelihood-lr.json",
                    "xcross-80-pmi-lr1e-5": "quality-Tools-likelihood-lr.json",
                    "xcross-80-pmi-bias-lr3e-3": "quality-Tools-likelihood-bias.json"}


def quality_tools_likelihood_lr() -> str:
    """The later X-Cross models (lr 1e-5 raw and PMI objective; biases only at lr 3e-3) ranked on the test
    users of the main likelihood table, and paired against the step-0 mix (xcross-80) there."""
    ref = _load("quality-Tools-likelihood.json")
    files = {f: _load(f) for f in sorted(set(XCROSS_LR_SCORED.values()))}
    runs = {n: files[f] for n, f in XCROSS_LR_SCORED.items()}
    by = {n: next(r for r in runs[n]["rows"] if r["method"] == n) for n in XCROSS_LR_SCORED}
    later = {f: run for f, run in files.items() if f != "quality-Tools-likelihood-lr.json"}
    extra = [r for run in later.values() for r in run["rows"] if r.get("model") in XCROSS_LR_SCORED]
    pairs = [(runs[n], f"{n}{suffix}", f"xcross-80{suffix}") for n in XCROSS_LR_SCORED for suffix in ("", "+pmi")]
    cfgs = {n: _load(f"logs/quality-Tools-likelihood/{n}-train_log.json")["config"] for n in XCROSS_LR_SCORED}
    val = "; ".join(f"{n} ({'PMI' if cfgs[n].get('calibrate') else 'raw'} cross-entropy over 1 + "
                    f"{cfgs[n]['val_neg']} candidates, {cfgs[n]['max_val_users']} users): {by[n]['val_loss_start']:.3f}"
                    f" -> {by[n]['val_loss_best']:.3f} in {by[n]['steps']} steps" for n in XCROSS_LR_SCORED)
    more = ""
    if extra:
        notes = "; ".join(f"`bench/results/{f}`: {run['wall_seconds']} s wall, load average "
                          f"{run['load_average'][0]} at the start and {run['load_average'][1]} at the end"
                          for f, run in later.items())
        more = ("\nRanked the same way in a later run (" + notes + "):\n\n" + "\n".join(_metric_rows(extra)) + "\n")
    return (quality_table("quality-Tools-likelihood-lr.json") + more + f"\nValidation loss, step 0 -> kept: {val}.\n"
            "\nAgainst the step-0 mix (`xcross-80` of the table above: `W_concat = 0`, `w = 1/2`), same users and "
            "candidates, paired bootstrap:\n\n" + _cross_file_pairs(ref, pairs, ("HR@1", "HR@10", "MRR")))


def quality_tools_weave_listwise() -> str:
    """Listwise generation of the WeaveRec rows (the saved adapters of quality-Tools-weave.json, reloaded),
    with intervals, exact/fallback counts, and each row against its own likelihood mode."""
    run, ref = _load("quality-Tools-weave-listwise.json"), _load("quality-Tools-weave.json")
    models = [r for r in run["rows"] if r.get("mode") == "listwise"]
    ref_loss = {r["model"]: r["val_loss_best"] for r in ref["rows"] if r.get("mode") == "likelihood"}
    same = all(abs(r["val_loss_best"] - ref_loss[r["model"]]) < 1e-4 for r in models)
    counts = "; ".join(f"{r['model']} {r['exact']}/{r['fallback']}" for r in models)
    pairs = [(run, r["method"], f"{r['model']}/likelihood") for r in models]
    return (quality_table("quality-Tools-weave-listwise.json") + f"\nUsers whose generated title matched a "
            f"candidate exactly / fell back to the likelihood: {counts}. The reloaded adapters' validation "
            f"losses {'equal' if same else 'DIFFER FROM'} those of the likelihood table (to 1e-4).\n\n"
            "Listwise generation against the likelihood mode of the same adapters, same users, paired bootstrap:"
            "\n\n" + _cross_file_pairs(ref, pairs, ("HR@1", "HR@10", "MRR")))


def xcross_encoder_diagnosis() -> str:
    """examples/xcross_encoder_diagnosis.py: features, head-only learning and gradient norms per pooling."""
    run = _load("xcross-encoder-diagnosis.json")
    lines = ["| pooling | cosine between a user's candidates | variance between candidates | head lr | "
             "train loss start -> end | val loss start -> best (epoch) | val HR@1 / MRR at the end |",
             "|---|---|---|---|---|---|---|"]
    for pooling, row in run["pooling"].items():
        div = row["diversity"]
        for h in row["head_only"]:
            lines.append(f"| {pooling} | {div['mean_cosine_between_candidates']:.3f} | "
                         f"{div['share_of_variance_between_candidates']:.3f} | {h['lr']:g} | "
                         f"{h['train_loss_start']:.3f} -> {h['train_loss_end']:.3f} | {h['val_loss_start']:.3f} -> "
                         f"{h['val_loss_best']:.3f} ({h['best_epoch']}) | {h['val_hr1_end']:.3f} / "
                         f"{h['val_mrr_end']:.3f} |")
    z = run["zero_shot_history_candidate_cosine"]
    g = run["grad_norms_first_step"]
    note = (f"\n{run['train_users']} training and {run['val_users']} validation users of {run['target']}, "
            f"{run['candidates']} candidates each (chance: loss {run['chance_loss']:.3f}, HR@1 0.100, MRR 0.293). "
            f"Zero-shot cosine between the history's and the candidate's tokens in the same pass: HR@1 "
            f"{z['val_hr1']:.3f}, MRR {z['val_mrr']:.3f}. Gradient norms at the first step of LoRA + head "
            "training: " + "; ".join(f"`{k}` pooling: head {v['head']:.3f}, lora_B {v['lora_B']:.3f}, lora_A "
                                      f"{v['lora_A']:.3f}" for k, v in g.items())
            + f". {run['seconds']} s wall (`python examples/xcross_encoder_diagnosis.py`).")
    out = "\n".join(lines) + "\n" + note + "\n"
    if run.get("fixed_batch"):
        out += ("\nLoRA + head on one fixed batch of real examples (8 users x 5 candidates, chance loss 1.609, AdamW "
                "lr 1e-3; `--fixed-batch`):\n\n| pooling | loss at steps 1, 2, 4, 8, 12 |\n|---|---|\n")
        for r in run["fixed_batch"]:
            out += f"| {r['pooling']} | " + ", ".join(f"{r['loss'][i]:.4f}" for i in (0, 1, 3, 7, 11)) + " |\n"
    if run.get("training_runs"):
        out += ("\nLoRA + head across users (`--train-runs`): one epoch over that many Tools training users, 1 + 3 "
                "candidates, batch 16, 10 warm-up steps; validation on 120 users x 10 candidates (chance 2.303):\n\n"
                "| pooling | head lr | LoRA lr | users (steps) | train loss, last 20 steps (chance 1.386) | "
                "val loss per validation | val MRR first -> last | score spread within a user | seconds |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        for r in run["training_runs"]:
            out += (f"| {r['pooling']} | {r['head_lr']:g} | {r['lora_lr']:g} | {r['train_users']} ({r['steps']}) | "
                    f"{r['train_loss_last20_mean']:.3f} | " + ", ".join(f"{v['loss']:.3f}" for v in r["val"])
                    + f" | {r['val'][0]['mrr']:.3f} -> {r['val'][-1]['mrr']:.3f} | "
                    f"{r['val_score_spread_within_user']:.3f} | {r['seconds']:.0f} |\n")
        load = run.get("training_parts_load_average")
        if load:
            out += f"\nLoad average after these runs: {', '.join(str(x) for x in load)} (1, 5, 15 min).\n"
    return out


def xcross_scoring_cpu() -> str:
    run = _load("xcross-scoring-cpu.json")
    s = run["seconds_per_user"]
    return "\n".join([
        "| scoring | seconds per user (30 candidates) |", "|---|---|",
        f"| X-Cross, one forward per (user, candidate) pair | {s['xcross_per_pair']:.2f} |",
        f"| X-Cross, shared prefix | {s['xcross_shared_prefix']:.2f} |",
        f"| one adapter, shared prefix (`PrefixLikelihoodScorer`) | {s['one_adapter_shared_prefix']:.2f} |",
        "",
        f"{run['base']}, {run['streams']} streams, {run['users']} {run['target']} test users x {run['candidates']} "
        f"candidates (prompts {run['mean_prompt_tokens']:.0f} tokens, titles {run['mean_title_tokens']:.1f} tokens on "
        f"average), {run['threads']} threads, median of {run['reps']}; shared prefix "
        f"{run['speedup_shared_prefix']:.2f}x faster than one forward per pair, {run['xcross_vs_one_adapter']:.2f}x "
        f"the cost of one adapter; largest difference between the two X-Cross scorings "
        f"{run['max_abs_score_difference']:.1e} (mean log-probability per title token); load average "
        f"{run['load_average'][0]} at the start, {run['load_average'][1]} at the end "
        "(`python bench/bench_xcross_scoring.py --users 4 --reps 2`).", ""])


def xcross_integrator_stability() -> str:
    run = _load("xcross-integrator-stability.json")
    lines = ["| layer | token RMS, median | token RMS, max | largest entry |", "|---|---|---|---|"]
    for r in run["hidden_scale"][::5] + ([run["hidden_scale"][-1]] if len(run["hidden_scale"]) % 5 != 1 else []):
        lines.append(f"| {r['layer']} | {r['rms_median']:.2f} | {r['rms_max']:.1f} | {r['abs_max']:.0f} |")
    lines += ["", "| integrator | title score | lr | training loss per step | stopped on a non-finite loss at step | "
                  "val loss start -> end | val HR@1 start -> end |", "|---|---|---|---|---|---|---|"]
    for r in run["runs"]:
        val = f"{r['val_start']:.3f} -> {r['val_end']:.3f}" if r.get("diverged_at") is None else "-"
        hr = f"{r['val_hr1_start']:.3f} -> {r['val_hr1_end']:.3f}" if r.get("diverged_at") is None else "-"
        lines.append(f"| {r['integrator_norm']} | {r.get('likelihood_reduce', 'sum')} | {r['lr']:g} | "
                     f"{', '.join(f'{x:.2f}' for x in r['train_loss'])} | "
                     f"{r['diverged_at'] or 'no'} | {val} | {hr} |")
    lines += ["", f"{run['base']}, adapters {' + '.join(run['adapters'])} -> {run['target']}; {run['steps']} steps of "
              f"{run['batch_size']} users x (1 + {run['negatives']}) candidates, validation on {run['val_users']} "
              f"users x {run['val_candidates']} candidates (chance loss {run['chance_val_loss']}); {run['machine']}, "
              f"load average {run['load_average_end']} at the end (`python examples/xcross_integrator_stability.py`)."]
    return "\n".join(lines) + "\n"


def sharded_eval_cpu() -> str:
    """bench/bench_sharded_eval.py: one process against two, same users and scorers."""
    run = _load("sharded-eval-cpu.json")
    one = run["runs"][0]
    lines = ["| processes | command wall s | " + " | ".join(f"{n} fit s | {n} score s" for n in one["timing"])
             + " | scoring speed-up |", "|---|---|" + "---|---|" * len(one["timing"]) + "---|"]
    base = sum(t["score_seconds"] for t in one["timing"].values())
    for r in run["runs"]:
        score = sum(t["score_seconds"] for t in r["timing"].values())
        cells = " | ".join(f"{t['fit_seconds']:.1f} | {t['score_seconds']:.1f}" for t in r["timing"].values())
        lines.append(f"| {r['processes']} | {r['command_seconds']:.1f} | {cells} | {base / score:.2f}x |")
    note = (f"\n`{run['command']}` on {one['n_users']} users, one thread per process, {run['machine']}, load "
            f"average {run['load_average'][0]} at the start and {run['load_average'][1]} at the end; metrics "
            f"identical between the two runs: {'yes' if run['identical_metrics'] else 'NO'}.")
    return "\n".join(lines) + "\n" + note + "\n"


# --------------------------------------------------------------------------------------------- bad input

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def fsdp_memory_cpu() -> str:
    run = _load("fsdp-memory-cpu.json")
    cols = ("nf4_buffers", "frozen_params", "trainable", "grads", "optimizer_state")
    head = "| processes | parallel | NF4 base (replicated) | other frozen parameters | trainable | gradients | " \
        "optimizer state | s / step |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in run["runs"]:
        lines.append(f"| {r['processes']} | {r['parallel']} | " + " | ".join(_mib(r[c]) for c in cols)
                     + f" | {r['seconds_per_step']:.2f} |")
    lines += ["", f"Measured per rank after 2 of {run['steps']} steps: {run['model']}; {run['machine']}; load average "
              f"{run['load_average'][0]} at the start and {run['load_average'][1]} at the end.", "",
              "Computed from the shapes (not measured), Qwen2-7B with NF4 linear layers, bf16 embeddings, lm_head "
              "and norms, LoRA r 16 on every linear layer (float32 parameters, gradients and Adam state):", "",
              head.replace(" s / step |", "").rstrip(), "|---|---|---|---|---|---|---|"]
    for r in run["computed_qwen2_7b"]:
        lines.append(f"| {r['processes']} | {r['parallel']} | " + " | ".join(_mib(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def bad_input() -> str:
    """bench/bad_input.py's cases: the first report of each case (before) against the measured message and exit code."""
    run = _load("bad-input.json")
    lines = ["| input | before (as first reported) | after: what the user sees | exit | traceback | "
             "left on disk |", "|---|---|---|---|---|---|"]
    for c in run["cases"]:
        cell = lambda t: t.replace("|", "\\|")  # noqa: E731
        left = ", ".join(f"`{f}`" for f in c["files_left"]) or "nothing"
        lines.append(f"| `{cell(c['command'])}` | {cell(c['before'])} | {cell(c['after'])} | {c['exit_code']} | "
                     f"{'yes' if c['traceback'] else 'no'} | {left} |")
    secs = [c["seconds"] for c in run["cases"]]
    note = (f"\nEach case ran as its own process in an empty folder (`python bench/bad_input.py`, "
            f"{run['machine']}, load average {run['load_average_at_end']} at the end); each took {min(secs)}-"
            f"{max(secs)} s from start to exit. The Python API case raises, as Python code should; its traceback "
            "is the caller's.")
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


def gpu_compile_xcross() -> str:
    """X-Cross kernels per stream count before / after the coefficient-gather rewrite (slowest compilation too)."""
    lines = ["| kernel | n | version | compiled | skipped | registers | spill B (max) | shared KiB (max) | "
             "slowest compilation s |", "|" + "---|" * 9]
    docs = (("before", _compile_check("gpu-compile-check-xcross-before.json")),
            ("after", _compile_check("gpu-compile-check.json")))
    for kernel in ("xcross_fwd_kernel", "xcross_bwd_kernel"):
        for n in (2, 3, 4, 8):
            for label, doc in docs:
                rs = [r for r in doc["records"] if r["kernel"] == kernel and r["path"] == f"xcross-n{n}"]
                ok = [r for r in rs if r["compiles"]]
                skipped = sum(bool(r.get("skipped")) for r in rs)
                if not ok:
                    lines.append(f"| `{kernel}` | {n} | {label} | 0 | {skipped} | - | - | - | - |")
                    continue
                lines.append(f"| `{kernel}` | {n} | {label} | {len(ok)} | {skipped} | {min(r['regs'] for r in ok)}-"
                             f"{max(r['regs'] for r in ok)} | {max(r['spill_bytes'] for r in ok)} | "
                             f"{max(r['shared_bytes'] for r in ok) / 1024:.0f} | "
                             f"{max(r.get('compile_s') or 0 for r in ok):.1f} |")
    return "\n".join(lines)


def _main_loop_row(doc: dict, kernel: str, path: str, direction: str, rank: int, dtype: str, arch: str) -> dict | None:
    for r in doc["records"]:
        if (r["kernel"], r["path"], r["dtype"], r["arch"]) == (kernel, path, dtype, arch) and r["compiles"] \
                and r["config"].get("direction") == direction and r["config"].get("rank") == rank \
                and r["config"].get("SPLIT_K", 1) <= 2 and r.get("loop", {}).get("decoded_elements"):
            return r
    return None


SASS_CLASSES = ("global_load", "shared", "mma", "float", "integer", "move", "local(spill)", "control")


def gpu_compile_sass() -> str:
    """SASS instructions per K step of nf4_lora_kernel's main loop, before and after (bf16, rank 16; after also
    under Triton 3.6, the GPU image's)."""
    lines = ["| kernel state | path | direction | arch | tile (N x K) | threads | loop instructions | per element "
             "(per thread) | " + " | ".join(SASS_CLASSES) + " |", "|" + "---|" * (8 + len(SASS_CLASSES))]
    for label, name in (("before", "gpu-compile-check-before.json"), ("after", "gpu-compile-check.json"),
                        ("after, Triton 3.6", "gpu-compile-check-triton36.json")):
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


def gpu_roofline() -> str:
    """The decode path's distance to the H200 bandwidth roofline, from the SASS of the main loop: issue-bound
    elements per clock (4 schedulers x 32 lanes per SM) against the bytes per element of NF4."""
    from gpu_compile_check import H200_HBM_TBS, ISSUE_PER_CLOCK, issue_bound_tbs

    lines = ["| kernel state | arch | SASS per element | issue-bound elements / clock / SM | issue-bound weight "
             "TB/s | fraction of 4.8 TB/s |", "|---|---|---|---|---|---|"]
    for label, name in (("before", "gpu-compile-check-before.json"), ("after", "gpu-compile-check.json")):
        doc = _compile_check(name)
        for arch in ("sm_90a",):
            r = _main_loop_row(doc, "nf4_lora_kernel", "decode", "forward", 16, "bfloat16", arch)
            if r is None:
                continue
            per = r["loop"]["per_element"]
            epc = ISSUE_PER_CLOCK / per
            tbs = issue_bound_tbs(per)
            lines.append(f"| {label} | {arch} | {per:g} | {epc:.1f} | {tbs:.2f} | {tbs / H200_HBM_TBS:.0%} |")
    return "\n".join(lines) + "\n"


def cuda_decode_sass() -> str:
    """The CUDA decode GEMV's main loop before / after the tensor-core rewrite (bf16, from the SASS of both)."""
    doc = _load("cuda-decode-sass.json")
    lines = [f"nvcc {doc['nvcc']}; before = `csrc/` at {doc['before_commit']}; issue-bound ceiling = "
             f"{doc['issue_per_clock']} / (SASS per element) elements per clock per SM x {doc['sms']} SMs x "
             f"{doc['ghz']} GHz x {doc['bytes_per_element']} bytes per element, against {doc['hbm_tbs']} TB/s.", "",
             "| state | kernel path | rows M | chunk GK | absmax | arch | registers | spill B | loop instructions | "
             "elements / thread / iteration | SASS per element | global_load | shared | mma | float | integer | "
             "move | control | issue-bound TB/s | of HBM |", "|" + "---|" * 20]
    for state in ("before", "after"):
        for r in doc["states"][state]:
            if r["dtype"] != "bfloat16" or r["path"] == "generic" and state == "before":
                continue
            absmax = "-" if "double_quant" not in r else ("double-quant" if r["double_quant"] else "float32")
            c = r["by_class"]
            lines.append(f"| {state} | {r['path']} | {r['rows']} | {r.get('gk', '-')} | {absmax} | {r['arch']} | "
                         f"{r.get('regs')} | {r.get('spill_bytes')} | {r['loop_instructions']} | "
                         f"{r['elements_per_thread_iteration']} | {r['per_element']:g} | "
                         + " | ".join(str(c.get(k, 0)) for k in ("global_load", "shared", "mma", "float", "integer",
                                                                   "move", "control"))
                         + f" | {r['issue_bound_tbs']:.2f} | {r['fraction_of_hbm']:.0%} |")
    return "\n".join(lines) + "\n"


def cuda_decode_sass_summary() -> str:
    """The before/after range of the CUDA decode loop's SASS per element, in words (sm_80 and sm_90a, bf16)."""
    doc = _load("cuda-decode-sass.json")

    def span(rs: list[dict], key: str) -> tuple[float, float]:
        return min(r[key] for r in rs), max(r[key] for r in rs)

    after = [r for r in doc["states"]["after"] if r["path"] == "tensor-core" and r["dtype"] == "bfloat16"]
    before = [r for r in doc["states"]["before"] if r["path"] == "cuda-core" and r["dtype"] == "bfloat16"]
    lo64, hi64 = span([r for r in after if r["gk"] == 64], "per_element")
    _, hi32 = span([r for r in after if r["gk"] == 32], "per_element")
    b_lo, b_hi = span(before, "per_element")
    t_lo, _ = span(after, "fraction_of_hbm")
    bt_lo, bt_hi = span(before, "fraction_of_hbm")
    return (f"On paper the tensor-core loop takes {lo64:g}-{hi64:g} SASS instructions per element with 64-element "
            f"chunks and at most {hi32:g} with 32-element ones, for every M from 1 to 16, against {b_lo:g}-{b_hi:g} "
            f"before: its issue-bound ceiling is at least {t_lo:.0%} of the H200's {doc['hbm_tbs']} TB/s (before "
            f"{bt_lo:.0%}-{bt_hi:.0%}), so instruction issue no longer bounds the decode.\n")


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


# --------------------------------------------------------------------------------------------- full-scale quality

FULL = "quality-Tools-full.json"
CLAIM_SCORE = "+pmi"  # the claims read the PMI rows: X-Cross trains on that objective (chosen before any run)
XCROSS_START = "xcross-0"  # X-Cross before training: examples/quality_full.py's control row


def _full_run() -> dict | None:
    """The full-scale results, or None before examples/quality_full.py has ranked a row."""
    return _load(FULL) if (RESULTS / FULL).is_file() else None


NOT_RUN = ("Not measured yet: `examples/quality_full.py` has not ranked a row (its runs train in the background; "
           "the table appears as rows finish).\n")


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _hours(seconds: float | None) -> str:
    """A training run's wall time; None where it was resumed before xkern kept every invocation's total."""
    return f"{seconds / 3600:.2f} h" if seconds is not None else "time not recorded (resumed across sessions)"


def _where_trained(timing: dict, table_cpu: str) -> str:
    """The CPU of a training's timing entry: its last invocation's, said as such where the run's total holds
    earlier invocations (a run resumed from a checkpoint another machine wrote)."""
    cpu = timing.get("cpu", table_cpu)
    last, total = timing.get("seconds_last_invocation"), timing.get("seconds")
    if last is not None and total is not None and total > last + 60:
        return f"{cpu} for its last {_hours(last)}, the rest in earlier invocations"
    return cpu


def _full_rows(run: dict, models: list[str] | None = None) -> list[str]:
    """Model rows (raw and PMI) and baselines: metrics with intervals, parameters, validation change, wall time."""
    full = next((r for r in run["rows"] if r["method"] == "lora-1.0"), None)
    lines = ["| row | fraction | users | trainable params | HR@10 | MRR | NDCG@10 | validation change [95% CI] | "
             "train s | rank s |", "|" + "---|" * 10]
    for r in run["rows"]:
        if models is not None and r.get("model", r["method"]) not in models:
            continue
        share = f" ({r['trainable_params'] / full['trainable_params']:.1%} of lora-1.0)" \
            if full and r.get("model") and r["trainable_params"] not in (0, full["trainable_params"]) else ""
        ch = r.get("val_change")
        change = (f"{r['val_loss_start']:.3f} -> {r['val_loss_best']:.3f}: {ch['diff']:+.3f} [{ch['ci_low']:+.3f}, "
                  f"{ch['ci_high']:+.3f}]" if ch else "-")
        lines.append(f"| {r['method']} | {r['fraction']} | {r['n_users']} | {r['trainable_params']:,}{share} | "
                     f"{_ci(r['metrics']['HR@10'])} | {_ci(r['metrics']['MRR'])} | {_ci(r['metrics']['NDCG@10'])} | "
                     f"{change} | {_dash(r.get('train_seconds'))} | {_dash(r.get('rank_seconds'))} |")
    return lines


def _pair(run: dict, a: str, b: str, metric: str) -> dict | None:
    return next((p for p in run["paired"] if (p["a"], p["b"], p["metric"]) == (a, b, metric)), None)


def _diff(p: dict) -> str:
    return f"{p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"


def _verdict(p: dict) -> str:
    return "above zero" if p["ci_low"] > 0 else ("below zero" if p["ci_high"] < 0 else "the interval includes zero")


def quality_tools_full_gpu_estimate() -> str:
    """examples/quality_full.py --estimate-gpu: FLOPs of every step, the CPU rate where it ran, an H200 estimate."""
    path = RESULTS / "gpu-estimate-quality-Tools-full.json"
    if not path.is_file():
        return NOT_RUN
    d = json.loads(path.read_text())
    lo, hi = d["gpu_utilization"]
    lines = [f"Source: `bench/results/{path.name}` ({d['note']}). Forward FLOPs per token "
             f"{d['forward_flops_per_token'] / 1e6:.0f} M (SmolLM2's matmuls and LM head); training tokens measured "
             f"where a LoRA run finished, else its examples x {d['tokens_per_training_example']:g} tokens; "
             "validation tokens counted on each run's validation examples, times its validations; ranking "
             f"tokens counted ({d['rank_users']} users, each prompt once and 30 titles, and the PMI prior's titles). "
             f"H200 at {lo:.0%} and {hi:.0%} of its {d['h200_bf16_tflops']:g} TFLOP/s bf16 peak (assumed, not "
             "measured).", "",
             "| step | tokens | validation tokens x validations | FLOPs | CPU seconds (measured, on) | CPU TFLOP/s "
             "| H200 seconds |", "|" + "---|" * 7]
    for st in d["steps"]:
        on = f" ({st['cpu'].replace('(R)', '').removesuffix(' Processor')})" if st.get("cpu") else ""
        cpu = f"{st['cpu_seconds']:.0f}{on}" if st["cpu_seconds"] else "-"
        rate = f"{st['cpu_tflops_achieved']:.3f}" if st["cpu_tflops_achieved"] else "-"
        est = "" if st["tokens_measured"] else " (estimated)"
        val = f"{st['validation_tokens']:,} x {st['validations']}" if "validations" in st else "-"
        lines.append(f"| {st['step']} | {st['tokens']:,}{est} | {val} | {st['flops']:.3g} | {cpu} | {rate} | "
                     f"{st['gpu_seconds'][1]:g}-{st['gpu_seconds'][0]:g} |")
    cpu_rates = [st["cpu_tflops_achieved"] for st in d["steps"] if st["cpu_tflops_achieved"]]
    cpu_hours = d["total_flops"] / (statistics.mean(cpu_rates) * 1e12) / 3600 if cpu_rates else None
    lines += ["", f"The whole table: {d['total_flops']:.3g} FLOPs, "
              + (f"about {cpu_hours:.0f} h at the mean of the CPU rates measured above, " if cpu_hours else "")
              + f"{d['total_gpu_hours'][1] * 60:.0f}-{d['total_gpu_hours'][0] * 60:.0f} min on an H200 by FLOPs. "
              "Batches of 8 short sequences through SmolLM2-135M launch many small kernels per step, so the GPU's "
              "time is more likely bound by launches than by FLOPs; the FLOP estimate is a floor."]
    return "\n".join(lines) + "\n"


def quality_tools_full() -> str:
    """examples/quality_full.py: every row on all test users, the paired comparisons, what is still missing."""
    run = _full_run()
    if run is None:
        return NOT_RUN
    lines = _full_rows(run)
    lines += ["", "| A - B (same users) | HR@10 difference [95% CI] | MRR difference [95% CI] |", "|---|---|---|"]
    for p in run["paired"]:
        if p["metric"] != "HR@10":
            continue
        mrr = _pair(run, p["a"], p["b"], "MRR")
        lines.append(f"| {p['a']} - {p['b']} | {_diff(p)} | {_diff(mrr) if mrr else '-'} |")
    m = run["machine"]
    timing = "; ".join(f"{k.removeprefix('train:')} {_hours(v['seconds'])} ({_where_trained(v, m['cpu'])}, load "
                       f"{v['load_start']}-{v['load_end']})" for k, v in run["timings"].items())
    ranked_on: dict[str, list[str]] = {}
    for r in run["rows"]:
        if r.get("score") != "pmi":  # one entry per model (its raw and PMI rows share their scores) and baseline
            # not the table's machine: a row carried from an earlier invocation was ranked wherever that one ran
            cpu = r.get("rank_cpu") or "a CPU the row did not record"
            ranked_on.setdefault(cpu, []).append(r.get("model", r["method"]))
    note = (f"\nSource: `bench/results/{FULL}` ({run['command']}): {run['domain']} test users, 30 candidates each "
            f"(29 uniform negatives, seed {run['seed']}); intervals: percentile bootstrap over users, "
            f"{run['config']['n_boot']} resamples; validation change: the row's validation loss minus its start, "
            f"paired over the same validation examples. {m['threads']} threads, compute "
            f"{run['config']['compute_dtype']}; ranked on "
            + "; ".join(f"{cpu} ({', '.join(names)})" for cpu, names in ranked_on.items())
            + (f" (carried from the committed table, their runs not on the machine that wrote it: "
               f"{', '.join(run['carried_rows'])})" if run.get("carried_rows") else "")
            + f". Training wall time per run (the process's clock, so it includes "
            f"the spans the pipeline was paused for CI and benchmarks): {timing or 'none finished here'}. "
            f"Rows still missing: {', '.join(run['missing_rows']) or 'none'}.")
    moved = [f"{e['row']} {e['metric']} {e['before_metric']:.3f} "
             f"(ranked on {e['before_cpu'] or 'a CPU the row did not record'}) -> now {e['diff']:+.3f} "
             f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] ({e['now_cpu']}; the same rank for "
             f"{e['same_rank_share']:.1%} of users)" for e in run.get("reproduced", [])]
    if moved:
        note += ("\n\nRanked again from retrained runs (the same command and seed on another machine), each against "
                 "its earlier row on the same users: " + "; ".join(moved) + ".")
    sources = [f"{name} ({r['domain']}: {r['train_examples']:,} examples, {r['steps']:,} steps, validation "
               f"{r['val_loss_start_run']:.3f} -> {r['val_loss_end_run']:.3f} on {r['val_examples']} of its own users, "
               f"{_hours(r['train_seconds'])})" for name, r in run.get("source_runs", {}).items()]
    if sources:
        note += "\n\nSource LoRAs (X-Cross's frozen streams, the plain merge's parts): " + "; ".join(sources) + "."
    tails = _curve_tails()
    if tails:
        note += ("\n\nValidation over the last fifth of each finished run's steps (its learning curve; \"still "
                 "falling\": more than 0.005 lower at the end, where more epochs may pay): " + "; ".join(tails) + ".")
    return "\n".join(lines) + "\n" + note + "\n"


def _curve_tails() -> list[str]:
    """Per training log committed with the full-scale table: the validation loss at the first evaluation in the
    last fifth of its steps and at its last, and whether it was still falling."""
    out = []
    for path in sorted((RESULTS / "logs" / FULL.removesuffix(".json")).glob("*-train_log.json")):
        log = json.loads(path.read_text())
        evals = [e for e in (log.get("eval_loss") or log.get("val") or []) if e.get("loss") is not None]
        if len(evals) < 2:
            continue
        last = evals[-1]
        first = next(e for e in evals if e["step"] >= 0.8 * last["step"])
        if first is last:
            first = evals[-2]
        change = last["loss"] - first["loss"]
        trend = "still falling" if change < -0.005 else ("rising" if change > 0.005 else "flat")
        out.append(f"{path.name.removesuffix('-train_log.json')} {first['loss']:.3f} (step {first['step']}) -> "
                   f"{last['loss']:.3f} (step {last['step']}), {change:+.3f}, {trend}")
    return out


def _claim(run: dict, a: str, b: str, score: str = CLAIM_SCORE) -> tuple[dict, dict] | None:
    """(HR@10, MRR) paired comparisons of rows ``a`` and ``b`` scored by ``score`` ("" for likelihood)."""
    hr, mrr = _pair(run, a + score, b + score, "HR@10"), _pair(run, a + score, b + score, "MRR")
    return (hr, mrr) if hr and mrr else None


def _params(run: dict, name: str) -> int | None:
    return next((r["trainable_params"] for r in run["rows"] if r["method"] == name), None)


def _xcross_start_claims(run: dict, trained: list[str]) -> list[str]:
    """X-Cross before training (the source LoRAs mixed equally, no target data) against the target LoRA, and
    what training on the target added to each X-Cross row: where its gain over the LoRA comes from."""
    c = _claim(run, XCROSS_START, "lora-1.0")
    if c is None:
        return [f"- X-Cross before training against the LoRA on all users: not measured yet (`{XCROSS_START}` or "
                "`lora-1.0` missing)."]
    hr, mrr = c
    out = [f"- X-Cross before training (integrators zero, the two source LoRAs weighted equally, no Tools data) "
           f"minus the target LoRA on all users (PMI scores): HR@10 {_diff(hr)} ({_verdict(hr)}), MRR {_diff(mrr)} "
           f"({_verdict(mrr)})."]
    for name in trained:
        c = _claim(run, name, XCROSS_START)
        if c:
            out.append(f"- What training on {name.removeprefix('xcross-')} of the Tools users added ({name} minus "
                       f"X-Cross before training, PMI scores): HR@10 {_diff(c[0])} ({_verdict(c[0])}), MRR "
                       f"{_diff(c[1])} ({_verdict(c[1])}).")
    return out


def quality_tools_full_xcross_claims() -> str:
    """X-Cross's claims answered on the full-scale rows (or what is missing to answer them)."""
    run = _full_run()
    if run is None:
        return NOT_RUN
    out = []
    lora = _params(run, "lora-1.0")
    names = {r["model"] for r in run["rows"] if r.get("model", "").startswith("xcross-")}
    names |= {n for n in run["missing_rows"] if n.startswith("xcross-")}
    names.discard(XCROSS_START)
    for f in sorted((n.removeprefix("xcross-") for n in names), key=float, reverse=True):
        c = _claim(run, f"xcross-{f}", "lora-1.0")
        if c is None:
            out.append(f"- X-Cross on {f} of the users against the LoRA on all of them: not measured yet "
                       f"(`xcross-{f}` or `lora-1.0` missing).")
            continue
        hr, mrr = c
        share = _params(run, f"xcross-{f}") / lora
        out.append(f"- X-Cross on {f} of the Tools training users, with {share:.1%} of the LoRA's trainable "
                   f"parameters, minus the target LoRA on all of them (PMI scores, {hr['n_users']} users): HR@10 "
                   f"{_diff(hr)} ({_verdict(hr)}), MRR {_diff(mrr)} ({_verdict(mrr)}).")
    out += _xcross_start_claims(run, sorted(names, key=lambda n: float(n.removeprefix("xcross-"))))
    best = [p for p in run["paired"] if p["b"] == "sasrec" and p["metric"] == "HR@10"]
    if best:
        top = max(best, key=lambda p: p["ci_low"])
        out.append(f"- Best language-model row against SASRec on HR@10: {top['a']} {_diff(top)} "
                   f"({'above zero' if top['ci_low'] > 0 else 'not above zero'}).")
    return "\n".join(out) + "\n"


def quality_tools_full_weave() -> str:
    """WeaveRec's rows on all test users and its claim (or what is missing to answer it)."""
    run = _full_run()
    if run is None:
        return NOT_RUN
    lines = _full_rows(run, ["weave-merge", "plain-merge", "joint", "lora-1.0"])
    claims = []
    for a, b, what in (("weave-merge", "plain-merge", "WeaveRec's merge minus the plain merge"),
                       ("weave-merge", "lora-1.0", "WeaveRec's merge minus the target-only LoRA"),
                       ("weave-merge", "joint", "WeaveRec's merge minus the joint model"),
                       ("plain-merge", "lora-1.0", "The plain merge minus the target-only LoRA, its degradation")):
        c = _claim(run, a, b)
        if c is None:
            claims.append(f"- {what}: not measured yet (`{a}` or `{b}` missing).")
            continue
        hr, mrr = c
        line = (f"- {what} (PMI scores, {hr['n_users']} users): HR@10 {_diff(hr)}, MRR {_diff(mrr)}: "
                f"HR@10 {_verdict(hr)}")
        likelihood = _claim(run, a, b, score="")  # the same comparison on the likelihood rows: it reads differently
        if likelihood is not None:
            lik_hr, lik_mrr = likelihood
            line += (f"; likelihood scores: HR@10 {_diff(lik_hr)}, MRR {_diff(lik_mrr)}: HR@10 "
                     f"{_verdict(lik_hr)}")
        claims.append(line + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(claims) + "\n"


# --------------------------------------------------------------------------------------------- serving

def serve_cpu() -> str:
    """bench/bench_serve.py: rank_batch against one user at a time, and the server at each offered load."""
    path = _latest("serve-cpu.json")
    d = json.loads(path.read_text())
    m, rb = d["machine"], d["rank_batch"]
    lines = [f"`Recommender.rank_batch` of {rb['users']} users x {rb['candidates']} candidates across "
             f"{len(rb['runs'])} domains ({', '.join(rb['runs'])}): {rb['batched_users_per_s']} users/s in one call "
             f"against {rb['one_at_a_time_users_per_s']} one `rank` call per user, **{rb['speedup']}x**; largest "
             f"score difference {rb['max_abs_score_difference']:.1e} (best of {rb['repeats']}).", "",
             "| mode | clients | requests/s | p50 ms | p99 ms | mean batch | max batch | statuses |", "|" + "---|" * 8]
    for name, mode in d["modes"].items():
        for clients, r in mode["loads"].items():
            peak = " (peak)" if int(clients) == mode["peak"]["clients"] else ""
            lines.append(f"| {name} | {clients}{peak} | {r['requests_per_s']:.1f} | {r['latency_ms_p50']:.0f} | "
                         f"{r['latency_ms_p99']:.0f} | {r['batch_size_mean']} | {r['batch_size_max']} | "
                         + ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()) + " |")
    what = f"k {d['k']}, the {d['retriever']} retriever's top {d['top_n']} re-ranked" if d["candidates"] is None \
        else f"{d['candidates']} candidates"
    batched, one = d["modes"]["batched"], d["modes"]["one-at-a-time"]
    lines += ["", f"`xkern serve` in its own process on loopback, closed-loop clients spread over the domains, "
              f"`POST {d['endpoint']}` ({what}), {d['requests_per_load']} requests per load; batched: "
              f"`{batched['command']}`; {d['runs']}; {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch "
              f"threads, load average {m['load_average_before'][0]} before and {m['load_average_after'][0]} after; "
              f"measured {d['date']} (`bench/results/{path.name}`). At each mode's peak, batched answers "
              f"{d['speedup_at_peak']}x the requests per second of one at a time ({batched['peak']['requests_per_s']}"
              f" at {batched['peak']['clients']} clients, p99 {batched['peak']['latency_ms_p99']:.0f} ms, against "
              f"{one['peak']['requests_per_s']} at {one['peak']['clients']}, p99 "
              f"{one['peak']['latency_ms_p99']:.0f} ms)."]
    return "\n".join(lines) + "\n"


def readme_recommend() -> str:
    """The README's lines from a trained run to a recommendation, as timed by bench/bench_serve.py."""
    path = _latest("serve-cpu.json")
    d = json.loads(path.read_text())
    cells = " | ".join(f"`{k}` {v:.2f} s" for k, v in d["readme"]["seconds"].items())
    return (f"Measured ({d['machine']['cpu']}, {d['machine']['cores']} cores, {d['date']}, "
            f"`bench/results/{path.name}`): {cells}.\n")


# --------------------------------------------------------------------------------------------- registry

BLOCKS: dict[str, Callable[[], str]] = {
    "quickstart-quick": quickstart_quick,
    "quickstart-full": quickstart_full,
    "quickstart-time": quickstart_time,
    "quickstart-quick-vs-full": quickstart_quick_vs_full,
    "lora-linear-cpu-file": lora_linear_cpu_file,
    "lora-linear-cpu-targets": lora_linear_cpu_targets,
    "lora-linear-cpu-table": lora_linear_cpu_table,
    "runtime-cpu": runtime_cpu,
    "runtime-targets": runtime_targets,
    "profile-forward": profile_forward,
    "scoring-cpu": scoring_cpu,
    "train-precision": train_precision,
    "bad-input": bad_input,
    "quality-tools-baselines": quality_tools_baselines,
    "quality-tools-likelihood": quality_tools_likelihood,
    "quality-tools-weave": quality_tools_weave,
    "quality-tools-weave-listwise": quality_tools_weave_listwise,
    "quality-tools-likelihood-lr": quality_tools_likelihood_lr,
    "xcross-likelihood-lr": xcross_likelihood_lr,
    "xcross-encoder-diagnosis": xcross_encoder_diagnosis,
    "sharded-eval-cpu": sharded_eval_cpu,
    "xcross-integrator-stability": xcross_integrator_stability,
    "xcross-scoring-cpu": xcross_scoring_cpu,
    "fsdp-memory-cpu": fsdp_memory_cpu,
    "gpu-compile-summary": gpu_compile_summary,
    "gpu-compile-xcross": gpu_compile_xcross,
    "gpu-compile-sass": gpu_compile_sass,
    "gpu-roofline": gpu_roofline,
    "cuda-decode-sass": cuda_decode_sass,
    "cuda-decode-sass-summary": cuda_decode_sass_summary,
    "gpu-compile-table": gpu_compile_table,
    "gpu-compile-triton36": gpu_compile_triton36,
    "serve-cpu": serve_cpu,
    "readme-recommend": readme_recommend,
    "quality-tools-full": quality_tools_full,
    "quality-tools-full-xcross-claims": quality_tools_full_xcross_claims,
    "quality-tools-full-weave": quality_tools_full_weave,
    "quality-tools-full-gpu-estimate": quality_tools_full_gpu_estimate,
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
