"""Sparse attention in a run: the --attention flag, --set model.attention.* and [model.attention]
resolve to the same config; a short real run logs the attention statistics per interval and
stores them (and the time per step) in its final metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparseroute.attention import AttentionConfig, BlockRouting
from sparseroute.cli import build_run_config, main, make_parser
from sparseroute.lab.spec import SweepSpec, Variant
from sparseroute.models import flops_per_token
from sparseroute.train.config import load_settings, resolve_run, settings_conflicts
from sparseroute.train.loop import _Accum

TOML = """
[model]
depth = 2
[model.attention]
router = "moba"
block_size = 16
router_options = { top_k = 2, key_conv = 4 }
[train]
seq_len = 64
"""


def _cfg(argv):
    return build_run_config(make_parser().parse_args(["train", "--out", "x", *argv]))


def test_flag_set_and_toml_resolve_to_the_same_run(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(TOML)
    from_file = _cfg(["--config", str(toml)])
    from_flags = _cfg(["--depth", "2", "--seq-len", "64", "--attention", "moba",
                       "--set", "model.attention.block_size=16",
                       "--set", "model.attention.router_options.top_k=2",
                       "--set", "model.attention.router_options.key_conv=4"])
    from_set = _cfg(["--depth", "2", "--seq-len", "64", "--set", "model.attention.router=moba",
                     "--set", "model.attention.block_size=16",
                     "--set", 'model.attention.router_options={"top_k": 2, "key_conv": 4}'])
    assert from_file == from_flags == from_set == resolve_run(load_settings(toml))
    assert from_file.model.attention == AttentionConfig(router="moba", block_size=16,
                                                        router_options={"top_k": 2, "key_conv": 4})
    assert from_file.model.moe is None
    # the router's default options; false switches it off again; the flag with the MoE flags
    assert _cfg(["--attention", "window"]).model.attention == AttentionConfig(router="window")
    assert _cfg(["--attention", "moba", "--set", "model.attention=false"]).model.attention is None
    both = _cfg(["--attention", "moba", "--router", "topk"]).model
    assert both.attention.router == "moba" and both.moe.router == "topk"
    # a run stored with sparse attention refuses a resume that gives another router, names the field
    stored = from_file
    given = {"model": {"depth": 2, "attention": {"router": "window"}}, "train": {"seq_len": 64}}
    assert "attention" in settings_conflicts(stored, given)


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--attention", "nope"], "unknown attention router 'nope'; known: "),
        (["--attention", "moba", "--set", "model.attention.router_options.top_kk=1"], "top_kk"),
        (["--attention", "moba", "--set", "model.attention.block_size=0"], "attention.block_size"),
        (["--attention", "moba", "--set", "model.attention.layers=[9]"], "attention.layers"),
        (["--set", "model.attention=3"], "model: attention must be None"),
    ],
)
def test_errors_are_one_line_and_name_the_setting(tmp_path, capsys, argv, said):
    assert main(["train", "--out", str(tmp_path / "r"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_help_lists_the_flag_with_its_setting_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--attention NAME" in text and "[model.attention.router; default moba]" in text
    assert "moba" in text and "window" in text


def test_sweep_variants_may_change_the_attention():
    base = {"model": {"depth": 2}, "train": {"tokens": "8k", "batch_size": 2, "seq_len": 64}}
    spec = SweepSpec(name="a", base=base, seeds=(0,), variants=(
        Variant("sdpa", {}),
        Variant("moba", {"model": {"attention": {"router": "moba", "router_options": {"top_k": 1}, "block_size": 16}}}),
    ))
    plan = spec.plan()
    assert plan[0].config.model.attention is None
    assert plan[1].config.model.attention == AttentionConfig(router="moba", router_options={"top_k": 1}, block_size=16)


def test_accumulated_attention_stats_survive_a_checkpoint():
    acc = _Accum()
    idx = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    for step in range(3):
        acc.loss += 1.0
        acc.n += 1
        acc.add_attention([
            BlockRouting(idx, 4, stats={"density": torch.tensor(0.2 + 0.1 * step), "recall": torch.tensor(0.5)}),
            BlockRouting(idx, 4, stats={"density": torch.tensor(0.4), "recall": torch.tensor(1.0)}),
        ])
    rec = acc.interval_record()
    assert rec["attention"] == pytest.approx({"density": (0.3 + 0.35 + 0.4) / 3, "recall": 0.75})
    restored = _Accum(**json.loads(json.dumps(acc.to_json())))
    assert restored.interval_record() == rec
    acc.reset_interval()
    assert "attention" not in _Accum().interval_record() and acc.interval_record()["attention"] == {}


def test_a_short_run_logs_attention_stats(tmp_path):
    cache, out, text = tmp_path / "cache", tmp_path / "run", tmp_path / "corpus.txt"
    # a small text corpus (this package's model sources): the run needs only a few windows of it
    src = sorted((Path(__file__).resolve().parents[2] / "src" / "sparseroute" / "models").glob("*.py"))
    text.write_text("".join(p.read_text() for p in src))
    args = ["train", "--depth", "2", "--seq-len", "64", "--batch-size", "2", "--tokens", "768",
            "--corpus", f"text:{text}", "--eval-tokens", "520", "--log-every", "2", "--checkpoint-every", "0",
            "--attention", "moba",
            "--set", "model.attention.block_size=16", "--set", "model.attention.router_options.top_k=1",
            "--out", str(out), "--quiet"]
    env = dict(os.environ, SPARSEROUTE_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-m", "sparseroute", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        att = r["attention"]
        assert set(att) >= {"density", "blocks_per_query", "recall", "mass"}
        # seq 64 in 4 blocks of 16, own + top-1 past: (3·16² + 4·16·17/2) / (64·65/2) = 0.63 kept
        assert att["density"] == pytest.approx(1312 / 2080) and 0.0 <= att["recall"] <= 1.0 and 0.0 < att["mass"] <= 1.0
        assert "routing" not in r
    prof = final["attention_profile"]
    assert len(prof) == 2 and all(lay["density"] == pytest.approx(1312 / 2080) for lay in prof)
    assert final["step_seconds"] > 0 and final["step_seconds"] * final["steps"] <= final["train_seconds"]
    cfg = build_run_config(make_parser().parse_args(args[:-3] + ["--out", "x"]))
    assert final["flops_per_token"] == pytest.approx(flops_per_token(cfg.model, 64))
    assert final["flops_per_token"]["attention"] < flops_per_token(cfg.model.replace(attention=None), 64)["attention"]
    assert json.loads((out / "config.json").read_text())["model"]["attention"]["router"] == "moba"
