"""The command-line conventions every ``xkern`` subcommand shares: parent parsers for the common flags.

Each subcommand's own module registers it (``register(subparsers)``) with these parents, so ``--data``,
``--seed``, ``--threads``, ``--no-progress``, ``--out`` and ``--debug`` mean the same thing, with the
same defaults where they can, in every command; ``xkern/cli.py`` only assembles the registrations.
Training flags come from ``TrainConfig`` (``xkern.train.loop.add_config_arguments``).
"""

from __future__ import annotations

import argparse

DATA_ENV = "XKERN_DATA"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list (``Toys,Sports``) as a tuple of its non-empty, stripped items."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def rank(text: str) -> int:
    """A LoRA rank: an integer >= 1, refused while the command line is read (before any folder is made)."""
    return positive(text)


def positive(text: str) -> int:
    """An integer >= 1 (a count, a size), refused while the command line is read."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def run_options(seed: bool = True) -> argparse.ArgumentParser:
    """``--seed`` (unless the command's config carries it), ``--threads``, ``--no-progress``, ``--debug``."""
    p = argparse.ArgumentParser(add_help=False)
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed for splits, negatives, data and training (default 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores free at the start)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (also accepted before the command)")
    return p


def data_options(splits: bool = True) -> argparse.ArgumentParser:
    """``--data`` (and the split options ``--mode``, ``--val-frac``): where the processed domain folders are."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", default=None,
                   help=f"root of processed domain folders, or 'synthetic' for the embedded synthetic domains "
                        f"(default: ${DATA_ENV}, else the data/ folder of a source checkout)")
    if splits:
        p.add_argument("--mode", choices=("by-user", "loo"), default="by-user",
                       help="split: the folder's by-user split (default) or leave-one-out")
        p.add_argument("--val-frac", type=float, default=0.1,
                       help="by-user: fraction of train users held out for validation (default 0.1)")
    return p


def out_option(what: str, default: str | None = None, required: bool = False, default_text: str | None = None,
               file: bool = False) -> argparse.ArgumentParser:
    """``--out``: ``what`` it names (a folder, or a ``file``), with the command's own default (or
    ``default_text`` saying how it is made); the command line checks it can be written before work starts."""
    p = argparse.ArgumentParser(add_help=False)
    p.set_defaults(out_is_file=file)
    if required:
        p.add_argument("--out", required=True, help=what)
    else:
        p.add_argument("--out", default=default, help=f"{what} (default {default_text or default})")
    return p


def model_options(default: str | None) -> argparse.ArgumentParser:
    """``--model``, ``--dtype`` (``auto``: bf16 where the CPU or GPU has bf16 arithmetic, else float32) and
    ``--device``: the base the command loads."""
    p = argparse.ArgumentParser(add_help=False)
    where = "model directory, .gguf file, 'smollm2' / 'minilm' (packaged weights)"
    if default is None:
        p.add_argument("--model", required=True, help=where)
    else:
        p.add_argument("--model", default=default, help=f"{where} or 'tiny' (a small random Llama over a word "
                                                        f"tokenizer; default {default})")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype: 'auto' (bf16 on a CPU with AVX512-BF16 or AMX and on a bf16 GPU, float32 "
                        "elsewhere; `xkern env` says which), or one of the others")
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model loads)")
    return p
