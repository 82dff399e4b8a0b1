"""One registry of the in-process memos (engine.core.memo) and the settings read once (engine.core.settings)."""
from __future__ import annotations

import pytest
from cachetools import LRUCache

from engine.core.memo import clear_all, memo, memoized, registered
from engine.core.settings import SettingError, settings

FILLED = ("core.settings", "core.cpu_features", "core.registered_sets", "core.vendored_rows", "core.rt_split",
          "model.facts", "quant.weights", "quant.calibration", "runtime.size", "analysis.planned_models",
          "evaluation.evaluators")


def test_clear_all_empties_every_memo_it_was_given(tiny_bert, tokenizer):
    from engine.analysis.predict import planned_model
    from engine.core.cpu import cpu_features
    from engine.data.sets import load_csv, load_dataset
    from engine.core.plan import as_plan
    from engine.evaluation.evaluate import get_evaluator
    from engine.quant.calibration import calibrate
    from engine.runtime.size import model_size_bytes

    plan = as_plan("int8")
    settings()
    cpu_features()
    pool = load_dataset("embedded")
    calibrate(tiny_bert, tokenizer, pool.texts[:4])
    model_size_bytes(tiny_bert, plan)
    planned_model(tiny_bert, tokenizer, plan, "simulated")  # apply_plan: the simulated weights, the facts
    rows = b"text,label\n" + b"".join(b"sentence %d,positive\n" % i for i in range(12))
    get_evaluator(tiny_bert, tokenizer, load_csv("small.csv", rows))
    filled = registered()
    assert all(filled[name][0] > 0 for name in FILLED), {name: filled.get(name) for name in FILLED}
    clear_all()
    assert all(size == 0 for size, _ in registered().values()), registered()


def test_a_memoized_function_computes_once_until_cleared():
    calls = []

    @memoized("test.square", LRUCache(maxsize=2))
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert square(3) == square(3) == 9 and calls == [3]
    assert registered()["test.square"] == (1, 2)
    clear_all()
    assert square(3) == 9 and calls == [3, 3]
    replacement = memo("test.square", {})  # a module imported afresh: its name now names the new cache
    assert registered()["test.square"] == (0, None) and replacement == {}


def test_settings_follow_the_environment_then_the_config_file(monkeypatch, tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text('workers = 3\nweight_cache_mb = 64\ncache_dir = "~/somewhere"\n')
    monkeypatch.setenv("ENGINE_CONFIG", str(config))
    monkeypatch.delenv("ENGINE_WORKERS", raising=False)
    monkeypatch.delenv("ENGINE_CACHE_DIR", raising=False)
    read = settings()
    assert read.workers == 3 and read.weight_cache_mb == 64.0 and read.cache_dir.name == "somewhere"
    assert read.state_budget_mb == 256.0 and read.allow_pickle is False  # defaults
    assert settings() is read  # read once for this environment
    monkeypatch.setenv("ENGINE_WORKERS", "2")  # a variable wins over the file, seen without clearing anything
    assert settings().workers == 2
    monkeypatch.setenv("ENGINE_WORKERS", "two")
    with pytest.raises(SettingError, match="ENGINE_WORKERS = 'two' is not a number"):
        settings()
