"""Test set-up: without a GPU, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here, at
collection time, before the tests import xkern's kernels.
"""

import json
import os
import shutil
import subprocess

import pytest


def _has_cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


HAS_GPU = _has_cuda_gpu()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """With ``XKERN_TEST_LOG=FILE``, one JSON line per test as it ends (bench/gpu_check.sh: a run killed by its
    time limit still says which tests passed). Under xdist only the controller writes."""
    path = os.environ.get("XKERN_TEST_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when != "call" and report.passed:  # setup/teardown that passed say nothing
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    message = str(report.longrepr)[-500:] if report.longrepr is not None else ""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": report.nodeid, "outcome": outcome, "when": report.when,
                            "seconds": round(report.duration, 3), "message": message}) + "\n")


# ---- fixtures shared by several test packages (built from tests/helpers.py) ----------------------

@pytest.fixture(scope="session")
def bnb_dirs(tmp_path_factory) -> dict:
    """family -> a directory saved by transformers with BitsAndBytesConfig(load_in_4bit, nf4, double quant)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BitsAndBytesConfig

    from tests import helpers

    root = tmp_path_factory.mktemp("bnb")
    out = {}
    for family in ("llama", "bert"):
        fp = root / f"{family}-fp32"
        helpers.tiny_model(family).save_pretrained(fp)
        auto = AutoModelForCausalLM if family == "llama" else AutoModelForMaskedLM
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
        q = auto.from_pretrained(fp, quantization_config=qcfg, dtype=torch.float32)
        q.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def domain():
    from tests import helpers

    return helpers.titled_domain()


@pytest.fixture(scope="module")
def lm(domain):
    from tests import helpers

    model, tok = helpers.tiny_lm([domain])
    model.add_adapter("a", r=4, init_lora_weights=False, seed=1)
    model.add_adapter("b", r=2, lora_alpha=8, init_lora_weights=False, seed=2)
    return model, tok


@pytest.fixture(autouse=True, scope="session")
def _private_xkern_cache(tmp_path_factory):
    """Pretrained tiny bases that tests build go to a temporary cache, never the user's ~/.cache/xkern."""
    old = os.environ.get("XKERN_CACHE")
    os.environ["XKERN_CACHE"] = str(tmp_path_factory.mktemp("xkern-cache"))
    yield
    if old is None:
        os.environ.pop("XKERN_CACHE", None)
    else:
        os.environ["XKERN_CACHE"] = old
