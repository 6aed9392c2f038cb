"""PNG plots of xkern results: recommendation metrics (demo / eval JSON), learning curves (the
``train_log.json`` of ``xkern train-lora`` / ``train-xcross``) and kernel benchmarks.

Readers are tolerant on purpose: benchmark JSON is written by several scripts over time, so a record
only needs a name-like field and an `ms`-like number; other numeric `*_ms` / `baseline*` fields
become the comparison bars. matplotlib is imported lazily with the Agg backend (no display).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xkern.errors import InputError


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e


def classify(obj: Any) -> str:
    """'demo', 'eval' or 'bench' for a loaded results JSON."""
    if isinstance(obj, dict) and obj.get("kind") == "xkern-demo":
        return "demo"
    if isinstance(obj, dict) and obj.get("kind") == "xkern-eval":
        return "eval"
    if isinstance(obj, dict) and isinstance(obj.get("train_loss"), list):
        return "train-log"
    if bench_records(obj):
        return "bench"
    raise InputError("unrecognised results JSON (expected an xkern demo/eval report or benchmark records)")


def metric_rows(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {method, fraction (float or None), <metrics>} from a demo or eval report."""
    key = "rows" if obj.get("kind") == "xkern-demo" else "results"
    found = obj.get(key, [])
    if not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
        raise InputError(f"{obj.get('kind')} report: {key!r} must be a list of objects, got {type(found).__name__}")
    rows = []
    for r in found:
        if key == "rows":
            frac = r.get("fraction")
            rows.append({**r, "fraction": frac if isinstance(frac, (int, float)) else None})
        else:
            rows.append({**r, "method": r.get("scorer", r.get("method", "?")), "fraction": None})
    return rows


def plot_metrics(
    rows: list[dict[str, Any]],
    out: str | Path,
    metrics: Sequence[str] = ("HR@10", "NDCG@10"),
    title: str = "",
) -> Path:
    """One panel per metric. With several data fractions: a line per method over the fraction
    (fraction-independent methods as dashed horizontals); otherwise a bar per method."""
    plt = _plt()
    present = [k for k in rows[0] if k.startswith(("HR@", "NDCG@")) or k == "MRR"] if rows else []
    metrics = [m for m in metrics if m in present] or present[:2]  # fall back to what was measured
    if not metrics:
        raise InputError("no HR@k / NDCG@k / MRR metrics in the results")
    fractions = sorted({r["fraction"] for r in rows if r["fraction"] is not None})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        if len(fractions) > 1:
            for i, m in enumerate(methods):
                pts = sorted(
                    (r["fraction"], r[metric]) for r in rows if r["method"] == m and r["fraction"] is not None
                )
                color = f"C{i % 10}"
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=m, color=color)
                for r in rows:
                    if r["method"] == m and r["fraction"] is None:
                        ax.axhline(r[metric], linestyle="--", label=m, color=color)
            ax.set_xlabel("fraction of target training data")
            ax.set_xticks(fractions)
        else:
            vals = [next(r[metric] for r in rows if r["method"] == m) for m in methods]
            ax.bar(range(len(methods)), vals, color=[f"C{i % 10}" for i in range(len(methods))])
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if len(fractions) > 1:
        axes[0][-1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def bench_records(obj: Any) -> list[dict[str, Any]]:
    """Normalised benchmark records [{label, ms, baselines: {name: ms}}] from a list of dicts or a
    dict holding one under results/records/benchmarks; records without a usable time are dropped."""
    if isinstance(obj, dict):
        obj = next(
            (obj[k] for k in ("results", "records", "benchmarks") if isinstance(obj.get(k), list)), None
        )
    if not isinstance(obj, list):
        return []
    out = []
    for rec in obj:
        if not isinstance(rec, dict):
            continue
        ms = next((rec[k] for k in ("ms", "xkern_ms", "time_ms") if _num(rec.get(k))), None)
        if ms is None:
            continue
        base = {
            k.removesuffix("_ms").removeprefix("baseline_"): float(v)
            for k, v in rec.items()
            if k not in ("ms", "xkern_ms", "time_ms")
            and _num(v)
            and (k.endswith("_ms") or k.startswith("baseline"))
        }
        label = str(rec.get("name", rec.get("op", "?")))
        for key in ("shape", "M", "n_adapters"):
            if rec.get(key) is not None:
                label += f" {key}={rec[key]}" if key != "shape" else f" {rec[key]}"
        out.append({"label": label, "ms": float(ms), "baselines": base})
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v > 0


def plot_bench(records: list[dict[str, Any]], out: str | Path, title: str = "kernel benchmarks") -> Path:
    """Grouped bars of time (ms, log scale) per benchmark: xkern vs each baseline."""
    plt = _plt()
    if not records:
        raise InputError("no benchmark records with a time in ms")
    series = ["xkern", *dict.fromkeys(b for r in records for b in r["baselines"])]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(records) * len(series) ** 0.5 + 2), 4.5))
    for j, s in enumerate(series):
        vals = [r["ms"] if s == "xkern" else r["baselines"].get(s, 0.0) for r in records]
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(records))]
        ax.bar(xs, vals, width=width, label=s, color=f"C{j % 10}")
    ax.set_yscale("log")
    ax.set_ylabel("time (ms, lower is better)")
    ax.set_xticks(range(len(records)), [r["label"] for r in records], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, out)


def learning_curve(log: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """``{series: [(step, value), ...]}`` from a ``train_log.json`` of ``xkern train-lora`` or ``train-xcross``.

    Training loss per step (a list of numbers, or of ``{"step", "loss"}``), and each validation
    series (``val`` / ``eval_loss`` records: ``loss``, and ``mrr`` / ``hr@1`` where X-Cross has them).
    """
    out: dict[str, list[tuple[int, float]]] = {}
    train = log.get("train_loss") or []
    out["train loss"] = [(int(e["step"]), float(e["loss"])) if isinstance(e, dict) else (i + 1, float(e))
                         for i, e in enumerate(train)]
    for record in log.get("val") or log.get("eval_loss") or []:
        if isinstance(record, dict):
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    out.setdefault(f"val {key}", []).append((step, float(value)))
        else:  # [step, loss]
            out.setdefault("val loss", []).append((int(record[0]), float(record[1])))
    return {k: v for k, v in out.items() if v}


def plot_learning_curve(log: dict[str, Any], out: str | Path, title: str = "learning curve") -> Path:
    """Losses (left) and validation ranking metrics (right, where logged) against the optimizer step."""
    series = learning_curve(log)
    if not series:
        raise InputError("the training log holds no losses to plot")
    ranking = {k: v for k, v in series.items() if not k.endswith("loss")}
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if ranking else 1, figsize=(10 if ranking else 6, 3.6), squeeze=False)
    for name, points in series.items():
        if name.endswith("loss"):
            axes[0][0].plot(*zip(*points, strict=True), marker="o" if name.startswith("val") else None,
                            markersize=3, label=name)
    axes[0][0].set_xlabel("optimizer step")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend()
    for name, points in ranking.items():
        axes[0][1].plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    if ranking:
        axes[0][1].set_xlabel("optimizer step")
        axes[0][1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig: Any, out: str | Path) -> Path:
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    _plt().close(fig)
    return p


def plot_files(
    paths: Sequence[str | Path], out_dir: str | Path, metrics: Sequence[str] = ("HR@10", "NDCG@10")
) -> list[Path]:
    """Plot every results JSON in `paths` into `out_dir`/<stem>.png; returns the PNG paths."""
    written = []
    for path in paths:
        obj = load_json(path)
        kind = classify(obj)
        target = Path(out_dir) / f"{Path(path).stem}.png"
        if kind == "bench":
            written.append(plot_bench(bench_records(obj), target, title=Path(path).stem))
        elif kind == "train-log":  # every run's log is train_log.json: name the PNG after the run's folder
            run = Path(path).resolve().parent.name
            written.append(plot_learning_curve(obj, Path(out_dir) / f"{run}-{Path(path).stem}.png",
                                               title=f"{run}: learning curve"))
        else:
            title = f"{obj.get('target') or obj.get('domain', '')} ({kind})"
            written.append(plot_metrics(metric_rows(obj), target, metrics, title=title))
    return written
