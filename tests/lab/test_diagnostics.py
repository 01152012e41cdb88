"""Diagnostics on small models: routing profile, halting curve, fluctuation, coupling, specialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparseroute.evaluation.diagnostics import (
    expert_specialisation,
    halting_choice,
    halting_curve,
    router_expert_coupling,
    routing_fluctuation,
    routing_profile,
)
from sparseroute.models import TransformerLM, preset
from sparseroute.moe import MoEConfig


def model(seed=0, **moe):
    torch.manual_seed(seed)
    cfg = preset("tiny", d_model=64, n_layers=2, n_heads=2, d_ff=128, max_seq_len=32,
                 moe=MoEConfig(num_experts=4, top_k=2, **moe))
    m = TransformerLM(cfg)
    with torch.no_grad():  # make the expert updates large enough that halting has something to cut
        for moe_layer in m.moe_layers():
            moe_layer.experts.w_out.mul_(30)
    return m


@pytest.fixture(scope="module")
def text():
    return np.random.default_rng(0).integers(0, 256, size=4096).astype(np.uint16)


def test_routing_profile_reports_hop_collinearity(text):
    prof = routing_profile(model(hops=2), text, batch_size=4, seq_len=32, max_tokens=1024)
    assert len(prof) == 2
    for lay in prof:
        assert -1 <= lay["hop_cos"] <= 1 and lay["active_per_token"] == pytest.approx(4.0)
        assert lay["entropy"] > 0


def test_halting_curve_saves_expert_work_and_starts_at_the_baseline(text):
    m = model(hops=3)
    prof = routing_profile(m, text, batch_size=4, seq_len=32, max_tokens=1024)
    rows = halting_curve(m, text, [1e9, 0.0], batch_size=4, seq_len=32, max_tokens=1024)
    assert [r["tau"] for r in rows] == [0.0, 1e9]
    base, allhalt = rows
    assert base["moe_flops_saved"] == 0.0 and base["ppl_change_pct"] == 0.0
    # tau huge: every token stops after its first hop, so 2 of 3 hops of expert work are saved
    assert allhalt["moe_flops_saved"] == pytest.approx(2 / 3)
    assert allhalt["hops_per_token"] == pytest.approx(1.0)
    assert base["expert_pairs_per_token"] == pytest.approx(sum(p["active_per_token"] for p in prof))
    # the model's halting setting is restored
    assert all(moe.halt_threshold == 0.0 for moe in m.moe_layers())
    assert math.isfinite(allhalt["ppl"]) and allhalt["ppl"] != base["ppl"]
    with pytest.raises(ValueError, match="MoE"):
        dense = TransformerLM(preset("tiny", d_model=64, n_layers=1, n_heads=2, d_ff=128))
        halting_curve(dense, text, [0.1], batch_size=4, seq_len=32, max_tokens=512)


def test_halting_tau_is_chosen_on_validation_only(text):
    m = model(hops=3)
    kw = {"batch_size": 4, "seq_len": 32, "max_tokens": 512}
    taus = [1e-3, 0.3, 1.0, 3.0, 1e9]
    other_test = np.random.default_rng(1).integers(0, 256, size=4096).astype(np.uint16)
    a = halting_choice(m, text, text[::-1].copy(), taus, max_ppl_change_pct=5.0, **kw)
    b = halting_choice(m, text, other_test, taus, max_ppl_change_pct=5.0, **kw)
    assert a["tau"] == b["tau"] > 0.0  # some halting fits the budget, and the test text does not move it
    assert [(r["tau"], r["ppl"]) for r in a["validation"]] == [(r["tau"], r["ppl"]) for r in b["validation"]]
    assert a["chosen_on"] == "validation" and a["test"]["tau"] == a["tau"]
    assert a["test"]["ppl"] != b["test"]["ppl"]  # the test text is what the reported figures come from
    # the choice: the largest saving within the budget on validation
    ok = [r for r in a["validation"] if r["ppl_change_pct"] <= 5.0]
    assert a["tau"] == max(ok, key=lambda r: (r["moe_flops_saved"], -r["tau"]))["tau"]
    # a budget nothing meets keeps tau = 0: no halting, nothing saved on test
    none = halting_choice(m, text, other_test, [1e9], max_ppl_change_pct=-1.0, **kw)
    assert none["tau"] == 0.0 and none["test"]["moe_flops_saved"] == 0.0


def test_routing_fluctuation(text):
    a = model(seed=0)
    assert routing_fluctuation(a, a, text, batch_size=4, seq_len=32, max_tokens=512) == [0.0, 0.0]
    b = model(seed=0)
    with torch.no_grad():
        b.moe_layers()[1].router.weight.neg_()  # flips the preference order of the second layer only
    fl = routing_fluctuation(a, b, text, batch_size=4, seq_len=32, max_tokens=512)
    assert fl[0] == 0.0 and fl[1] > 0.5


def test_router_expert_coupling_detects_alignment():
    m = model()
    moe = m.moe_layers()[0]
    with torch.no_grad():
        u = torch.linalg.svd(moe.experts.w_in[2].float(), full_matrices=False).U[:, 0]
        moe.router.weight[2] = 3.0 * u
    coupling = router_expert_coupling(m)
    assert coupling[0][2] == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= v <= 1 for v in coupling[1])
    assert router_expert_coupling(model(router="hash"))[0] is None


def test_expert_specialisation_counts_top1_tokens():
    m = model()
    text = np.tile(np.arange(8, dtype=np.uint16), 300)
    spec = expert_specialisation(m, text, top=3, batch_size=4, seq_len=32, max_tokens=1024)
    assert len(spec) == 2 and len(spec[0]) == 4
    total = sum(cnt for e in spec[0] for _, cnt, _ in e)
    assert 0 < total <= 1024
    for e in spec[0]:
        for tok, cnt, lift in e:
            assert 0 <= tok < 8 and cnt > 0 and lift > 0


def test_halting_taus_at_quantiles_halt_that_share_of_tokens(text):
    from sparseroute.evaluation.diagnostics import halting_taus

    m = model(hops=2)
    taus = halting_taus(m, text, [0.25, 0.5], batch_size=4, seq_len=32, max_tokens=1024)
    assert taus[0] < taus[1]
    rows = halting_curve(m, text, taus, batch_size=4, seq_len=32, max_tokens=1024)
    # with 2 hops, tau at quantile q halts a share q of the tokens after hop 0: q/2 of the expert work
    assert rows[1]["moe_flops_saved"] == pytest.approx(0.25 / 2, abs=0.01)
    assert rows[2]["moe_flops_saved"] == pytest.approx(0.5 / 2, abs=0.01)
    with pytest.raises(ValueError, match="multi-hop"):
        halting_taus(model(), text, [0.5], batch_size=4, seq_len=32, max_tokens=512)
    with pytest.raises(ValueError, match="quantiles"):
        halting_taus(m, text, [1.5])
