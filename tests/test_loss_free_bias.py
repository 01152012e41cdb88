"""Loss-free balancing of the sigmoid router (DeepSeek-V3 selection bias)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import sparseroute.moe as moe_pkg
from sparseroute.moe import MoE, build_router

D, E = 8, 4


def _skewed(k: int, rate: float, seed: int = 0):
    """A sigmoid router whose expert 1 wins for (almost) every token: the inputs all point near
    e_0 and expert 1's weight has a large e_0 component."""
    torch.manual_seed(seed)
    router = build_router("sigmoid", D, E, k, bias_update_rate=rate)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=g) * 0.3)
        router.weight[1, 0] = 3.0
    u = torch.zeros(D)
    u[0] = 1.0
    x = 2.0 * u + 0.5 * torch.randn(256, D, generator=g)
    return router.train(), x


def _imbalance_trace(router, x, updates: int, step: bool = True) -> list[float]:
    out = []
    for _ in range(updates):
        out.append(float(router(x).stats["imbalance"]))
        if step:
            router.after_optimizer_step()
    out.append(float(router(x).stats["imbalance"]))
    return out


def test_start_is_skewed():
    router, x = _skewed(1, 0.05)
    r = router(x)
    assert r.tokens_per_expert().tolist() == [0, 256, 0, 0]
    assert float(r.stats["imbalance"]) == pytest.approx(4.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_bias_update_halves_imbalance_within_a_handful_of_updates(seed):
    router, x = _skewed(1, 0.05, seed)
    trace = _imbalance_trace(router, x, 8)
    assert trace[0] == pytest.approx(4.0)
    assert min(trace[1:]) < 0.5 * trace[0], trace


@pytest.mark.parametrize("k,factor", [(1, 0.5), (2, 0.7)])
def test_bias_update_settles_near_balance(k, factor):
    router, x = _skewed(k, 0.02)
    trace = _imbalance_trace(router, x, 30)
    start = trace[0]
    assert start == pytest.approx(E / k)  # every token on the same k experts
    # the sign update oscillates around the balanced bias; every late value is clearly lower
    assert max(trace[-6:]) < factor * start, trace
    assert max(trace[-6:]) < 1.45, trace


def test_no_update_no_change():
    router, x = _skewed(1, 0.05)
    trace = _imbalance_trace(router, x, 5, step=False)
    assert trace == [pytest.approx(4.0)] * 6
    assert bool((router.selection_bias == 0).all())
    # rate 0 never moves the bias either
    router0, x0 = _skewed(1, 0.0)
    assert _imbalance_trace(router0, x0, 5)[-1] == pytest.approx(4.0)
    assert bool((router0.selection_bias == 0).all())


def test_bias_update_hand_value_and_bookkeeping():
    router, x = _skewed(1, 0.1)
    router(x)
    router(x[:10])
    assert router.load_since_update.tolist() == [0.0, 266.0, 0.0, 0.0]
    router.eval()
    router(x)  # inference does not count
    assert router.load_since_update.tolist() == [0.0, 266.0, 0.0, 0.0]
    router.after_optimizer_step()
    # sign(mean - load) = [+1, -1, +1, +1] * 0.1, centred: mean 0.05
    assert_close(router.selection_bias, torch.tensor([0.05, -0.15, 0.05, 0.05]))
    assert router.load_since_update.tolist() == [0.0] * 4
    # an explicit load; zero load leaves the bias alone
    router.update_bias(torch.tensor([10.0, 0.0, 0.0, 2.0]))
    assert_close(router.selection_bias, torch.tensor([0.05, -0.15, 0.05, 0.05]) + torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    before = router.selection_bias.clone()
    router.after_optimizer_step()  # nothing counted since the last update
    assert torch.equal(router.selection_bias, before)
    assert abs(float(router.selection_bias.sum())) < 1e-6


def test_bias_changes_choice_not_weights():
    router, x = _skewed(2, 0.05)
    router.eval()
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([0.0, -10.0, 0.0, 0.0]))
    r = router(x)
    assert int(r.tokens_per_expert()[1]) == 0  # the bias excludes expert 1
    scores = torch.sigmoid(x @ router.weight.t()).detach()
    chosen = scores.gather(1, r.indices)
    assert_close(r.weights, chosen / chosen.sum(1, keepdim=True))  # raw scores, no bias


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [MoE(D, 8, E, 1, router="sigmoid", router_options={"bias_update_rate": 0.1}) for _ in range(2)]
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)[0]
        return x


def test_after_optimizer_step_reaches_nested_routers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D, D),
        nn.ModuleDict({"inner": _Block()}),
        MoE(D, 8, E, 2, router="sigmoid", router_options={"bias_update_rate": 0.1}),
        MoE(D, 8, E, 2, router="topk"),
    )
    block = model[1]["inner"]
    routers = [block.layers[0].router, block.layers[1].router, model[2].router]
    x = torch.randn(32, D)
    model.train()
    h = block(model[0](x))
    model[2](h)
    model[3](h)
    expected = []
    for r in routers:
        load = r.load_since_update.clone()
        assert float(load.sum()) > 0
        assert bool((r.selection_bias == 0).all())
        step = 0.1 * torch.sign(load.mean() - load)
        expected.append(step - step.mean())
    moe_pkg.after_optimizer_step(model)
    for r, want in zip(routers, expected):
        assert r.load_since_update.tolist() == [0.0] * E
        assert bool((r.selection_bias != 0).any())
        assert_close(r.selection_bias, want)  # exactly one update per router


def test_balancing_state_stays_fp32_under_bf16():
    """Casting the model to bf16 must not cast the bias/load state: a default 1e-3 step would
    vanish once |b| >= 0.5 and load counts above 256 would round."""
    torch.manual_seed(0)
    moe = MoE(D, 8, E, 1, router="sigmoid").to(torch.bfloat16)  # bias_update_rate 1e-3
    r = moe.router
    assert r.weight.dtype == torch.bfloat16
    assert r.selection_bias.dtype == torch.float32 and r.load_since_update.dtype == torch.float32
    moe.train()
    x = torch.randn(300, D, dtype=torch.bfloat16)
    y, _ = moe(x)
    moe(x[:1])
    assert y.dtype == torch.bfloat16
    assert float(r.load_since_update.sum()) == 301.0
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([0.6, -0.6, 0.3, -0.3]))
    r.update_bias(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    # step [-1, +1, +1, +1] * 1e-3, centred (mean 5e-4)
    assert_close(r.selection_bias, torch.tensor([0.6 - 1.5e-3, -0.6 + 5e-4, 0.3 + 5e-4, -0.3 + 5e-4]))
    # a later cast back keeps fp32 too, and a bf16 run still balances
    moe.float()
    assert r.selection_bias.dtype == torch.float32


def test_bf16_router_balances():
    router, x = _skewed(1, 0.02)
    router = router.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    trace = _imbalance_trace(router, x, 30)
    assert trace[0] == pytest.approx(4.0)
    assert max(trace[-6:]) < 2.0, trace
