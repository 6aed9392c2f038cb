"""A run folder's manifest (``run.json``): what a trained run needs to be served, checked before anything loads.

``xkern train-lora``, ``xkern train-xcross`` and ``xkern weave`` write one beside their results. It names
the base (a model spec and how it was built: the tiny base is rebuilt from its domains and config, a model
directory or ``.gguf`` file is fingerprinted), the data and the domain whose catalogue is ranked, the
adapters (each file with its SHA-256) and how the run scores (a LoRA's likelihood, a merge of saved LoRAs,
or X-Cross over its streams). :func:`read_run` checks every file it names, so a folder that is not a run,
a missing adapter or base, or a file changed since training is refused naming the file, before a model
loads. A manifest is data from disk like any other: it is read as JSON and never executes anything.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from xkern.errors import FormatError, NotFoundError
from xkern.fileio import atomic_write_text

RUN_FILE = "run.json"
FORMAT = "xkern-run/1"
COMMANDS = ("train-lora", "train-xcross", "weave")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_HEAD_BYTES = 1 << 20  # a .gguf base is fingerprinted by its size and first MiB, not hashed whole


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    """Hex SHA-256 of a file (its first ``limit`` bytes when given)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _where(path: Path, run_dir: Path) -> str:
    """A path relative to the run folder when inside it (the folder can move), else absolute."""
    path, run_dir = path.resolve(), run_dir.resolve()
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def files_entry(folder: str | Path, names: tuple[str, ...] | list[str], run_dir: str | Path) -> dict[str, Any]:
    """``{"path": ..., "sha256": {file: digest}}`` of the named files of ``folder`` (an adapter, X-Cross's weights)."""
    folder = Path(folder)
    return {"path": _where(folder, Path(run_dir)), "sha256": {n: sha256_file(folder / n) for n in names}}


def base_fingerprint(resolved: str | Path) -> dict[str, Any]:
    """What identifies a base on disk: a directory's ``config.json`` digest and weight file sizes, a ``.gguf``
    file's size and first MiB."""
    path = Path(resolved)
    if path.is_file():
        return {"size": path.stat().st_size, "head_sha256": sha256_file(path, _HEAD_BYTES)}
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return {"config_sha256": sha256_file(path / "config.json"), "weights": {p.name: p.stat().st_size for p in weights}}


def base_entry(model: str, dtype: str, **how: Any) -> dict[str, Any]:
    """The manifest's ``base``: the spec as given, the compute dtype, how it was built (``how``) and, for a
    model on disk, its resolved path and fingerprint."""
    entry: dict[str, Any] = {"model": model, "dtype": dtype, **how, "path": None}
    if model != "tiny":
        from xkern.nn.pretrained import resolve

        path = Path(resolve(model, also_known=("tiny",)))
        if path.exists():
            entry.update(path=str(path.resolve()), fingerprint=base_fingerprint(path))
    return entry


def data_entry(root: str, seed: int, val_frac: float = 0.1, mode: str = "by-user",
               synthetic_users: int | None = None) -> dict[str, Any]:
    """The manifest's ``data``: how the run loaded its domains (``xkern.data.cli.load_domains``' arguments)."""
    if root != "synthetic":
        root = str(Path(root).expanduser().resolve())
    return {"root": root, "seed": seed, "val_frac": val_frac, "mode": mode, "synthetic_users": synthetic_users}


def catalogue_digest(titles: list[str], item_ids: list[str] | None) -> str:
    """A short hash of a domain's catalogue (titles and item ids in index order): another catalogue is another run."""
    blob = json.dumps({"titles": list(titles), "ids": list(item_ids) if item_ids is not None else None})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def write_run(run_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``run_dir/run.json`` (atomically) with the format and the time added."""
    body = {"format": FORMAT, **manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(body, indent=2) + "\n")


def _need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise FormatError(f"{where}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _check_files(entry: Any, run_dir: Path, where: Path, what: str) -> Path:
    """The folder of a files entry, absolute, after checking each file is there and unchanged."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"),
                                                                                                 dict):
        raise FormatError(f"{where}: {what} entry is not {{'path': ..., 'sha256': {{...}}}}")
    folder = Path(entry["path"])
    folder = folder if folder.is_absolute() else run_dir / folder
    for name, digest in entry["sha256"].items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise FormatError(f"{where}: {what} names a file {name!r} outside its folder")
        file = folder / name
        if not file.is_file():
            raise NotFoundError(f"{file} not found ({what} of the run in {run_dir})")
        if sha256_file(file) != digest:
            raise FormatError(f"{file} differs from the file the run was trained with ({what}; its SHA-256 changed)")
    return folder


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The checked manifest of ``run_dir``, with every adapter and file folder made absolute (``"dir"`` keys).

    Raises NotFoundError for a missing folder, manifest, file or base, FormatError for a manifest that is
    not one or a file whose digest changed; every message names the file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise NotFoundError(f"run folder {run} not found")
    path = run / RUN_FILE
    if not path.is_file():
        raise NotFoundError(f"{path} not found: not a run folder written by xkern train-lora, train-xcross or weave "
                            f"(the folder holds what --out named; for weave, the folder of its results file)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise FormatError(f"{path}: not an xkern run manifest (format {got!r}, expected {FORMAT!r})")
    if _need(manifest, "command", str, path) not in COMMANDS:
        raise FormatError(f"{path}: unknown command {manifest['command']!r} (one of {', '.join(COMMANDS)})")
    _need(manifest, "domain", str, path)
    data = _need(manifest, "data", dict, path)
    _need(data, "root", str, path)
    base = _need(manifest, "base", dict, path)
    _need(base, "model", str, path)
    scorer = _need(manifest, "scorer", dict, path)
    if scorer.get("kind") == "unsaved":
        raise NotFoundError(f"{path}: {scorer.get('why', 'the run saved no adapters')}")
    if scorer.get("kind") not in ("likelihood", "xcross"):
        raise FormatError(f"{path}: unknown scorer kind {scorer.get('kind')!r}")
    adapters = _need(manifest, "adapters", dict, path)
    if not adapters:
        raise FormatError(f"{path}: the run names no adapters")
    for name, entry in adapters.items():
        entry["dir"] = str(_check_files(entry, run, path, f"adapter {name!r}"))
    if scorer["kind"] == "xcross":
        scorer["dir"] = str(_check_files(scorer.get("files"), run, path, "X-Cross weights"))
    resolved = base.get("path")
    if resolved is not None:  # a model directory or .gguf file: there, and the one trained on
        where = Path(resolved)
        if not where.exists():
            raise NotFoundError(f"base model {where} not found (the base of the run in {run})")
        if base_fingerprint(where) != base.get("fingerprint"):
            raise FormatError(f"base model {where} differs from the one the run was trained on "
                              f"(config.json, weight files or their sizes changed)")
    manifest["run_dir"] = str(run.resolve())
    return manifest
