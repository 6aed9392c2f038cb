"""Nothing xkern loads can run code: no unpickling, no eval/exec, no model-supplied code, bounded patterns.

A repository-wide scan fails on any new way to run what a file says (``torch.load`` without
``weights_only=True``, ``pickle``/``dill``/``marshal`` loads, ``np.load(allow_pickle=True)``, ``eval``,
``exec``, ``trust_remote_code=True``); the loaders are then tested against planted files.
"""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path

import pytest
import torch

import xkern
from tests.helpers import PicklePayload, tiny_model
from xkern.adapters import AdapterError
from xkern.errors import FormatError, InputError, InputTypeError

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("xkern", "bench", "examples")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def test_no_code_runs_from_what_xkern_reads():
    bad = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node, owner, name in _calls(tree):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if name == "load" and owner == "torch" and _kw(node, "weights_only") is not True:
                    bad.append(f"{where}: torch.load without weights_only=True")
                if name in ("load", "loads", "Unpickler") and owner in ("pickle", "dill", "marshal", "cloudpickle"):
                    bad.append(f"{where}: {owner}.{name}")
                if name == "load" and owner == "np" and _kw(node, "allow_pickle") is True:
                    bad.append(f"{where}: np.load(allow_pickle=True)")
                if name in ("eval", "exec") and isinstance(node.func, ast.Name):  # the builtins, not model.eval()
                    bad.append(f"{where}: {name}()")
                if _kw(node, "trust_remote_code") is True:
                    bad.append(f"{where}: trust_remote_code=True")
    assert not bad, "\n".join(bad)


def test_the_scan_finds_what_it_looks_for():
    tree = ast.parse("torch.load(p)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\neval(s)\n"
                     "M.from_pretrained(d, trust_remote_code=True)\ntorch.load(p, weights_only=True)\n")
    found = [(owner, name) for _, owner, name in _calls(tree)]
    assert found == [("torch", "load"), ("pickle", "loads"), ("np", "load"), ("", "eval"), ("M", "from_pretrained"),
                     ("torch", "load")]


def test_a_model_folder_with_its_own_code_is_refused_without_asking(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked on stdin"))
    with pytest.raises(FormatError, match="auto_map"):
        xkern.load_model(folder, progress=False)
    from xkern.nn.pretrained import load_tokenizer

    with pytest.raises(FormatError, match="auto_map"):
        load_tokenizer(folder)
    assert not marker.exists()


def test_adapter_patterns_are_matched_in_bounded_time(tmp_path, monkeypatch):
    """The pattern that backtracked for 2 s per module name under `re` now takes no time (the `regex` engine,
    PEFT's semantics: no match, the default rank); and a match that exceeds the bound is refused naming the key,
    before any layer changes."""
    from xkern.adapters import peft_format

    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("a", r=4, target_modules=["q_proj"], seed=1)
    xm.save_adapter("a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"(.*.*)*X": 4}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    xm.load_adapter(tmp_path / "a", "b")
    assert time.perf_counter() - t0 < 5 and xm.nf4_layers["model.layers.0.self_attn.q_proj"].rank("b") == 4
    monkeypatch.setattr(peft_format, "PATTERN_SECONDS", 1e-9)  # every match now exceeds the bound
    with pytest.raises(AdapterError, match="rank_pattern pattern .* takes too long"):
        xm.load_adapter(tmp_path / "a", "c")
    assert xm.list_adapters() == ["a", "b"]  # refused before any layer changed


def test_adapter_arguments_are_checked_and_adapters_cannot_change_during_a_forward():
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    with pytest.raises(InputError, match="r must be an integer >= 1, got 1.5"):
        xm.add_adapter("a", r=1.5)
    with pytest.raises(InputError, match="r must be an integer"):
        xm.add_adapter("a", r=0)
    with pytest.raises(InputTypeError, match="adapter dtype must be"):
        xm.add_adapter("a", r=4, dtype=torch.int8)
    xm.add_adapter("a", r=4, init_lora_weights=False, seed=1)
    layer = next(iter(xm.nf4_layers.values()))
    hook = layer.register_forward_pre_hook(lambda *a: xm.delete_adapter("a"))
    with pytest.raises(InputError, match="cannot delete adapter 'a' while a forward"):
        xm(input_ids=torch.tensor([[3, 4, 5]]), adapter_names="a")
    hook.remove()
    assert xm.list_adapters() == ["a"]


def test_files_are_written_with_the_process_umask(tmp_path):
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("a", r=4, seed=1)
    old = os.umask(0o022)
    try:
        xm.save_adapter("a", tmp_path / "a")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert set(modes.values()) == {0o644}, modes


# ---- every loader against a planted pickle: the payload never runs ----------------------------------------



def _plant(path: Path, marker: Path) -> None:
    torch.save({"weight": PicklePayload(str(marker))}, path)


def _adapter_dir(tmp_path: Path) -> tuple[Path, object]:
    xm = xkern.load_model(tiny_model("llama"), dtype=torch.float32, progress=False)
    xm.add_adapter("a", r=4, seed=1, init_lora_weights=False)
    xm.save_adapter("a", tmp_path / "adapter")
    return tmp_path / "adapter", xm


@pytest.mark.parametrize("where", ["adapter_bin_only", "adapter_safetensors", "model_bin", "gguf", "xcross"])
def test_a_planted_pickle_never_runs(tmp_path, where):
    """Each file a loader reads, replaced by a pickle whose unpickling would create ``marker``: the loader
    refuses it (or never opens it) and the marker is never made. (Training checkpoints:
    tests/train/test_checkpoint_kill.py::test_a_pickled_checkpoint_is_refused_and_never_unpickled.)"""
    from xkern.adapters import load_adapter

    marker = tmp_path / "ran"
    if where.startswith("adapter"):
        folder, _ = _adapter_dir(tmp_path)
        if where == "adapter_bin_only":  # PEFT's legacy pickled weights, no safetensors
            (folder / "adapter_model.safetensors").unlink()
            _plant(folder / "adapter_model.bin", marker)
        else:
            _plant(folder / "adapter_model.safetensors", marker)
        with pytest.raises((FormatError, FileNotFoundError)):
            load_adapter(folder)
    elif where == "model_bin":
        folder = tmp_path / "model"
        tiny_model("llama").save_pretrained(folder)
        (folder / "model.safetensors").unlink()
        _plant(folder / "pytorch_model.bin", marker)
        with pytest.raises(Exception):  # noqa: B017 - what matters is that loading stops before unpickling
            xkern.load_model(folder, progress=False)
    elif where == "gguf":
        _plant(tmp_path / "model.gguf", marker)
        with pytest.raises((FormatError, InputError, ValueError)):
            xkern.load_model(tmp_path / "model.gguf", progress=False)
    else:
        from xkern.xcross import XCrossModel

        _, xm = _adapter_dir(tmp_path)
        xm.add_adapter("b", r=4, seed=2, init_lora_weights=False)
        saved = XCrossModel(xm, ["a", "b"]).save(tmp_path / "xc")
        for f in saved.glob("*.safetensors"):
            _plant(f, marker)
        with pytest.raises(Exception):  # noqa: B017 - safetensors refuses the header; nothing is unpickled
            XCrossModel.load(saved, xm)
    assert not marker.exists()
