"""LMConfig / MoEConfig: validation, JSON round trip, presets and their parameter counts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sparseroute.models import config as lm_config
from sparseroute.models import PRESETS, LMConfig, TransformerLM, parameter_counts, preset, sized
from sparseroute.moe import MoEConfig

# -- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        LMConfig(),
        LMConfig(vocab_size=100, d_model=64, n_layers=6, n_heads=2, tie_embeddings=False, rope_base=500.0),
        LMConfig(
            n_layers=6,
            moe=MoEConfig(
                num_experts=6,
                top_k=3,
                d_ff=48,
                router="cosine",
                router_options={"d_space": 16, "temperature": 5.0},
                layers=(4, 1, 2),
                capacity_factor=1.25,
                num_shared_experts=1,
                activation="gelu",
            ),
        ),
        preset("paper"),
    ],
)
def test_json_round_trip(cfg):
    text = json.dumps(cfg.to_dict())
    back = LMConfig.from_dict(json.loads(text))
    assert back == cfg
    assert back.moe_layer_indices() == cfg.moe_layer_indices()
    if cfg.moe is not None:
        assert isinstance(back.moe, MoEConfig)
        assert type(back.moe.layers) is type(cfg.moe.layers)


def test_from_dict_rejects_unknown_keys():
    d = LMConfig().to_dict()
    d["n_layer"] = 3
    with pytest.raises(ValueError, match="n_layer"):
        LMConfig.from_dict(d)
    d = LMConfig(moe=MoEConfig()).to_dict()
    d["moe"]["experts"] = 3
    with pytest.raises(ValueError, match="experts"):
        LMConfig.from_dict(d)


def test_frozen_and_router_options_copied():
    opts = {"d_space": 8}
    m = MoEConfig(router="cosine", router_options=opts)
    opts["d_space"] = 999
    assert m.router_options == {"d_space": 8}
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.top_k = 1  # type: ignore[misc]


def test_moe_layer_indices():
    assert LMConfig(n_layers=5).moe_layer_indices() == ()
    assert LMConfig(n_layers=5, moe=MoEConfig()).moe_layer_indices() == (0, 1, 2, 3, 4)
    assert LMConfig(n_layers=5, moe=MoEConfig(layers="every_other")).moe_layer_indices() == (1, 3)
    assert LMConfig(n_layers=5, moe=MoEConfig(layers=(3, 0))).moe_layer_indices() == (0, 3)
    assert LMConfig(n_layers=5, moe=MoEConfig(layers=[2])).moe.layers == (2,)


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("vocab_size", 0, "vocab_size"),
        ("d_model", -8, "d_model"),
        ("n_layers", 0, "n_layers"),
        ("n_heads", 3, "n_heads"),  # 256 % 3 != 0
        ("n_heads", 256, "n_heads"),  # head dim 1 is odd
        ("d_ff", 2.5, "d_ff"),
        ("max_seq_len", 0, "max_seq_len"),
        ("rope_base", 0.0, "rope_base"),
        ("norm_eps", -1e-5, "norm_eps"),
        ("init_std", 0, "init_std"),
        ("tie_embeddings", "yes", "tie_embeddings"),
        ("moe", "topk", "moe"),
    ],
)
def test_bad_lm_config(field, value, match):
    with pytest.raises(ValueError, match=match) as info:
        LMConfig(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value) or field == "moe"


def test_odd_head_dim_message():
    with pytest.raises(ValueError, match="even"):
        LMConfig(d_model=12, n_heads=4)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_experts", 0, "num_experts"),
        ("top_k", 9, "top_k"),
        ("top_k", 0, "top_k"),
        ("d_ff", 0, "d_ff"),
        ("router", "nope", "nope"),
        ("router_options", {"bogus": 1}, "bogus"),
        ("layers", "odd", "layers"),
        ("layers", (0, 0), "layers"),
        ("layers", (), "layers"),
        ("layers", (-1,), "layers"),
        ("capacity_factor", 0.0, "capacity_factor"),
        ("num_shared_experts", -1, "num_shared_experts"),
        ("activation", "tanh", "activation"),
    ],
)
def test_bad_moe_settings(field, value, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{field: value})


def test_unknown_router_lists_known():
    with pytest.raises(ValueError, match="cosine"):
        MoEConfig(router="nope")


def test_moe_layers_checked_against_n_layers():
    with pytest.raises(ValueError, match="moe.layers"):
        LMConfig(n_layers=4, moe=MoEConfig(layers=(1, 4)))
    with pytest.raises(ValueError, match="moe.layers"):
        LMConfig(n_layers=1, moe=MoEConfig(layers="every_other"))
    with pytest.raises(ValueError, match="moe.d_ff"):
        LMConfig(d_ff=1, moe=MoEConfig(top_k=2))


# -- presets -------------------------------------------------------------------------------------

# exact counts quoted in the preset docstrings: (dense, MoE variant with MoEConfig())
EXPECTED = {
    "tiny": (4_262_144, 13_707_520),
    "small": (18_979_200, 61_471_104),
    "paper": (38_179_584, 80_671_488),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    dense = parameter_counts(preset(name, moe=None))["total"]
    moe = parameter_counts(preset(name, moe=MoEConfig()))["total"]
    assert (dense, moe) == EXPECTED[name]
    lo, hi = {"tiny": (3e6, 6e6), "small": (15e6, 25e6), "paper": (76e6, 84e6)}[name]
    checked = moe if name == "paper" else dense
    assert lo <= checked <= hi
    doc = getattr(lm_config, f"_{name}").__doc__
    assert f"{dense:,}" in doc and f"{moe:,}" in doc


def test_paper_preset_is_the_moe_model():
    cfg = preset("paper")
    assert cfg.moe == MoEConfig() and cfg.vocab_size == 50257 and cfg.max_seq_len >= 512
    assert preset("tiny").moe is None


def test_parameter_counts_match_a_real_build_and_the_formula():
    cfg = preset("tiny", moe=MoEConfig(num_experts=4, top_k=2))
    torch.manual_seed(0)
    real = TransformerLM(cfg)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    Vv, Dd, Ll, Ff = 256, 256, 4, 1024
    Fe, E = Ff // 2, 4
    per_layer = 4 * Dd * Dd + E * 3 * Dd * Fe + Dd * E + 2 * Dd
    assert counts["total"] == Vv * Dd + Ll * per_layer + Dd
    assert counts["active"] == counts["total"] - Ll * (E - 2) * 3 * Dd * Fe
    dense = parameter_counts(preset("tiny"))
    assert dense["total"] == Vv * Dd + Ll * (4 * Dd * Dd + 3 * Dd * Ff + 2 * Dd) + Dd
    assert counts["routing"] == counts["linear_router"] == Ll * Dd * E
    assert dense["routing"] == dense["linear_router"] == 0


@pytest.mark.parametrize(
    "router, options, per_layer",
    [
        ("cosine", {"d_space": 16}, 256 * 16 + 8 * 16 + 1),  # D·R + E·R + 1 (learned inverse temperature)
        ("cosine", {"d_space": 16, "learn_temperature": False}, 256 * 16 + 8 * 16 + 1),  # tau counted either way
        ("hash", {}, 0),
        ("topk", {}, 256 * 8),
    ],
)
def test_routing_parameter_counts(router, options, per_layer):
    counts = parameter_counts(preset("tiny", moe=MoEConfig(router=router, router_options=options)))
    assert counts["routing"] == 4 * per_layer
    assert counts["linear_router"] == 4 * 256 * 8


def test_preset_errors_and_overrides():
    with pytest.raises(ValueError, match="tiny") as info:
        preset("huge")
    assert "small" in str(info.value) and "paper" in str(info.value)
    with pytest.raises(ValueError, match="n_layer"):
        preset("tiny", n_layer=3)
    with pytest.raises(ValueError, match="n_heads"):
        preset("tiny", n_heads=3)
    cfg = preset("tiny", max_seq_len=64, moe={"router": "hash", "top_k": 1})
    assert cfg.max_seq_len == 64 and cfg.moe == MoEConfig(router="hash", top_k=1)
    assert set(PRESETS) == {"tiny", "small", "paper"} and all(PRESETS.values())


def test_sized():
    assert sized(4) == preset("tiny")
    for depth in (1, 3, 7, 12):
        cfg = sized(depth)
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (64 * depth, depth, depth, 256 * depth)
        assert cfg.head_dim == 64
    assert sized(6, vocab_size=50257).vocab_size == 50257
    with pytest.raises(ValueError, match="depth"):
        sized(0)
    assert parameter_counts(sized(8))["total"] > parameter_counts(sized(6))["total"] > parameter_counts(sized(4))["total"]
