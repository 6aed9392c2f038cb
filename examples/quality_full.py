"""The full-scale quality table in one command: train what is missing, skip what is done, rank every
model on all the target's test users, write the quality results format and regenerate the doc blocks.

    python examples/quality_full.py --data ../shared/data/amazon-xcross --target Tools --sources Toys,Sports

What it trains (each an ``xkern`` command run as a subprocess, logged to ``<runs>/<name>.log``; a run
that is interrupted resumes from its checkpoint when the command is run again, a finished run, one
with its ``run.json``, is skipped):

* ``src-<S>``: a LoRA on every training user of each source domain (validated on that domain);
* ``lora-<f>``: the target-only LoRA on a fraction ``f`` of the target's training users (nested,
  seeded: ``xkern train-lora --fraction``);
* ``xcross-<f>``: X-Cross over the frozen source LoRAs on the same users (``xkern train-xcross
  --fraction``; likelihood scoring, RMS-normalised integrator input, the PMI objective, lr 1e-5);
* ``hybrid-<S>``: WeaveRec's hybrid LoRA per source, the target's training users and as many sampled
  users of the source; ``joint``: one LoRA on the target's users and as many of each source's;
* ``lora-1.0-ep2``: a second epoch of ``lora-1.0`` as a run of its own (``--init-adapter`` its adapter,
  ``--positions random``: each user's target drawn anew from their sequence), ranked as a row of its own.

What it ranks (1 + 29 uniform candidates per test user, seed 0, the harness's candidates): every
``lora-<f>`` (and ``lora-1.0-ep2``) and ``xcross-<f>``; ``xcross-0``, the control of every X-Cross row: its
model before training (integrators zero, the source streams weighted equally, no target data); ``weave-merge``
(uniform task-arithmetic merge of ``lora-1.0`` and the hybrids), ``plain-merge`` (``lora-1.0`` and the source
LoRAs) and ``joint``, each as raw mean title log-likelihood and as PMI (minus the title's score after an empty
history), and the baselines. Scores are saved per chunk of users under ``<runs>/ranks/``, so ranking resumes too.
Each model row carries its trainable parameters, validation loss at the start and at the end with the paired 95%
interval of the change over the same validation examples, and the wall time of its training and ranking.

Writes ``bench/results/quality-<target>-full.json`` (``--out``), the learning-curve plots and training
logs under ``bench/results/{plots,logs}/quality-<target>-full/``, and regenerates the doc blocks
(``bench/docs_tables.py``). ``--device cuda`` runs every command and the ranking on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xkern.ops.backends.cpu_native import cpu_model

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.25, 0.5, 1.0)
# One epoch over every user's most recent next-item example, rank 8 on every NF4 layer, linear decay.
LORA_ARGS = ("--r 8 --epochs 1 --batch-size 8 --lr 2e-4 --warmup-steps 20 --keep-best --max-val-users 200 "
             "--eval-every 100 --save-every 50")
# What the step-size study found usable for the integrators on SmolLM2 (docs/xcross.md). No activation
# checkpointing: a step of 8 users x 2 candidates x 2 streams peaks at ~4.6 GB without it and takes ~27% less time
# (xcross-0.25 trained with it: the same arithmetic, and a checkpoint resumes across the setting).
# X-Cross validates every max(50, steps / 5) steps: a validation (200 users x 10 candidates, PMI, 2 streams)
# costs about as much as 25 training steps, so a fixed 50 would spend nearly half of the largest run on it.
XCROSS_EVAL_EVERY, XCROSS_VALIDATIONS = 50, 5
# Patience as many as a run's validations, so early stopping never cuts the one epoch short (the best state is
# kept either way): the validation can rise before it falls (xcross-0.5: 2.194 at its start, 2.225 at its second
# validation, below the start only at its fourth).
XCROSS_ARGS = ("--scoring likelihood --integrator-norm rms --likelihood-reduce mean --calibrate --lr 1e-5 "
               "--batch-size 8 --n-neg 1 --val-neg 9 --max-val-users 200 --epochs 1 "
               f"--patience {XCROSS_VALIDATIONS} --keep-best --save-every 25")
BASELINES = ("random", "popularity", "item-markov", "sasrec")
VAL_USERS = 200
SECOND_EPOCH = "-ep2"  # the name of the target LoRA's second-epoch run and row: lora-1.0-ep2
# X-Cross before any training (fraction 0): what the source LoRAs give on their own, mixed as training starts;
# each X-Cross row is paired against it, so its gain over the target LoRA splits into the sources' and the training's.
XCROSS_START = "xcross-0"


@dataclass
class Run:
    """One training command and where it writes."""

    name: str
    kind: str  # "lora" or "xcross"
    argv: list[str]
    out: Path
    fraction: float | str = "-"

    @property
    def done(self) -> bool:
        return (self.out / "run.json").is_file()


@dataclass
class Row:
    """One ranked model: an adapter run, a merge of adapter runs, or an X-Cross run."""

    name: str
    kind: str  # "adapter", "merge" or "xcross"
    parts: list[str]  # the runs it is made of
    fraction: float | str = "-"
    sources: list[str] = field(default_factory=list)
    start_of: str | None = None  # an untrained row: the model this X-Cross run starts from, before its first step


def fraction_name(f: float) -> str:
    return f"{f:g}" if f != 1 else "1.0"


def plan(args: argparse.Namespace, n_target_users: int, landed: frozenset[str] = frozenset()) \
        -> tuple[dict[str, Run], dict[str, Row], list[tuple[str, Any]]]:
    """The runs, the ranked rows, and the order of work: ``("train", run)`` and ``("rank", row)`` steps,
    cheapest answers first (the target LoRA on all users, then the sources X-Cross needs, X-Cross at the
    smallest fraction...). A ``landed`` row (in the table already) needs no step of its own: its runs train only
    where a missing row needs them, and it is ranked again as soon as all its runs are here, so that the rows
    made of the same runs are compared on the same runs."""
    runs_dir = Path(args.runs)
    common = ["--data", str(args.data), "--model", args.model, "--seed", str(args.seed), "--no-progress",
              "--threads", str(args.threads)] + (["--device", args.device] if args.device else [])
    lora = [*common, *shlex.split(LORA_ARGS), *shlex.split(args.lora_args)]
    runs: dict[str, Run] = {}

    def add(name: str, kind: str, argv: list[str], fraction: float | str = "-") -> None:
        out = runs_dir / name
        runs[name] = Run(name, kind, [*argv, "--out", str(out)], out, fraction)

    for s in args.sources:
        add(f"src-{s}", "lora", ["train-lora", *lora, "--domain", s])
    from xkern.cli import build_parser

    streams = [a for s in args.sources for a in ("--adapter", f"{s.lower()}={runs_dir / f'src-{s}' / 'adapter'}")]
    for f in args.fractions:
        add(f"lora-{fraction_name(f)}", "lora", ["train-lora", *lora, "--domain", args.target, "--fraction", str(f)], f)
        tail = ["--target", args.target, *streams, "--fraction", str(f)]
        head, user = ["train-xcross", *common, *shlex.split(XCROSS_ARGS)], shlex.split(args.xcross_args)
        cmd = build_parser().parse_args([*head, *user, *tail])
        steps = math.ceil(round(f * n_target_users) / (cmd.batch_size * cmd.grad_accum))
        every = max(XCROSS_EVAL_EVERY, math.ceil(steps / XCROSS_VALIDATIONS))  # an --eval-every in user wins
        add(f"xcross-{fraction_name(f)}", "xcross", [*head, "--eval-every", str(every), *user, *tail], f)
    cap = ["--max-train-users", str(n_target_users)]  # every target user and as many of each source's
    for s in args.sources:
        add(f"hybrid-{s}", "lora", ["train-lora", *lora, "--domain", args.target, "--train-domains",
                                    f"{args.target},{s}", *cap])
    add("joint", "lora", ["train-lora", *lora, "--domain", args.target, "--train-domains",
                          ",".join([args.target, *args.sources]), *cap])
    full = f"lora-{fraction_name(max(args.fractions))}"
    # Its validation still fell at the end of the epoch, so the target LoRA on all users gets a second one, as a
    # run of its own (the first stays a row): the same recipe started from its adapter, each user's target drawn
    # at random from their sequence (the first epoch saw the last only), with its own warm-up and decay.
    second = f"{full}{SECOND_EPOCH}"
    add(second, "lora", [*runs[full].argv[:-2], "--positions", "random", "--init-adapter",
                         str(runs[full].out / "adapter")], max(args.fractions))

    rows = {f"lora-{fraction_name(f)}": Row(f"lora-{fraction_name(f)}", "adapter", [f"lora-{fraction_name(f)}"], f)
            for f in args.fractions}
    rows.update({f"xcross-{fraction_name(f)}": Row(f"xcross-{fraction_name(f)}", "xcross",
                                                   [*(f"src-{s}" for s in args.sources), f"xcross-{fraction_name(f)}"],
                                                   f, list(args.sources)) for f in args.fractions})
    first = f"xcross-{fraction_name(min(args.fractions))}"
    rows[XCROSS_START] = Row(XCROSS_START, "xcross", [f"src-{s}" for s in args.sources], 0.0, list(args.sources),
                             start_of=first)
    rows["weave-merge"] = Row("weave-merge", "merge", [full, *(f"hybrid-{s}" for s in args.sources)], 1.0,
                              list(args.sources))
    rows["plain-merge"] = Row("plain-merge", "merge", [full, *(f"src-{s}" for s in args.sources)], 1.0,
                              list(args.sources))
    rows["joint"] = Row("joint", "adapter", ["joint"], 1.0, list(args.sources))
    rows[second] = Row(second, "adapter", [second], max(args.fractions))

    order: list[str] = [full, *(f"src-{s}" for s in args.sources)]
    fr = sorted(args.fractions)
    order += [f"xcross-{fraction_name(fr[0])}", XCROSS_START] + [f"lora-{fraction_name(f)}" for f in fr if f != max(fr)]
    order += [f"xcross-{fraction_name(f)}" for f in fr[1:-1]]
    order += ["weave-merge", "plain-merge", "joint"]
    order += [f"xcross-{fraction_name(fr[-1])}"] if len(fr) > 1 else []
    order += [second]
    steps: list[tuple[str, str]] = []
    here = {name for name, run in runs.items() if run.done}

    def rank_landed() -> None:
        for name, row in rows.items():
            if name in landed and ("rank", name) not in steps and all(p in here for p in row.parts):
                steps.extend(("train", p) for p in row.parts if ("train", p) not in steps)  # here: listed as done
                steps.append(("rank", name))

    rank_landed()
    for name in dict.fromkeys(order):
        if name in landed:
            continue
        for part in (rows[name].parts if name in rows else [name]):
            if ("train", part) not in steps:
                steps.append(("train", part))
                here.add(part)
                rank_landed()
        if name in rows:
            steps.append(("rank", name))
    if args.only:
        keep = set(args.only)
        steps = [s for s in steps if s[1] in keep]
    return runs, rows, [(k, rows[n] if k == "rank" else n) for k, n in steps]


def ranking_candidates(args: argparse.Namespace, data: Any) -> Any:
    """The harness's candidates: each test user's item and 29 uniform negatives (seeded), all users or the first
    ``--eval-users``."""
    from xkern.data.negatives import build_candidates

    return build_candidates(data, "test", 29, "uniform", args.seed, None if args.eval_users < 0 else args.eval_users)


def title_lengths(enc: Any, titles: Any) -> np.ndarray:
    """Tokens of every item's title (at least 1: an empty title still ends the prompt)."""
    return np.array([max(1, len(enc.title(t or ""))) for t in titles], dtype=np.float64)


# ------------------------------------------------------------------------------------------- GPU estimate

H200_BF16_TFLOPS = 989.0  # dense bf16 tensor-core peak
GPU_UTILIZATION = (0.05, 0.25)  # assumed share of that peak: small batches of a 135M model use little of it


def forward_flops_per_token(config: Any) -> float:
    """Matmul FLOPs of one token through a Llama-shaped decoder: q/k/v/o, the gated MLP and the LM head
    (2 per multiply-add; attention scores over these short prompts are left out)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    return 2.0 * (layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * config.vocab_size)


def gpu_estimate(args: argparse.Namespace, runs: dict[str, Run], rows: dict[str, Row],
                 landed: dict[str, Any] | None = None) -> dict[str, Any]:
    """FLOPs of every training and ranking step (the model's shape x the tokens each step processes), the CPU
    time measured where a step ran, and what those FLOPs take on an H200 at an assumed share of its peak.

    Training tokens: what a finished LoRA run reports (its last invocation's tokens/s x seconds, over all its
    steps), else its examples x the mean
    tokens per example of the finished LoRA runs. Validation tokens: counted on the run's own validation
    examples (a LoRA's prompts and titles; X-Cross's prompts and 1 + ``--val-neg`` titles, twice with
    ``--calibrate``), times its validations (those its log records, else one at the start and one per
    ``--eval-every`` steps). Ranking tokens: counted, each user's prompt once and its 30 candidate titles,
    and the PMI prior's unique titles once. Multipliers of the forward's FLOPs: training 2 per stream
    (forward, then the input gradient through the frozen base; no weight gradients), 3 with activation
    checkpointing (it recomputes the forward; as the run's log records it, else as its command sets it),
    validation and ranking 1 per stream. CPU seconds: what this machine's runs and scores recorded, else the
    landed table's (a run or row carried from a machine that is gone), each with the CPU that measured it."""
    import xkern
    from xkern.cli import build_parser
    from xkern.data.cli import load_domains
    from xkern.data.encoding import PromptEncoder
    from xkern.data.examples import causal_lm_examples
    from xkern.nn.pretrained import load_tokenizer, resolve
    from xkern.recipes import cap_users
    from xkern.xcross.train import candidate_examples

    path = resolve(args.model)
    config = xkern.load_model(path, progress=False).config
    per_token = forward_flops_per_token(config)
    domains = load_domains(args.data, [args.target, *args.sources], seed=args.seed)
    n_target = len(domains[args.target].train)
    examples = {f"src-{s}": len(domains[s].train) for s in args.sources}
    for f in args.fractions:
        examples[f"lora-{fraction_name(f)}"] = examples[f"xcross-{fraction_name(f)}"] = round(f * n_target)
    for s in args.sources:
        examples[f"hybrid-{s}"] = n_target + min(n_target, len(domains[s].train))
    examples["joint"] = n_target + sum(min(n_target, len(domains[s].train)) for s in args.sources)
    full = f"lora-{fraction_name(max(args.fractions))}"
    examples[full + SECOND_EPOCH] = examples[full]
    measured = {}
    for name, run in runs.items():
        if run.kind == "lora" and run.done:
            sm = json.loads((run.out / "summary.json").read_text())
            if sm.get("train_tokens_per_s") and sm.get("train_seconds"):  # the last call's rate and seconds
                last_call = sm["steps"] - sm.get("resumed_from_step", 0)
                measured[name] = (sm["train_tokens_per_s"] * sm["train_seconds"] * sm["steps"] / max(last_call, 1),
                                  sm["train_examples"])
    if measured:
        tokens_per_example = sum(t for t, _ in measured.values()) / sum(n for _, n in measured.values())
    else:
        tokens_per_example = float("nan")
    data = domains[args.target]
    cands = ranking_candidates(args, data)
    enc = PromptEncoder(load_tokenizer(path), data.name, max_history=args.max_history)
    title_len = title_lengths(enc, data.titles)
    rank_tokens = float(sum(len(enc.prompt([data.titles[i] for i in h])) for h in cands.histories)
                        + title_len[cands.items].sum() + len(enc.prompt([])) + title_len[np.unique(cands.items)].sum())
    parser = build_parser()
    table = (landed or {}).get("doc") or {}
    landed_timings = table.get("timings") or {}
    landed_rows = {r["model"]: r for r in table.get("rows", []) if r.get("model")}
    steps = []
    for name, run in runs.items():
        streams = len(args.sources) if run.kind == "xcross" else 1
        tokens = measured[name][0] if name in measured else examples[name] * tokens_per_example
        cmd = parser.parse_args(run.argv)
        log_path = run.out / "train_log.json"
        log = json.loads(log_path.read_text()) if run.done and log_path.is_file() else None
        # what the run did, where its log says
        recompute = ((log or {}).get("config") or {}).get("grad_checkpointing", cmd.grad_checkpointing)
        mult = (3 if recompute else 2) * streams
        if run.kind == "xcross":
            val = candidate_examples(data, "val", cmd.val_neg, cmd.seed, -1, None)[: cmd.max_val_users or None]
            val_tokens = sum(len(enc.prompt([data.titles[i] for i in h])) for h, _, _ in val) \
                + (2 if cmd.calibrate else 1) * sum(title_len[c].sum() for _, c, _ in val)
        else:
            val_data = domains[cmd.domain]
            val_enc = PromptEncoder(enc.tokenizer, val_data.name, max_history=args.max_history)
            val = causal_lm_examples(val_enc, cap_users(val_data, "val", cmd.max_val_users, cmd.seed), "val")
            val_tokens = sum(len(e["input_ids"]) for e in val)
        if log is not None:
            validations = len(log["val"]) if run.kind == "xcross" else len(log["eval_loss"]) + 1  # + the start's
        else:
            n_steps = cmd.max_steps or math.ceil(cmd.epochs * examples[name] / (cmd.batch_size * cmd.grad_accum))
            validations = 1 + (math.ceil(n_steps / cmd.eval_every) if cmd.eval_every else 1)
        seconds = run_info(run, args.runs)["train_seconds"] if run.done else None
        timing = landed_timings.get(f"train:{name}") or {}
        if seconds is None:
            seconds = timing.get("seconds")
        steps.append({"step": f"train:{name}", "tokens": round(tokens), "tokens_measured": name in measured,
                      "validation_tokens": round(float(val_tokens)), "validations": validations,
                      "flops": (tokens * mult + val_tokens * validations * streams) * per_token,
                      "cpu_seconds": seconds, "cpu": timing.get("cpu") if seconds is not None else None})
    for name, row in rows.items():
        streams = len(row.sources) if row.kind == "xcross" else 1
        rk = json.loads((args.runs / "ranks" / f"{name}.json").read_text()) \
            if (args.runs / "ranks" / f"{name}.json").is_file() else {}
        done = len(rk.get("scores", [])) >= len(cands) and rk.get("prior") is not None
        row_landed = landed_rows.get(name, {})
        seconds, cpu = (rank_seconds(rk), rk.get("cpu")) if done else \
            (row_landed.get("rank_seconds"), row_landed.get("rank_cpu"))
        steps.append({"step": f"rank:{name}", "tokens": round(rank_tokens), "tokens_measured": True,
                      "flops": rank_tokens * per_token * streams, "cpu_seconds": seconds,
                      "cpu": cpu if seconds is not None else None})
    peak = H200_BF16_TFLOPS * 1e12
    for st in steps:
        st["flops"] = float(f"{st['flops']:.4g}")
        st["gpu_seconds"] = [round(st["flops"] / (peak * u), 2) for u in GPU_UTILIZATION]
        st["cpu_tflops_achieved"] = round(st["flops"] / st["cpu_seconds"] / 1e12, 4) if st["cpu_seconds"] else None
    total = sum(st["flops"] for st in steps)
    return {"target": args.target, "sources": args.sources, "model": args.model,
            "forward_flops_per_token": per_token, "tokens_per_training_example": round(tokens_per_example, 1),
            "rank_users": len(cands), "h200_bf16_tflops": H200_BF16_TFLOPS, "gpu_utilization": list(GPU_UTILIZATION),
            "steps": steps, "total_flops": float(f"{total:.4g}"),
            "total_gpu_hours": [round(total / (peak * u) / 3600, 3) for u in GPU_UTILIZATION],
            "cpu": cpu_model(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "an estimate from FLOP counts, not a GPU measurement"}


# ------------------------------------------------------------------------------------------------- training

def train(run: Run, runs_dir: Path, timings: dict[str, Any], archive: Path | None = None) -> None:
    """Run (or resume) one training command; its output goes to ``<runs>/<name>.log``, the finished run to the
    archive."""
    if run.done:
        return
    log = runs_dir / f"{run.name}.log"
    print(f"[train] {run.name}: xkern {' '.join(run.argv)}  (log: {log})", flush=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    with open(log, "a") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} xkern {shlex.join(run.argv)}\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "xkern.cli", *run.argv], stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{run.name} failed (exit {rc}); see {log}. Running this command again resumes it.")
    prev = timings.get(f"train:{run.name}", {})
    # its training seconds (every invocation's) are read from the run itself when the table is written
    timings[f"train:{run.name}"] = {"seconds_last_invocation": round(time.time() - t0, 1),
                                    "invocations": invocations(run, runs_dir),
                                    "load_start": prev.get("load_start", round(load0, 2)),
                                    "load_end": round(os.getloadavg()[0], 2), "cpu": cpu_model(),
                                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    archive_run(run, archive)


# ------------------------------------------------------------------------------------------ what outlives a machine

def archive_dir(args: argparse.Namespace) -> Path | None:
    """Where finished runs (without their checkpoints) and finished scores are kept in the repository, so that a
    fresh machine restores them instead of training and ranking again (None: ``--no-archive``)."""
    if args.no_archive:
        return None
    return Path(args.archive or ROOT / "bench" / "results" / "artifacts" / f"quality-{args.target}-full")


def archive_key(args: argparse.Namespace) -> dict[str, Any]:
    """What an archive's runs and scores were made from: restored for another table, they would be wrong rows."""
    return {"data": Path(str(args.data)).name, "target": args.target, "sources": list(args.sources),
            "model": args.model, "seed": args.seed, "eval_users": args.eval_users}


def check_archive(args: argparse.Namespace) -> None:
    """Claim the archive for this table, or refuse one that keeps another table's runs."""
    archive = archive_dir(args)
    if archive is None:
        return
    path = archive / "table.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept != archive_key(args):
            raise SystemExit(f"{archive} keeps the runs of another table ({kept}); pass --archive DIR for this one "
                             "(or --no-archive)")
        return
    archive.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(archive_key(args), indent=1) + "\n")


def _copy_folder(src: Path, dst: Path, skip: tuple[str, ...]) -> None:
    """``dst`` becomes a copy of ``src`` less ``skip``, swapped in whole (never half a copy at ``dst``)."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def archive_run(run: Run, archive: Path | None, with_checkpoint: bool = False) -> None:
    """Keep a run's outputs: a finished run without its checkpoint (what ranking reads), or, with
    ``with_checkpoint``, an unfinished one with it (what resuming reads)."""
    if archive is None or not run.out.is_dir():
        return
    archive.mkdir(parents=True, exist_ok=True)
    _copy_folder(run.out, archive / run.name, (".xkern.lock",) if with_checkpoint else ("checkpoint", ".xkern.lock"))


def archive_file(path: Path, archive: Path | None) -> None:
    """Keep one file of ``<runs>``: a row's saved scores or validation losses, the baselines, the timings."""
    if archive is None or not path.is_file():
        return
    dst = archive / ("ranks" if path.parent.name == "ranks" else "") / path.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dst.with_name(dst.name + ".partial"))
    dst.with_name(dst.name + ".partial").replace(dst)


def restore(args: argparse.Namespace, runs: dict[str, Run]) -> None:
    """Bring back what the archive keeps and this machine lacks: finished runs (over a local unfinished one),
    unfinished runs' checkpoints where none is here, saved scores where none are here, timings of other
    machines' runs."""
    archive = archive_dir(args)
    if archive is None or not archive.is_dir():
        return
    for run in runs.values():
        kept = archive / run.name
        if run.done or not kept.is_dir():
            continue
        if (kept / "run.json").is_file() or not (run.out / "checkpoint").is_dir():
            run.out.parent.mkdir(parents=True, exist_ok=True)
            _copy_folder(kept, run.out, ())
            print(f"[restore] {run.name} from {kept}", flush=True)
    ranks = Path(args.runs) / "ranks"
    for kept in sorted((archive / "ranks").glob("*.json")):
        if not (ranks / kept.name).is_file():
            ranks.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, ranks / kept.name)
    if (archive / "timings.json").is_file():
        path = Path(args.runs) / "timings.json"
        here = json.loads(path.read_text()) if path.is_file() else {}
        kept_timings = json.loads((archive / "timings.json").read_text())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**kept_timings, **here}, indent=2) + "\n")


def save_progress(args: argparse.Namespace, runs: dict[str, Run]) -> None:
    """Archive the unfinished too, before a machine is given up: each unfinished run with its checkpoint, each
    row's scores so far."""
    archive = archive_dir(args)
    if archive is None:
        raise SystemExit("--save-progress needs the archive (drop --no-archive)")
    for run in runs.values():
        if not run.done and (run.out / "checkpoint" / "state.json").is_file():
            archive_run(run, archive, with_checkpoint=True)
            print(f"[archive] {run.name}: unfinished, with its checkpoint", flush=True)
    for path in sorted((Path(args.runs) / "ranks").glob("*.json")):
        archive_file(path, archive)
    archive_file(Path(args.runs) / "timings.json", archive)


def table_path(args: argparse.Namespace) -> Path:
    """The table this command writes (and reads back: its landed rows); with ``--estimate-gpu``, where ``--out``
    names the estimate, the table at ``--table`` (the times of the rows it carries)."""
    default = ROOT / "bench" / "results" / f"quality-{args.target}-full.json"
    if getattr(args, "estimate_gpu", False):
        return Path(getattr(args, "table", None) or default)
    return Path(args.out or default)


# Where two tables rank the same users the same way: a row of one stands in the other.
TABLE_KEYS = ("kind", "domain", "split", "seed", "sources")
TABLE_CONFIG = ("n_neg", "negatives", "n_boot", "model", "max_history", "compute_dtype", "score", "pmi")


def landed_table(args: argparse.Namespace, config: dict[str, Any], n_users: int) -> dict[str, Any]:
    """The table at ``--out`` where it ranked the same users the same way: its model rows by row name (raw and
    PMI), its baselines, and what it said of their runs. Its rows stand until this machine ranks them again; a
    table of other users, candidates or scoring stands for nothing (it is rewritten)."""
    path = table_path(args)
    empty: dict[str, Any] = {"rows": {}, "baselines": [], "doc": {}}
    if not path.is_file():
        return empty
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        print(f"[table] {path} is not JSON: its rows are not carried", flush=True)
        return empty
    want = {"kind": "xkern-quality", "domain": args.target, "split": "test", "seed": args.seed,
            "sources": list(args.sources)}
    same = isinstance(doc, dict) and all(doc.get(k) == want[k] for k in TABLE_KEYS) and \
        isinstance(doc.get("config"), dict) and all(doc["config"].get(k) == config[k] for k in TABLE_CONFIG)
    rows = doc.get("rows") if same else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("ranks"), list)
                                             and len(r["ranks"]) == n_users for r in rows):
        print(f"[table] {path} ranked other users or scored otherwise: its rows are not carried", flush=True)
        return empty
    models: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("model"):
            models.setdefault(str(r["model"]), []).append(r)
    baselines = [r for r in rows if r.get("method") in BASELINES]
    return {"rows": models, "baselines": baselines if len(baselines) == len(BASELINES) else [], "doc": doc}


# -------------------------------------------------------------------------------------------------- ranking

class Ranker:
    """The base loaded once; adapters and X-Cross runs attached as rows need them; scores saved per chunk."""

    def __init__(self, args: argparse.Namespace, runs: dict[str, Run]) -> None:
        import torch

        import xkern
        from xkern.data.cli import load_domains
        from xkern.data.encoding import PromptEncoder
        from xkern.nn import resolve_dtype
        from xkern.nn.pretrained import load_tokenizer, resolve

        torch.set_num_threads(args.threads)
        self.args, self.runs = args, runs
        self.data = load_domains(args.data, [args.target], seed=args.seed)[args.target]
        self.cands = ranking_candidates(args, self.data)
        path = resolve(args.model)
        self.dtype, _ = resolve_dtype("auto", args.device)
        self.model = xkern.load_model(path, dtype=self.dtype, device=args.device, progress=False)
        self.tok = load_tokenizer(path)
        self.enc = PromptEncoder(self.tok, self.data.name, max_history=args.max_history)
        self.dir = Path(args.runs) / "ranks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._val: list[dict[str, Any]] | None = None

    # ---- models

    def attach(self, run: str, name: str | None = None) -> str:
        """Load a LoRA run's adapter under ``name`` (default: the run's name, '.' -> '_') once."""
        name = name or run.replace(".", "_")
        if name not in self.model.list_adapters():
            self.model.load_adapter(str(self.runs[run].out / "adapter"), name)
        return name

    def adapter(self, row: Row) -> str:
        """The adapter that serves an adapter or merge row: its run's, or the merge of its parts (made once)."""
        if row.kind != "merge":
            return self.attach(row.parts[0])
        if row.name not in self.model.list_adapters():
            from xkern.weave.merging import merge_loaded

            merge_loaded(self.model, row.name, [self.attach(p) for p in row.parts])
        return row.name

    def start_command(self, row: Row) -> argparse.Namespace:
        """An untrained row's run's ``train-xcross`` command, parsed: what its model is built from."""
        from xkern.cli import build_parser

        return build_parser().parse_args(self.runs[row.start_of].argv)

    def fingerprint(self, row: Row) -> str:
        """The bytes of every file the row's model is made of: a retrained part invalidates saved scores."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([row.kind, row.parts, self.args.seed, len(self.cands), str(self.dtype)]).encode())
        if row.start_of:  # built from its run's command, not from files: the options that make the model
            from xkern.xcross.cli import xcross_options

            h.update(json.dumps(xcross_options(self.start_command(row))).encode())
        for part in row.parts:
            folder = self.runs[part].out / ("xcross" if self.runs[part].kind == "xcross" else "adapter")
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()

    def scorer(self, row: Row):
        """(score(histories, items) -> mean title log-probability [B, C], prior(items) -> same after an empty
        history [n])."""
        import torch

        from xkern.serve import PrefixLikelihoodScorer

        if row.kind == "xcross":
            from xkern.xcross import XCrossModel

            for part in row.parts:
                if part.startswith("src-"):  # the streams, under the names train-xcross gave them
                    self.attach(part, part.removeprefix("src-").lower())
            if row.start_of:
                from xkern.xcross.cli import build_xcross

                xc = build_xcross(self.start_command(row), self.model, self.tok, self.data)
            else:
                xc = XCrossModel.load(self.runs[row.parts[-1]].out / "xcross", self.model, tokenizer=self.tok)
            xc.set_domain(self.data.titles, self.data.name, tokenizer=self.tok, max_history=self.args.max_history)

            def score(h: Any, items: np.ndarray) -> np.ndarray:
                return xc.score(h, items, 64).numpy().astype(np.float64)

            def prior(items: np.ndarray) -> np.ndarray:
                return xc.title_prior(items[:, None], 64).numpy()[:, 0].astype(np.float64)

            return score, prior
        sc = PrefixLikelihoodScorer(self.model, self.enc, self.data.titles, self.adapter(row))
        count = title_lengths(self.enc, self.data.titles)

        def score_lora(h: Any, items: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return sc(h, items) / count[items]

        def prior_lora(items: np.ndarray) -> np.ndarray:
            return sc.prior(items[None, :])[0] / count[items]

        return score_lora, prior_lora

    # ---- scores, resumable

    def is_scored(self, row: Row) -> bool:
        path = self.dir / f"{row.name}.json"
        if not path.is_file():
            return False
        state = json.loads(path.read_text())
        return (state.get("fingerprint") == self.fingerprint(row) and len(state["scores"]) >= len(self.cands)
                and state.get("prior") is not None)

    def scores(self, row: Row, chunk: int = 64) -> dict[str, Any]:
        """The row's scores of every user's candidates and every candidate's prior, resumed from disk."""
        from tqdm import tqdm

        from xkern.fileio import atomic_write_text

        path = self.dir / f"{row.name}.json"
        key = self.fingerprint(row)
        state = json.loads(path.read_text()) if path.is_file() else {}
        if state.get("fingerprint") != key:
            state = {"fingerprint": key, "scores": [], "prior": None, "seconds": 0.0}
        n = len(self.cands)
        if len(state["scores"]) >= n and state["prior"] is not None:
            return state
        score, prior = self.scorer(row)
        bar = tqdm(total=n, initial=len(state["scores"]), desc=row.name, unit="user", mininterval=30)
        while len(state["scores"]) < n:
            s = len(state["scores"])
            e = min(s + chunk, n)
            t0 = time.perf_counter()
            state["scores"] += np.round(score(self.cands.histories[s:e], self.cands.items[s:e]), 6).tolist()
            state["seconds"] = round(state["seconds"] + time.perf_counter() - t0, 2)
            atomic_write_text(path, json.dumps(state))
            bar.update(e - s)
        bar.close()
        t0 = time.perf_counter()
        items = np.unique(self.cands.items)
        state["prior"] = {"items": items.tolist(), "scores": np.round(prior(items), 6).tolist()}
        state["prior_seconds"] = round(time.perf_counter() - t0, 2)
        state["load_end"], state["cpu"] = round(os.getloadavg()[0], 2), cpu_model()
        atomic_write_text(path, json.dumps(state))
        archive_file(path, archive_dir(self.args))
        return state

    # ---- validation loss, per example

    def val_examples(self) -> list[dict[str, Any]]:
        """The validation examples ``xkern train-lora`` validates on (the same capped, seeded users)."""
        if self._val is None:
            from xkern.data.examples import causal_lm_examples
            from xkern.recipes import cap_users

            self._val = causal_lm_examples(self.enc, cap_users(self.data, "val", VAL_USERS, self.args.seed), "val")
        return self._val

    def val_losses(self, adapter_row: Row | None) -> list[float]:
        """Each validation example's causal-LM loss (nats per title token) under the row's adapter (None: base)."""
        from xkern.adapters.peft_format import BASE
        from xkern.fileio import atomic_write_text
        from xkern.train import evaluate_loss

        name = adapter_row.name if adapter_row is not None else "base"
        path = self.dir / f"val-{name}.json"
        key = self.fingerprint(adapter_row) if adapter_row is not None else "base"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == key:
                return saved["losses"]
        adapter = BASE if adapter_row is None else self.adapter(adapter_row)
        losses = [round(evaluate_loss(self.model, adapter, [ex], "causal_lm", 1), 6) for ex in self.val_examples()]
        atomic_write_text(path, json.dumps({"fingerprint": key, "losses": losses}))
        archive_file(path, archive_dir(self.args))
        return losses


# --------------------------------------------------------------------------------------------------- report

def paired_drop(start: list[float], end: list[float], n_boot: int, seed: int) -> dict[str, float]:
    """Mean of end - start over the same validation examples, with its paired 95% bootstrap interval."""
    from xkern.data.confidence import paired_mean_difference

    d = np.asarray(end, dtype=np.float64) - np.asarray(start, dtype=np.float64)
    change = paired_mean_difference(d, n_boot, seed)
    return {**{k: round(change[k], 4) for k in ("diff", "ci_low", "ci_high")}, "n": int(d.size)}


def rank_seconds(state: dict[str, Any]) -> float:
    """A row's ranking time from its saved scores: every chunk's seconds and the prior's."""
    return round(state["seconds"] + state.get("prior_seconds", 0), 1)


def invocations(run: Run, runs_dir: Path) -> int:
    """How many times this script started the run's command (the headers it writes into ``<runs>/<name>.log``)."""
    log = runs_dir / f"{run.name}.log"
    return sum(line.startswith("# ") and " xkern " in line for line in log.read_text().splitlines()) \
        if log.is_file() else 0


def run_info(run: Run, runs_dir: Path) -> dict[str, Any]:
    """Trainable parameters, steps, examples and training seconds of a finished run, from what its command
    wrote. The seconds are every invocation's where the run kept their total; a run resumed before xkern kept
    it reports them only if it ran in one invocation (else None: the earlier invocations' time is unknown)."""
    def seconds(total: float | None, this_call: float | None) -> float | None:
        if total is not None:
            return round(total, 1)
        return round(this_call, 1) if this_call is not None and invocations(run, runs_dir) <= 1 else None

    if run.kind == "xcross":
        log = json.loads((run.out / "train_log.json").read_text())
        return {"trainable_params": log["trainable"]["total"] + log.get("extra_trainable", 0),
                "steps": log.get("steps"), "train_examples": log.get("n_train_examples"),
                "train_seconds": seconds(log.get("seconds_total"), log.get("seconds")),
                "best_step": log.get("best_step")}
    s = json.loads((run.out / "summary.json").read_text())
    return {"trainable_params": s["trainable_parameters"], "steps": s["steps"], "train_examples": s["train_examples"],
            "train_seconds": seconds(s.get("train_seconds_total"), s.get("train_seconds")),
            "train_tokens_per_s": s.get("train_tokens_per_s"),
            "val_loss_start_run": s.get("val_loss_before"), "val_loss_end_run": s.get("val_loss_after"),
            "val_examples": s.get("val_examples")}


def model_rows(ranker: Ranker, row: Row, runs: dict[str, Run], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """The row's two quality rows (raw likelihood and PMI), with its training and validation facts."""
    from xkern.data.confidence import quality_row
    from xkern.data.metrics import pessimistic_ranks

    state = ranker.scores(row)
    scores = np.asarray(state["scores"], dtype=np.float64)
    prior = dict(zip(state["prior"]["items"], state["prior"]["scores"], strict=True))
    prior_of = np.vectorize(prior.__getitem__)(ranker.cands.items)
    trained = [runs[p] for p in row.parts if not (row.kind == "xcross" and p.startswith("src-"))]
    infos = [run_info(r, ranker.args.runs) for r in trained]
    seconds = [i["train_seconds"] for i in infos]
    info: dict[str, Any] = {
        "model": row.name, "kind": row.kind, "parts": row.parts,
        "trainable_params": sum(i["trainable_params"] for i in infos),
        "steps": sum(i["steps"] or 0 for i in infos), "train_examples": sum(i["train_examples"] or 0 for i in infos),
        "train_seconds": round(sum(seconds), 1) if None not in seconds else None,
        "rank_seconds": rank_seconds(state),
        "rank_load_end": state.get("load_end"), "rank_cpu": state.get("cpu"),
        "fingerprint": ranker.fingerprint(row)}
    if row.start_of:
        info["untrained"] = (f"{row.start_of}'s model before its first step: integrators zero, the streams weighted "
                             "equally, no target data")
    elif row.kind == "xcross":
        log = json.loads((trained[0].out / "train_log.json").read_text())
        val = log.get("val") or []
        best = next((v for v in val if v["step"] == log.get("best_step")), val[-1] if val else None)
        info.update(val_loss_kind="cross-entropy of the positive among 1 + 9 validation candidates (PMI scores)",
                    val_loss_start=val[0]["loss"] if val else None, val_loss_best=best["loss"] if best else None,
                    best_step=log.get("best_step"))
        if val and "losses" in val[0] and best and "losses" in best:
            info["val_change"] = paired_drop(val[0]["losses"], best["losses"], n_boot, seed)
    else:
        start, end = ranker.val_losses(None), ranker.val_losses(row)
        info.update(val_loss_kind="causal-LM loss of the next item's title (nats per token), 200 target "
                                  "validation users; start: the base model",
                    val_loss_start=round(float(np.mean(start)), 4), val_loss_best=round(float(np.mean(end)), 4),
                    val_change=paired_drop(start, end, n_boot, seed))
    if "val_change" in info:
        info["val_below_noise"] = info["val_change"]["ci_high"] < 0
    out = []
    for variant, s in (("likelihood", scores), ("pmi", scores - prior_of)):
        method = row.name if variant == "likelihood" else f"{row.name}+pmi"
        out.append(quality_row(method, pessimistic_ranks(s, ranker.cands.target), target=ranker.data.name,
                               sources=row.sources, fraction=row.fraction, n_boot=n_boot, seed=seed, split="test",
                               score=variant, **info))
    return out


def baseline_rows(ranker: Ranker, n_boot: int, seed: int, landed: list[dict[str, Any]] | None = None) \
        -> list[dict[str, Any]]:
    """The baselines on the same candidates, computed once (SASRec trains) and kept under ``<runs>/ranks``; the
    landed table's, where it has them (the same users and candidates)."""
    from xkern.data.baselines import baseline_quality_rows
    from xkern.fileio import atomic_write_text

    path = ranker.dir / "baselines.json"
    key = [len(ranker.cands), n_boot, seed, list(BASELINES)]
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["rows"]
    if landed:
        rows = landed
    else:
        t0 = time.perf_counter()
        rows = baseline_quality_rows(ranker.data, ranker.cands, list(BASELINES), seed, n_boot)
        for r in rows:
            r["rank_seconds"], r["rank_cpu"] = round(time.perf_counter() - t0, 1), cpu_model()
    atomic_write_text(path, json.dumps({"key": key, "rows": rows}))
    archive_file(path, archive_dir(ranker.args))
    return rows


def pairs(rows: list[dict[str, Any]], full: str, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Each model row against popularity, SASRec and the full target LoRA (same score); the WeaveRec merge
    against the plain merge and the joint model, each X-Cross row against X-Cross before training; on HR@10 and
    MRR."""
    from xkern.data.confidence import paired_comparison

    by = {r["method"]: r for r in rows}
    out = []
    for a in rows:
        if "score" not in a:
            continue
        suffix = "" if a["score"] == "likelihood" else "+pmi"
        refs = ["popularity", "sasrec", f"{full}{suffix}"]
        refs += ["plain-merge" + suffix, "joint" + suffix] if a["model"] == "weave-merge" else []
        refs += [XCROSS_START + suffix] if a["model"].startswith("xcross-") else []
        for b in refs:
            if b in by and b != a["method"]:
                for metric in ("HR@10", "MRR"):
                    out.append({"a": a["method"], "a_fraction": a["fraction"], "b": b,
                                "b_fraction": by[b]["fraction"],
                                **paired_comparison(a["ranks"], by[b]["ranks"], metric, n_boot, seed)})
    return out


def table_config(args: argparse.Namespace) -> dict[str, Any]:
    """How the table ranks (users' candidates, scores, the base and its compute dtype) and trains."""
    from xkern.nn import resolve_dtype

    return {"n_neg": 29, "negatives": "uniform", "n_boot": args.n_boot, "model": args.model,
            "max_history": args.max_history,
            "compute_dtype": str(resolve_dtype("auto", args.device)[0]).removeprefix("torch."),
            "score": "mean log-probability of the title after the next-item prompt",
            "pmi": "the same minus its mean log-probability after the prompt of an empty history",
            "lora_args": LORA_ARGS + (" " + args.lora_args if args.lora_args else ""),
            "xcross_args": XCROSS_ARGS + f" --eval-every max({XCROSS_EVAL_EVERY}, steps / "
                           f"{XCROSS_VALIDATIONS})" + (" " + args.xcross_args if args.xcross_args else "")}


def reproduced(rows: list[dict[str, Any]], landed: dict[str, Any], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Rows ranked here again from retrained runs (other bytes than the landed row's), each against the landed
    row on the same users: how far a retraining (another CPU, other rounding) moves a row. Earlier entries stand."""
    from xkern.data.confidence import paired_comparison

    kept = {(e["row"], e["metric"]): e for e in landed["doc"].get("reproduced", []) if isinstance(e, dict)}
    old = {r["method"]: r for rs in landed["rows"].values() for r in rs}
    for r in rows:
        before = old.get(r["method"])
        if before is None or "fingerprint" not in r or before.get("fingerprint") == r["fingerprint"]:
            continue
        a, b = np.asarray(r["ranks"]), np.asarray(before["ranks"])
        for metric in ("HR@10", "MRR"):
            kept[(r["method"], metric)] = {
                "row": r["method"], **paired_comparison(a, b, metric, n_boot, seed),
                "same_rank_share": round(float(np.mean(a == b)), 4), "now_cpu": r.get("rank_cpu"),
                "before_cpu": before.get("rank_cpu"), "before_metric": before["metrics"][metric][0]}
    return list(kept.values())


def report(args: argparse.Namespace, runs: dict[str, Run], planned: list[str], ranked: list[Row], ranker: Ranker,
           timings: dict[str, Any], t_start: float, landed: dict[str, Any] | None = None) -> Path:
    """Write the table: the rows ranked from the runs here, the landed table's other rows as they were."""
    from xkern.data.evaluate import write_report

    landed = landed or {"rows": {}, "baselines": [], "doc": {}}
    before = landed["doc"]
    full = f"lora-{fraction_name(max(args.fractions))}"
    here = {row.name: row for row in ranked}
    rows, carried = [], []
    for name in planned:
        if name in here:
            rows += model_rows(ranker, here[name], runs, args.n_boot, args.seed)
        elif name in landed["rows"]:
            cpu = (before.get("machine") or {}).get("cpu")
            rows += [{"rank_cpu": cpu, **r} for r in landed["rows"][name]]
            carried.append(name)
    rows += baseline_rows(ranker, args.n_boot, args.seed, landed["baselines"])
    out = table_path(args)
    missing = [n for n in planned if n not in here and n not in carried]
    landed_timings = before.get("timings") or {}
    for key, t in timings.items():  # a training's seconds are what its run kept (every invocation's), or unknown
        name = key.removeprefix("train:")
        if name in runs and runs[name].done:
            t["seconds"] = run_info(runs[name], args.runs)["train_seconds"]
        else:  # its run is not here (a carried row's): what the landed table said of it
            t["seconds"] = (landed_timings.get(key) or {}).get("seconds", t.get("seconds"))
    # what the landed table said of runs that are not here: the carried rows' commands, timings and sources
    gone = {name for name, r in runs.items() if not r.done}
    commands = {n: c for n, c in (before.get("commands") or {}).items() if n in gone}
    commands.update({name: "xkern " + shlex.join(r.argv) for name, r in runs.items() if r.done})
    timings = {**{k: v for k, v in landed_timings.items()
                  if k.removeprefix("train:") in gone and k not in timings}, **timings}
    sources = {n: v for n, v in (before.get("source_runs") or {}).items() if n in gone}
    # X-Cross's frozen streams and the plain merge's parts: validated on their own domain, not ranked
    sources.update({f"src-{s}": {"domain": s, **run_info(runs[f"src-{s}"], args.runs)} for s in args.sources
                    if runs[f"src-{s}"].done})
    doc = {
        "kind": "xkern-quality", "domain": args.target, "split": "test", "seed": args.seed,
        "sources": list(args.sources), "config": table_config(args),
        "commands": commands, "rows": rows, "paired": pairs(rows, full, args.n_boot, args.seed),
        "reproduced": reproduced(rows, landed, args.n_boot, args.seed),
        "source_runs": {f"src-{s}": sources[f"src-{s}"] for s in args.sources if f"src-{s}" in sources},
        "carried_rows": carried, "missing_rows": missing, "timings": timings,
        "machine": {"cpu": cpu_model(), "threads": args.threads, "device": args.device or "cpu"},
        "wall_seconds_this_invocation": round(time.perf_counter() - t_start, 1),
        "command": "python examples/quality_full.py " + shlex.join(sys.argv[1:]),
    }
    path = write_report(out, doc)
    print(f"wrote {path} ({len(rows)} rows; missing: {', '.join(missing) or 'none'})", flush=True)
    return path


def publish(args: argparse.Namespace, runs: dict[str, Run]) -> None:
    """Training logs and learning-curve plots of the finished runs into bench/results, then the doc blocks."""
    name = f"quality-{args.target}-full"
    logs, plots = ROOT / "bench" / "results" / "logs" / name, ROOT / "bench" / "results" / "plots" / name
    logs.mkdir(parents=True, exist_ok=True)
    curves = []
    for run in runs.values():
        if not run.done:
            continue
        for f in ("train_log.json", "summary.json"):
            if (run.out / f).is_file():
                shutil.copyfile(run.out / f, logs / f"{run.name}-{f}")
        if (run.out / "train_log.json").is_file():
            curves.append(str(run.out / "train_log.json"))
    if curves:
        subprocess.call([sys.executable, "-m", "xkern.cli", "plot", "--out", str(plots), *curves])
    subprocess.call([sys.executable, str(ROOT / "bench" / "docs_tables.py")])


# ------------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked and normalised (sources and fractions as lists, paths resolved)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="root of processed domain folders (or 'synthetic')")
    p.add_argument("--target", default="Tools")
    p.add_argument("--sources", default="Toys,Sports", help="comma-separated source domains")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)),
                   help="fractions of the target's training users (default 0.25,0.5,1.0)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--runs", default=None, help="where runs, logs and saved scores go (default runs/full/<target>)")
    p.add_argument("--eval-users", type=int, default=-1, help="first N test users (default -1: all)")
    p.add_argument("--max-history", type=int, default=5)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", default=None, help="comma-separated runs and rows to work on (default: all)")
    p.add_argument("--lora-args", default="", help="extra train-lora flags, after the defaults (they win)")
    p.add_argument("--xcross-args", default="", help="extra train-xcross flags, after the defaults (they win)")
    p.add_argument("--out", default=None, help="default bench/results/quality-<target>-full.json (with "
                   "--estimate-gpu: bench/results/gpu-estimate-quality-<target>-full.json)")
    p.add_argument("--table", default=None, help="with --estimate-gpu: the table whose carried rows' CPU times "
                   "it reports (default bench/results/quality-<target>-full.json)")
    p.add_argument("--archive", default=None, help="where finished runs and scores are kept in the repository, "
                   "restored on a machine that lacks them (default bench/results/artifacts/quality-<target>-full)")
    p.add_argument("--no-archive", action="store_true", help="keep nothing outside --runs, restore nothing")
    p.add_argument("--save-progress", action="store_true", help="archive the unfinished runs with their checkpoints "
                   "and the scores so far (before this machine is given up), and stop")
    p.add_argument("--no-publish", action="store_true", help="do not copy logs/plots into bench/results or "
                   "regenerate the docs")
    p.add_argument("--dry-run", action="store_true", help="print the plan (what is done, what is to do) and stop")
    p.add_argument("--estimate-gpu", action="store_true", help="write the FLOP counts of every step and their time on "
                   "an H200 (bench/results/gpu-estimate-quality-<target>-full.json) and stop")
    args = p.parse_args(argv)
    args.sources = [s for s in args.sources.split(",") if s]
    args.fractions = [float(f) for f in args.fractions.split(",") if f]
    args.only = [s for s in args.only.split(",") if s] if args.only else None
    args.runs = Path(args.runs or f"runs/full/{args.target}")
    if args.data != "synthetic":
        args.data = str(Path(args.data).resolve())
    if not args.sources or not args.fractions or not all(0 < f <= 1 for f in args.fractions):
        raise SystemExit("need at least one source and fractions in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from xkern.data.cli import load_domains

    target = load_domains(args.data, [args.target], seed=args.seed)[args.target]  # refused before anything runs
    runs = plan(args, len(target.train))[0]
    if not args.dry_run and not args.estimate_gpu:
        check_archive(args)
        if args.save_progress:
            save_progress(args, runs)
            return 0
        restore(args, runs)
    landed = landed_table(args, table_config(args), len(ranking_candidates(args, target)))
    runs, rows, steps = plan(args, len(target.train), frozenset(landed["rows"]))
    to_rank = {what.name for kind, what in steps if kind == "rank"}
    for name in rows:
        if name in landed["rows"] and name not in to_rank:
            print(f"rank  {name:16s} landed (its runs are not here: the table's row stands)", flush=True)
    for kind, what in steps:
        name = what.name if isinstance(what, Row) else what
        state = ("done" if runs[name].done else "to do") if kind == "train" else \
            ("scored" if (args.runs / "ranks" / f"{name}.json").is_file() else "to rank")
        print(f"{kind:5s} {name:16s} {state}", flush=True)
    if args.dry_run:
        return 0
    if args.estimate_gpu:
        est = gpu_estimate(args, runs, rows, landed)
        out = Path(args.out or ROOT / "bench" / "results" / f"gpu-estimate-quality-{args.target}-full.json")
        out.write_text(json.dumps(est, indent=1) + "\n")
        print(f"{est['total_flops']:.3g} FLOPs in all; on an H200 at {GPU_UTILIZATION} of its bf16 peak: "
              f"{est['total_gpu_hours']} hours; wrote {out}")
        return 0
    t_start = time.perf_counter()
    args.runs.mkdir(parents=True, exist_ok=True)
    timings_path = args.runs / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    ranker = None
    for kind, what in steps:
        if kind == "train":
            train(runs[what], args.runs, timings, archive_dir(args))
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
            archive_file(timings_path, archive_dir(args))
            continue
        if not all(runs[p].done for p in what.parts):
            print(f"[rank] {what.name}: skipped, {[p for p in what.parts if not runs[p].done]} not trained", flush=True)
            continue
        ranker = ranker or Ranker(args, runs)
        print(f"[rank] {what.name}", flush=True)
        ranker.scores(what)
        ranked = [r for r in rows.values() if all(runs[p].done for p in r.parts) and ranker.is_scored(r)]
        report(args, runs, list(rows), ranked, ranker, timings, t_start, landed)  # results land as rows finish
        if not args.no_publish:
            publish(args, runs)
    if ranker is None:
        print("nothing ranked", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
