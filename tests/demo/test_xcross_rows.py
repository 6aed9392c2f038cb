"""The quickstart's X-Cross row: X-Cross over the demo's source LoRAs, trained and scored end to end."""

from __future__ import annotations

from xkern.data.synthetic import SyntheticConfig
from xkern.demo.core import DemoConfig, run_demo
from xkern.demo.lm import LMDemoConfig
from xkern.demo.xcross import XCrossDemoConfig, xcross_methods
from xkern.train.tiny import TinyLMConfig


def test_xcross_demo_rows(tmp_path):
    methods = xcross_methods(["Toys", "Sports"], XCrossDemoConfig(epochs=1.0, max_val_users=10))
    assert [m.name for m in methods] == ["xcross"] and methods[0].uses_target_train
    cfg = DemoConfig(synthetic=SyntheticConfig(n_users=60), fractions=(0.5, 1.0), max_eval_users=20,
                     lm_config=LMDemoConfig(base=TinyLMConfig(pretrain_steps=20), epochs=1))
    res = run_demo(cfg, methods=methods, progress=False)
    rows = res["rows"]
    assert [(r["method"], r["fraction"]) for r in rows] == [("xcross", 0.5), ("xcross", 1.0)]
    assert all(r["n_users"] == rows[0]["n_users"] > 0 and 0 <= r["HR@10"] <= 1 for r in rows)
    adapters = res["lm"]["adapters"]
    # the source LoRAs are trained once and shared by both fractions' X-Cross models
    assert {"src-Toys", "src-Sports", "xcross-0.5", "xcross-1"} <= set(adapters)
    info = adapters["xcross-1"]
    assert info["adapters"] == ["src-Toys", "src-Sports"] and info["steps"] > 0
    assert info["trainable"]["integrators"] == 2 * (4 * 2 * 64)  # 2 blocks of W_concat [2n(n-1), n d], n=2, d=64
    assert xcross_methods([]) == []
