"""The `xkern` command: demo (quickstart), data, eval, plot, train-lora, train-xcross, weave, recommend, serve, env.

Each subcommand registers itself from its own module with the shared flags of :mod:`xkern.commands`;
this file assembles them, runs the chosen one, and turns a user's mistake into one line and exit 2.
Subcommands import their heavy modules lazily so `xkern --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from xkern.commands import names
from xkern.errors import InputError, XkernError

# ----------------------------------------------------------------------------------------------- env


def env_report() -> dict:
    """Versions, threads, and which backend runs each op on this machine's devices (and why the others do not)."""
    import platform

    import torch

    from xkern._version import __version__
    from xkern.nn import resolve_dtype
    from xkern.ops import report
    from xkern.ops.backends import cpu_native

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ext = cpu_native.extension()
    dtypes = {}
    for d in devices:
        dtype, why = resolve_dtype("auto", d)
        dtypes[d] = {"dtype": str(dtype).removeprefix("torch."), "why": why}
    return {
        "xkern": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_isa": ext.isa() if ext is not None else None,
        "cpu_isas": ext.supported_isas() if ext is not None else [],
        "cpu_bf16_instructions": list(cpu_native.bf16_instructions()),
        "default_dtype": dtypes, "backends": {d: report(d) for d in devices},
    }


def cmd_env(args: argparse.Namespace) -> int:
    info = env_report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"xkern {info['xkern']}  python {info['python']}  torch {info['torch']}  threads {info['threads']}")
    if info["cpu_isa"]:
        print(f"native CPU kernels: {info['cpu_isa']} (this CPU runs {', '.join(info['cpu_isas'])})")
    for device, d in info["default_dtype"].items():
        print(f"--dtype auto on {device}: {d['dtype']} ({d['why']})")
    for device, rows in info["backends"].items():
        for r in rows:
            state = f"active, #{r['default_rank']} by default" if r["usable"] and r["default_rank"] else (
                "usable on request" if r["usable"] else f"off: {r['why_not']}")
            print(f"  {device:<5} {r['backend']:<7} {state}")
    return 0


# ----------------------------------------------------------------------------------------------- plot


def cmd_plot(args: argparse.Namespace) -> int:
    from xkern.plot import plot_files

    paths = list(args.files)
    if not paths:
        paths = [p for p in [Path("runs/demo/results.json")] if p.exists()]
        paths += sorted(Path("bench/results").glob("*.json")) if Path("bench/results").is_dir() else []
    if not paths:
        from xkern.errors import InputError

        raise InputError("nothing to plot (give JSON files, or run `xkern demo` first)")
    for png in plot_files(paths, args.out, args.metrics):
        print(f"wrote {png}")
    return 0


def _register_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot",
                       help="plot demo/eval metrics, learning curves (train_log.json) and benchmark JSON as PNG",
                       description="Plot demo/eval results (metrics across methods and data fractions) and "
                       "benchmark JSON (bench/results/*.json) as PNG files.")
    p.add_argument("files", nargs="*", help="JSON files (default: runs/demo/results.json and bench/results/*.json)")
    p.add_argument("--out", default="runs/plots", help="output directory (default runs/plots)")
    p.add_argument("--metrics", type=names, default=("HR@10", "NDCG@10"), help="metrics to plot")
    p.set_defaults(func=cmd_plot)


def _register_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="versions, the default compute dtype and which backends run the ops here",
                       description="Print versions, threads, the native CPU kernels' instruction set, the dtype "
                       "--dtype auto picks and why, and for each device which backend runs the ops (and why the "
                       "others do not).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_env)


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from xkern._version import __version__
    from xkern.data.cli import register as register_data
    from xkern.demo.cli import register as register_demo
    from xkern.recipes import register as register_train_lora
    from xkern.recommend.cli import register as register_recommend
    from xkern.weave.cli import register as register_weave
    from xkern.xcross.cli import register as register_xcross

    parser = argparse.ArgumentParser(prog="xkern", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"xkern {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also accepted after the command)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let --model name a Hugging Face hub repo (xkern reads models from disk only otherwise; "
                        "also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in (register_demo, register_data, register_train_lora, _register_plot, register_xcross,
                     register_weave, register_recommend, _register_env):
        register(sub)
    return parser


class _QuietPipe(io.TextIOBase):
    """stdout that stops writing, without a traceback, once the reader has gone (``xkern eval | head -1``).

    The command goes on and finishes its files; later writes go nowhere.
    """

    def __init__(self, stream: Any) -> None:
        self._stream, self.broken = stream, False

    def _close(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):  # also the interpreter's flush at exit goes nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self._stream.write(text)
                if "\n" in text:
                    self._stream.flush()
            except BrokenPipeError:
                self._close()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._close()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding


def _take_flag(argv: list[str], flag: str) -> bool:
    """Remove ``flag`` from anywhere in ``argv`` (before the command or after it); whether it was there."""
    found = flag in argv
    argv[:] = [a for a in argv if a != flag]
    return found


def _check_before_work(args: argparse.Namespace) -> None:
    """What can be checked from the arguments alone, before any data or model is loaded."""
    if getattr(args, "data", "synthetic") is None:
        from xkern.data.domain import require_data_root

        args.data = require_data_root(None)
    model = getattr(args, "model", None)
    if isinstance(model, str) and not (model == "tiny" and args.command in ("train-lora", "weave")):
        from xkern.nn.pretrained import resolve

        resolve(model, also_known=("tiny",) if args.command in ("train-lora", "weave") else ())
    if isinstance(getattr(args, "out", None), str):
        _check_out(args.out, getattr(args, "out_is_file", False))
    for _, adapter_dir in getattr(args, "adapter", None) or ():
        from xkern.adapters.peft_format import read_config

        read_config(adapter_dir)


def _check_out(out: str, is_file: bool) -> None:
    """``--out`` can be written before any work starts: a folder (or, for a file, its folder) that exists as a
    folder or can be made under a writable one."""
    path = Path(out)
    folder = path.parent if is_file else path
    if is_file and path.is_dir():
        raise InputError(f"--out {out} is a folder; give a file path")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {out}: {folder} is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {existing.resolve()} is not writable")


def _where(args: argparse.Namespace) -> str:
    """The command, and under ``torchrun`` which process of the job says it."""
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"{command} (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else command


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)  # as typed: what the resume hint repeats
    debug = _take_flag(argv, "--debug") or os.environ.get("XKERN_DEBUG", "0") == "1"
    if _take_flag(argv, "--allow-download"):
        os.environ["XKERN_ALLOW_DOWNLOAD"] = "1"
    if os.environ.get("XKERN_ALLOW_DOWNLOAD", "0") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network unless asked, also for tokenizers and configs
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if unknown:  # the command's own usage, not the top-level one
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "demo" and args.no_models and args.extra != ("xcross", "weave"):
        commands["demo"].error("--extra adds model rows, --no-models removes them: use one")
    if not isinstance(sys.stdout, _QuietPipe):
        sys.stdout = _QuietPipe(sys.stdout)
    with _terminate_as_interrupt():
        return _run(args, given, debug)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so ``finally`` blocks run (worker processes stopped, temporary folders removed).

    Training installs its own handler for the steps (it finishes the step and saves first); this one covers the rest.
    """
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("terminated")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, given: list[str], debug: bool) -> int:
    try:
        _check_before_work(args)
        if getattr(args, "threads", None) and args.command not in ("demo", "weave"):  # those two place theirs
            import torch

            torch.set_num_threads(args.threads)
        code = int(args.func(args) or 0)
        if "torch.distributed" in sys.modules:  # a command under torchrun started a process group
            from xkern.distributed import dist_teardown

            dist_teardown()
        return code
    except (XkernError, ValueError, OSError) as e:  # a mistake, a damaged file, or the file system said no
        if debug:
            raise
        message = str(e).strip()
        print(f"xkern {_where(args)}: error: {message.splitlines()[0] if message else type(e).__name__}",
              file=sys.stderr)
        return 2
    except RuntimeError as e:  # a collective that failed because another process of the job stopped
        dist = sys.modules.get("torch.distributed")
        if debug or dist is None or not isinstance(e, getattr(dist, "DistError", ())):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"xkern {_where(args)}: error: a collective failed, most likely because another process of the job "
              f"stopped (torchrun names it); {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # TrainingInterrupted says where it stopped and whether a checkpoint holds it
        message = f"xkern {args.command}: {e or 'interrupted'}"
        if getattr(e, "saved", False):
            message += "; resume with: xkern " + " ".join(shlex.quote(a) for a in given)
        print(message, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
