"""Property tests of the routers and the routing helpers, plus hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from sparseroute.moe import MoE, build_router, load_balance_loss, z_loss
from sparseroute.moe.routers import ROUTERS
from sparseroute.moe.routers.relu import chunk_level_sparsity, token_level_sparsity
from sparseroute.moe.routers.sinkhorn import sinkhorn_plan
from sparseroute.routing import Routing, apply_capacity, capacity_for, routing_stats

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def _make(name: str, D: int, E: int, k: int, seed: int, **options):
    if name == "cosine":
        options.setdefault("d_space", 4)
    if name == "sinkhorn":
        options.setdefault("probability", 1.0)
    torch.manual_seed(seed)
    return build_router(name, D, E, k, **options)


def _inputs(router, T: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g) * 3
    ids = torch.randint(0, 50, (T,), generator=g) if router.needs_token_ids else None
    return x, ids


@st.composite
def router_setups(draw, names=tuple(sorted(ROUTERS.names()))):
    name = draw(st.sampled_from(names))
    E = draw(st.integers(1, 8))
    k = draw(st.integers(1, E))
    T = draw(st.integers(0, 20))
    D = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    train = draw(st.booleans())
    return name, E, k, T, D, seed, train


# -- indices ---------------------------------------------------------------------------------


@SETTINGS
@given(router_setups())
def test_indices_valid_and_unique(setup):
    name, E, k, T, D, seed, train = setup
    router = _make(name, D, E, k, seed).train(train)
    x, ids = _inputs(router, T, D, seed)
    r = router(x, ids)
    assert isinstance(r, Routing) and r.num_experts == E
    assert r.indices.dtype == torch.int64 and r.indices.shape[0] == T
    idx = r.indices
    assert bool(((idx == -1) | ((idx >= 0) & (idx < E))).all()), idx
    # unused slots carry zero weight
    assert bool((r.weights[idx == -1] == 0).all())
    for row in idx.tolist():
        used = [e for e in row if e >= 0]
        assert len(used) == len(set(used)), row
    if not router.variable_k:
        assert r.indices.shape[1] == k
        assert bool((idx >= 0).all())
    assert int(r.tokens_per_expert().sum()) == int((idx >= 0).sum())


@SETTINGS
@given(router_setups(names=("topk", "cosine", "random_fixed", "sigmoid")), st.sampled_from([None, True]))
def test_renormalized_weights_sum_to_one(setup, renormalize):
    name, E, k, T, D, seed, train = setup
    opts = {}
    if renormalize is not None:
        opts["renormalize"] = renormalize
    elif name != "sigmoid":  # default renormalises only when k > 1; sigmoid's default is True
        k = max(k, min(2, E))
        if k == 1:
            opts["renormalize"] = True
    router = _make(name, D, E, k, seed, **opts).train(train)
    x, ids = _inputs(router, T, D, seed)
    r = router(x, ids)
    assert bool((r.weights >= 0).all())
    assert_close(r.weights.sum(dim=1), torch.ones(T), atol=1e-5, rtol=0)


def test_topk_k1_default_keeps_raw_probability():
    router = _make("topk", 4, 5, 1, seed=0)
    x, _ = _inputs(router, 6, 4, 0)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    assert_close(r.weights[:, 0], probs.max(dim=1).values)
    assert bool((r.weights[:, 0] < 1).all())


# -- expert choice -----------------------------------------------------------------------------


@SETTINGS
@given(
    st.integers(1, 8),
    st.integers(1, 8),
    st.integers(1, 24),
    st.floats(0.1, 3.0),
    st.integers(0, 2**16),
)
def test_expert_choice_exact_capacity(E, k_raw, T, cf, seed):
    k = min(k_raw, E)
    router = _make("expert_choice", 6, E, k, seed, capacity_factor=cf)
    x, _ = _inputs(router, T, 6, seed)
    r = router(x)
    C = router.capacity(T)
    assert C == min(T, max(1, min(math.ceil(cf * T * k / E), T * k)))
    assert r.tokens_per_expert().tolist() == [C] * E
    # slot e is expert e, and the weight is that expert's probability
    probs = torch.softmax(x @ router.weight.t(), dim=-1).detach()
    used = r.indices >= 0
    assert bool((r.indices[used] == torch.arange(E).expand(T, E)[used]).all())
    assert_close(r.weights[used], probs[used])
    # each expert took its C highest-probability tokens
    for e in range(E):
        taken = probs[used[:, e], e]
        left = probs[~used[:, e], e]
        if left.numel():
            assert float(taken.min()) >= float(left.max())


# -- sinkhorn ----------------------------------------------------------------------------------


@SETTINGS
@given(
    st.integers(1, 32),
    st.integers(1, 8),
    st.floats(0.05, 3.0),
    st.sampled_from([0.5, 1.0]),
    st.integers(0, 2**16),
)
def test_sinkhorn_plan_marginals(T, E, scale, xi, seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.randn(T, E, generator=g) * scale
    tol = 1e-5
    plan, iters, err = sinkhorn_plan(cost, xi=xi, max_iters=1000, tol=tol)
    assert plan.shape == (T, E) and plan.dtype == cost.dtype
    assert bool((plan >= 0).all())
    assert 1 <= iters <= 1000
    assert err <= tol
    # columns are exact after every iteration (up to float32 rounding of the plan)
    assert_close(plan.sum(0).double(), torch.full((E,), T / E, dtype=torch.float64), atol=1e-5 * max(1, T / E), rtol=1e-6)
    row_err = (plan.double().sum(1) - 1).abs().max().item()
    assert row_err <= tol + 1e-6
    assert abs(row_err - err) <= 1e-6
    # entropic structure: log(plan) - cost/xi = f_t + g_e (additively separable)
    resid = plan.double().log() - cost.double() / xi
    centred = resid - resid.mean(0, keepdim=True) - resid.mean(1, keepdim=True) + resid.mean()
    assert centred.abs().max().item() < 1e-4


def test_sinkhorn_plan_balances_a_skewed_cost():
    # every token prefers expert 0; the plan still gives each expert T/E mass and its top-1 is balanced
    cost = torch.tensor([[3.0, 0.0], [2.9, 0.0], [2.0, 0.0], [1.0, 0.0]])
    plan, _, err = sinkhorn_plan(cost, xi=0.5, max_iters=2000, tol=1e-7)
    assert err <= 1e-7
    assert_close(plan.sum(0), torch.tensor([2.0, 2.0]), atol=1e-5, rtol=0)
    assert plan.argmax(1).tolist() == [0, 0, 1, 1]


def test_sinkhorn_router_uses_plan_only_in_training():
    router = _make("sinkhorn", 4, 2, 1, seed=0)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.zeros(8, 4)
    x[:, 0] = torch.linspace(1, 4, 8)  # softmax prefers expert 0 for every token
    router.eval()
    r_eval = router(x)
    assert r_eval.indices[:, 0].tolist() == [0] * 8
    assert float(r_eval.stats["sinkhorn_applied"]) == 0.0
    router.train()
    r_train = router(x)
    assert float(r_train.stats["sinkhorn_applied"]) == 1.0
    assert r_train.tokens_per_expert().tolist() == [4, 4]
    assert r_train.indices[:, 0].tolist() == [1] * 4 + [0] * 4  # the weakest preferences move
    # weights are still the softmax probabilities of the chosen expert
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    assert_close(r_train.weights[:, 0], probs.gather(1, r_train.indices).squeeze(1))


# -- parameter counts ------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.integers(1, 32), st.integers(1, 16), st.integers(1, 16), st.booleans())
def test_cosine_parameter_counts(D, E, R, learn):
    router = build_router("cosine", D, E, 1, d_space=R, learn_temperature=learn)
    assert router.routing_parameters() == D * R + E * R + 1
    assert router.linear_router_parameters() == D * E
    assert sum(p.numel() for p in router.parameters()) == D * R + E * R + (1 if learn else 0)


def test_linear_router_parameter_count():
    assert build_router("topk", 12, 5, 2).routing_parameters() == 60
    assert build_router("hash", 12, 5, 2).routing_parameters() == 0
    assert build_router("random_fixed", 12, 5, 2).routing_parameters() == 60


# -- fixed routers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hash", "random_fixed"])
def test_fixed_routes_survive_training(name):
    torch.manual_seed(0)
    moe = MoE(8, 8, 6, 2, router=name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 8, generator=g)
    ids = torch.randint(0, 100, (3, 5), generator=g) if name == "hash" else None
    moe.eval()
    _, r0 = moe(x, ids)
    buffers0 = {n: b.clone() for n, b in moe.router.named_buffers()}
    w_in0 = moe.experts.w_in.detach().clone()
    opt = torch.optim.AdamW(moe.parameters(), lr=0.05, weight_decay=0.1)
    moe.train()
    for _ in range(4):
        y, r = moe(x, ids)
        loss = (y - x).square().mean() + sum(r.losses.values(), torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe.after_optimizer_step()
    assert not torch.equal(moe.experts.w_in, w_in0)  # training really happened
    moe.eval()
    _, r1 = moe(x, ids)
    assert torch.equal(r1.indices, r0.indices)
    assert torch.equal(r1.weights, r0.weights)
    for n, b in moe.router.named_buffers():
        assert torch.equal(b, buffers0[n]), n
    assert list(moe.router.parameters()) == []


def test_hash_same_id_same_experts_regardless_of_x():
    router = build_router("hash", 4, 8, 3, seed=7)
    ids = torch.tensor([5, 9, 5, 1234567, 9, 5, 0, 2**40])
    r1 = router(torch.randn(8, 4), ids)
    r2 = router(torch.randn(8, 4) * 100, ids)
    assert torch.equal(r1.indices, r2.indices)
    assert torch.equal(r1.indices[0], r1.indices[2]) and torch.equal(r1.indices[0], r1.indices[5])
    assert torch.equal(r1.indices[1], r1.indices[4])
    assert_close(r1.weights, torch.full((8, 3), 1 / 3))
    # routes depend on the seed and spread ids over all experts
    other = build_router("hash", 4, 8, 3, seed=8)(torch.zeros(8, 4), ids)
    assert not torch.equal(other.indices, r1.indices)
    many = build_router("hash", 4, 8, 1)(torch.zeros(4000, 4), torch.arange(4000))
    load = many.tokens_per_expert().float()
    assert int((load > 0).sum()) == 8 and float(load.max() / load.mean()) < 1.15


# -- relu router sparsity statistics ---------------------------------------------------------

ACTIVE = torch.tensor(
    [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [1, 1, 1, 0],
        [1, 0, 0, 0],
    ],
    dtype=torch.bool,
)


def test_tls_cls_hand_values():
    assert_close(token_level_sparsity(ACTIVE), torch.tensor(1 - 6 / 24))
    # windows of 2: used {0,1} -> 2/4 idle; nothing used -> 4/4; used {0,1,2} -> 1/4
    assert_close(chunk_level_sparsity(ACTIVE, 2), torch.tensor((0.5 + 1.0 + 0.25) / 3))
    # one full window of 4 (the trailing 2 tokens are ignored): used {0,1}
    assert_close(chunk_level_sparsity(ACTIVE, 4), torch.tensor(0.5))
    assert_close(chunk_level_sparsity(ACTIVE, 1), torch.tensor(1 - 6 / 24))
    assert float(chunk_level_sparsity(ACTIVE, 7)) == 0.0
    assert float(token_level_sparsity(ACTIVE[:0])) == 0.0


def test_relu_router_reports_tls_cls_of_its_mask():
    router = build_router("relu", 4, 4, 1, cls_window=2)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x = ACTIVE.float() * torch.tensor([1.0, 2.0, 3.0, 4.0]) - (~ACTIVE).float()  # inactive -> negative
    r = router(x)
    assert torch.equal(r.indices >= 0, ACTIVE)
    assert_close(r.stats["tls"], torch.tensor(0.75))
    assert_close(r.stats["cls2"], torch.tensor(1.75 / 3))
    # weights: gain * relu(a) / rms(relu(a)) on the active experts
    a = torch.relu(x)
    rms = torch.sqrt(a.square().mean(1, keepdim=True) + router.config.eps)
    assert_close(r.weights, a / rms)
    assert r.active_slots().tolist() == [1, 1, 0, 0, 3, 1]


# -- losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (3, 3), (8, 2)])
def test_load_balance_loss_uniform_is_one(E, k):
    T = 2 * E
    probs = torch.full((T, E), 1 / E)
    idx = (torch.arange(T).unsqueeze(1) * k + torch.arange(k)) % E  # round robin: balanced
    assert_close(load_balance_loss(probs, idx, E), torch.tensor(1.0))


def test_load_balance_loss_hand_values():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # f = [1, 0], P = [0.55, 0.45] -> 2 * 0.55
    assert_close(load_balance_loss(probs, torch.tensor([[0], [0]]), 2), torch.tensor(1.1))
    # -1 slots are ignored: f = [0.5, 0.5] -> 2 * (0.5*0.55 + 0.5*0.45) = 1
    assert_close(load_balance_loss(probs, torch.tensor([[0, -1], [1, -1]]), 2), torch.tensor(1.0))
    # all to one expert with a peaked router: E * P_0
    p = torch.tensor([[0.9, 0.05, 0.05]] * 4)
    assert_close(load_balance_loss(p, torch.zeros(4, 1, dtype=torch.long), 3), torch.tensor(2.7))


def test_z_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp rows: ln 2, ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    assert_close(z_loss(logits), torch.tensor(2.5 * math.log(2) ** 2))
    assert float(z_loss(torch.zeros(0, 3))) == 0.0


def test_router_losses_scaled_by_coefficients():
    router = build_router("topk", 4, 3, 1, load_balance_coef=0.5, z_loss_coef=0.25)
    x = torch.randn(5, 4)
    r = router(x)
    logits = x @ router.weight.t()
    probs = logits.softmax(-1)
    assert_close(r.losses["load_balance"], 0.5 * load_balance_loss(probs, r.indices, 3))
    assert_close(r.losses["z"], 0.25 * z_loss(logits))


# -- routing_stats / apply_capacity ----------------------------------------------------------


def test_routing_stats_hand_values():
    idx = torch.tensor([[0, 1], [0, -1], [2, 0]])
    w = torch.tensor([[0.75, 0.25], [1.0, 0.0], [0.5, 0.5]])
    s = routing_stats(idx, 4, weights_TK=w)
    assert s["tokens_per_expert"].tolist() == [3, 1, 1, 0]
    assert_close(s["imbalance"], torch.tensor(3 / 1.25))
    h = lambda *p: -sum(q * math.log(q) for q in p if q > 0)  # noqa: E731
    assert_close(s["entropy"], torch.tensor((h(0.75, 0.25) + 0.0 + h(0.5, 0.5)) / 3))
    assert_close(s["active_per_token"], torch.tensor(5 / 3))
    assert float(s["dropped_fraction"]) == 0.0
    # with probabilities the entropy is theirs
    probs = torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    s2 = routing_stats(idx, 4, probs_TE=probs, weights_TK=w)
    assert_close(s2["entropy"], torch.tensor((math.log(4) + 0 + math.log(2)) / 3))
    # perfectly balanced -> 1; nothing routed -> 0
    assert_close(routing_stats(torch.tensor([[0], [1], [2]]), 3)["imbalance"], torch.tensor(1.0))
    assert float(routing_stats(torch.full((3, 2), -1), 3)["imbalance"]) == 0.0


def test_apply_capacity_hand_example():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, -1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1], [1.0, 0.0]])
    r = Routing(indices=idx, weights=w, num_experts=3)
    out = apply_capacity(r, 2)
    # slot 0 first (tokens in order): e0 <- t0, t1, [t2 dropped]; e1 <- t3; e2 <- t4
    # then slot 1: e1 <- t0 (2nd), [t2 dropped]; e2 <- t1 (2nd); e0 <- [t3 dropped: full]
    assert out.indices.tolist() == [[0, 1], [0, 2], [-1, -1], [1, -1], [2, -1]]
    assert_close(out.weights, torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.0, 0.0], [0.9, 0.0], [1.0, 0.0]]))
    assert_close(out.stats["dropped_fraction"], torch.tensor(3 / 9))
    assert out.stats["tokens_per_expert"].tolist() == [2, 2, 2]
    assert r.indices.tolist()[2] == [0, 1]  # the input is not modified
    # capacity 0 drops everything; a large capacity nothing
    assert bool((apply_capacity(r, 0).indices == -1).all())
    assert float(apply_capacity(r, 0).stats["dropped_fraction"]) == 1.0
    big = apply_capacity(r, 100)
    assert torch.equal(big.indices, idx) and float(big.stats["dropped_fraction"]) == 0.0


@SETTINGS
@given(st.integers(1, 16), st.integers(1, 6), st.integers(1, 6), st.integers(0, 8), st.integers(0, 2**16))
def test_apply_capacity_matches_sequential_oracle(T, E, K, capacity, seed):
    g = torch.Generator().manual_seed(seed)
    K = min(K, E)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[torch.rand(T, K, generator=g) < 0.2] = -1
    w = torch.rand(T, K, generator=g)
    w[idx < 0] = 0
    out = apply_capacity(Routing(indices=idx, weights=w, num_experts=E), capacity)
    fill = [0] * E
    expected = idx.clone()
    dropped = valid = 0
    for j in range(K):
        for t in range(T):
            e = int(idx[t, j])
            if e < 0:
                continue
            valid += 1
            if fill[e] < capacity:
                fill[e] += 1
            else:
                expected[t, j] = -1
                dropped += 1
    assert torch.equal(out.indices, expected)
    assert torch.equal(out.weights, torch.where(expected >= 0, w, torch.zeros_like(w)))
    assert_close(out.stats["dropped_fraction"], torch.tensor(dropped / valid if valid else 0.0))
    assert bool((out.tokens_per_expert() <= capacity).all())


def test_capacity_for_hand_values():
    assert capacity_for(1.0, 10, 2, 4) == 5
    assert capacity_for(1.25, 10, 2, 4) == 7  # ceil(6.25)
    assert capacity_for(0.0, 10, 2, 4) == 1  # at least one
    assert capacity_for(100.0, 10, 2, 4) == 20  # at most T*k
