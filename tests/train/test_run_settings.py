"""A run written down by hand: TOML settings, dotted --set changes and the train flags, all
resolved by one path (sparseroute.train.config.resolve_run) into the same RunConfig."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparseroute.cli import build_run_config, make_parser
from sparseroute.lab.spec import SweepSpec, Variant
from sparseroute.models import preset, sized
from sparseroute.moe import MoEConfig
from sparseroute.train.config import apply_setting, load_settings, merge_settings, resolve_run

RUN_TOML = """
[model]
preset = "tiny"
[model.moe]
num_experts = 4
top_k = 1
[data]
corpus = "stdlib"
max_bytes = "300k"
[train]
tokens = "16k"
batch_size = 4
seq_len = 64
"""


def _cfg(argv):
    return build_run_config(make_parser().parse_args(["train", "--out", "x", *argv]))


def test_flags_config_and_set_resolve_to_the_same_run(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML)
    from_file = _cfg(["--config", str(toml)])
    from_flags = _cfg(["--experts", "4", "--top-k", "1", "--max-bytes", "300k", "--tokens", "16k",
                       "--batch-size", "4", "--seq-len", "64"])
    from_set = _cfg(["--set", "model.moe.num_experts=4", "--set", "model.moe.top_k=1", "--set", "data.max_bytes=300k",
                     "--set", "train.tokens=16k", "--set", "train.batch_size=4", "--set", "train.seq_len=64"])
    assert from_file == from_flags == from_set
    assert from_file.model.moe == MoEConfig(num_experts=4, top_k=1)
    assert from_file.train.tokens == 16_000 and from_file.data.max_bytes == 300_000
    # the same settings through the Python API
    assert resolve_run(load_settings(toml)) == from_file


def test_later_settings_win_config_then_flags_then_set(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML)
    cfg = _cfg(["--config", str(toml), "--experts", "8", "--set", "model.moe.router=cosine",
                "--set", "model.moe.router_options.d_space=16", "--router-option", "learn_temperature=false"])
    assert cfg.model.moe.num_experts == 8  # the flag over the file
    assert cfg.model.moe.top_k == 1  # kept from the file
    assert cfg.model.moe.router == "cosine"
    assert cfg.model.moe.router_options == {"d_space": 16, "learn_temperature": False}
    over = _cfg(["--config", str(toml), "--experts", "8", "--set", "model.moe.num_experts=2"])
    assert over.model.moe.num_experts == 2  # --set last


def test_depth_replaces_the_preset_and_dense_drops_the_moe(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML)
    cfg = _cfg(["--config", str(toml), "--depth", "2"])
    assert cfg.model.d_model == sized(2).d_model and cfg.model.n_layers == 2
    dense = _cfg(["--config", str(toml), "--set", "model.moe=false"])
    assert dense.model.moe is None
    assert dense.model.replace(max_seq_len=256) == preset("tiny")
    with pytest.raises(ValueError, match="--dense cannot be combined"):
        _cfg(["--dense", "--experts", "4"])


@pytest.mark.parametrize("text, needle", [
    ("[modle]\npreset = 'tiny'\n", "unknown table"),
    ("[model]\npreset = 'huge'\n", "unknown preset"),
    ("[model]\npreset = 'tiny'\ndepth = 2\n", "preset or a depth"),
    ("[train]\ntokens = 'many'\n", "train.tokens"),
    ("[model.moe]\ntop_k = 9\n", "top_k"),
    ("[model]\nmoe = 3\n", "moe"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_settings_name_what_is_wrong(tmp_path, text, needle):
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    with pytest.raises(ValueError, match=needle):
        _cfg(["--config", str(toml)])


@pytest.mark.parametrize("setting, needle", [
    ("train.tokens", "SECTION.FIELD=VALUE"),
    ("tokens=3", "SECTION.FIELD=VALUE"),
    ("optim.lr=3", "section must be one of"),
])
def test_bad_set_is_refused(setting, needle):
    with pytest.raises(ValueError, match=needle):
        apply_setting({}, setting)


def test_a_sweep_variant_is_the_base_merged_with_its_changes():
    """The lab resolves a (variant, seed) with the same merge and resolution as train --set."""
    base = {"model": {"preset": "tiny", "moe": {"num_experts": 4}}, "train": {"tokens": "16k", "seq_len": 64}}
    variant = Variant("cos", {"model": {"moe": {"router": "cosine"}}})
    spec = SweepSpec(name="s", base=base, variants=(variant,), seeds=(3,))
    settings = merge_settings(base, variant.overrides)
    apply_setting(settings, "train.seed=3")
    assert spec.variant_config(variant, 3) == resolve_run(settings)
    assert merge_settings(base, {"model": {"moe": False}})["model"]["moe"] is False
    with pytest.raises(ValueError, match="table of MoE settings or false"):
        merge_settings(base, {"model": {"moe": 7}})


def test_train_config_and_set_from_the_command_line(tmp_path):
    """End to end: a run started with --config and --set stores the resolved config, and --resume
    with the same arguments continues it."""
    toml = tmp_path / "run.toml"
    toml.write_text(RUN_TOML)
    out = tmp_path / "run"
    env = dict(os.environ, SPARSEROUTE_CACHE=str(tmp_path / "cache"))
    argv = [sys.executable, "-m", "sparseroute", "train", "--config", str(toml), "--set", "model.moe.router=hash",
            "--set", "train.eval_tokens=2048", "--out", str(out), "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((out / "config.json").read_text())
    assert stored["model"]["moe"]["router"] == "hash" and stored["model"]["moe"]["num_experts"] == 4
    assert stored["train"]["tokens"] == 16_000
    again = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["test_ppl"] == json.loads(
        proc.stdout.strip().splitlines()[-1])["test_ppl"]
