"""The benchmark scripts run end to end at toy sizes and print a consistent JSON line last."""

import importlib.util
import json
import random
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(tmp_path))
    bench = _load("train_throughput")
    assert bench.main(["--batch-size", "2", "--seq-len", "16", "--steps", "1", "--repeats", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "train_throughput" and out["repeats"] == 3
    ratio = out["moe_tokens_per_s"] / out["dense_tokens_per_s"]
    assert out["moe_over_dense_tokens_per_s"] == pytest.approx(ratio, abs=2e-3)
    lo, hi = out["paired_ratio_range"]
    assert 0 < lo <= out["paired_ratio_median"] <= hi
    ci_lo, ci_hi = out["ratio_ci95"]
    assert 0 < ci_lo <= ci_hi
    assert out["moe_parameters"] > out["dense_parameters"]


def test_bootstrap_interval_brackets_the_ratio_and_narrows_with_repeats():
    bench = _load("train_throughput")
    rng = random.Random(1)
    dense = [1.0 + 0.1 * rng.random() for _ in range(9)]
    moe = [1.1 + 0.1 * rng.random() for _ in range(9)]
    lo, hi = bench.bootstrap_ratio_ci(dense, moe)
    ratio = statistics.median(dense) / statistics.median(moe)
    assert lo <= ratio <= hi < 1.0
    assert bench.bootstrap_ratio_ci([1.0] * 5, [2.0] * 5) == (0.5, 0.5)
    narrow = bench.bootstrap_ratio_ci(dense * 8, moe * 8)  # the same spread, 8x the repeats
    assert narrow[1] - narrow[0] < 0.7 * (hi - lo)


def test_train_throughput_rejects_zero_repeats(capsys):
    bench = _load("train_throughput")
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats" in capsys.readouterr().err
