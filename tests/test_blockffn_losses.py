"""BlockFFN training objectives of the relu router: activation locality, chunk sparsification, the
adaptive λ_cs schedule, the sparsity-target schedule with its warmup, and the load-entropy statistic.

Legend: T tokens, D model dim, E experts, B sequences, S sequence length.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparseroute.kernels import gemm
from sparseroute.moe import MoE, build_router
from sparseroute.moe.losses import activation_locality_loss, chunk_sparsity_loss
from sparseroute.moe.routers.relu import ReLUConfig, chunk_level_sparsity, load_entropy, token_level_sparsity

# -- slow references: python loops over tokens, chunks and experts -------------------------------


def ref_activation_locality(a0_TE, seq_len, alpha):
    T, E = a0_TE.shape
    terms = []
    for i in range(T):
        if i % seq_len == 0:  # first token of a sequence: no predecessor
            continue
        for e in range(E):
            x = alpha * a0_TE[i - 1, e]
            t = torch.sigmoid(alpha * a0_TE[i, e])
            terms.append(-(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x)))
    return torch.stack(terms).mean() if terms else a0_TE.sum() * 0


def ref_chunk_sparsity(act_TE, seq_len, chunk, eps=1e-5):
    T, E = act_TE.shape
    values = []
    for b in range(T // seq_len):
        for c0 in range(0, seq_len, chunk):
            tokens = range(b * seq_len + c0, b * seq_len + min(c0 + chunk, seq_len))
            for e in range(E):
                keep = torch.ones((), dtype=act_TE.dtype)
                for i in tokens:
                    p = act_TE[i, e] / (act_TE[i].sum() + eps)
                    keep = keep * (1 - p + eps)
                values.append(1 - keep)
    return torch.stack(values).mean()


def _scores(T, E, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(T, E, generator=g, dtype=torch.float64) * scale
    a0[::5] = -a0[::5].abs()  # some tokens with no active expert
    return a0.requires_grad_()


# -- activation locality ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,S,E,alpha,scale",
    [(12, 12, 3, 100.0, 0.02), (12, 4, 4, 100.0, 0.02), (10, 5, 2, 3.0, 1.0), (6, 1, 3, 100.0, 1.0),
     (9, 3, 5, 100.0, 1.0), (2, 2, 1, 7.0, 1.0)],
)
def test_activation_locality_matches_reference(T, S, E, alpha, scale):
    a0 = _scores(T, E, seed=T * 31 + S, scale=scale)
    got = activation_locality_loss(a0, S, alpha)
    want = ref_activation_locality(a0, S, alpha)
    assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, a0)
    (g_want,) = torch.autograd.grad(want, a0)
    assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_activation_locality_target_is_not_detached():
    # loss = softplus(α·prev) - α·prev · σ(α·cur): d/d(cur) = -α·prev · α·σ'(α·cur) = -1 · 100 · 0.25
    a0 = torch.tensor([[0.01], [0.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(activation_locality_loss(a0, 2, 100.0), a0)
    assert_close(g[1, 0], torch.tensor(-25.0, dtype=torch.float64))
    assert_close(g[0, 0], torch.tensor(100.0 * (torch.sigmoid(torch.tensor(1.0)).item() - 0.5), dtype=torch.float64))


def test_activation_locality_has_no_cross_sequence_pairs():
    S = 4
    a0 = _scores(3 * S, 3, seed=5, scale=0.02)

    def grads(x, seq_len):
        x = x.detach().requires_grad_()
        return torch.autograd.grad(activation_locality_loss(x, seq_len, 100.0), x)[0]

    changed_last = a0.detach().clone()
    changed_last[S - 1] += 0.05  # last token of sequence 1
    changed_first = a0.detach().clone()
    changed_first[S] -= 0.05  # first token of sequence 2
    base = grads(a0, S)
    # the first token of sequence 2 only pairs with its successor; the last of sequence 1 only
    # with its predecessor
    assert torch.equal(grads(changed_last, S)[S], base[S])
    assert torch.equal(grads(changed_first, S)[S - 1], base[S - 1])
    # and the loss is the mean of the per-sequence losses
    per_seq = torch.stack([activation_locality_loss(a0[b * S:(b + 1) * S], S, 100.0) for b in range(3)])
    assert_close(activation_locality_loss(a0, S, 100.0), per_seq.mean(), rtol=1e-12, atol=0)
    # a test that can fail: treated as one sequence, the boundary pair couples them
    whole = grads(a0, 3 * S)
    assert not torch.equal(grads(changed_last, 3 * S)[S], whole[S])


def test_activation_locality_degenerate():
    a0 = torch.randn(5, 3, requires_grad=True)
    zero = activation_locality_loss(a0, 1, 100.0)
    assert float(zero.detach()) == 0.0 and zero.requires_grad
    assert float(activation_locality_loss(torch.zeros(0, 3), 1)) == 0.0
    with pytest.raises(ValueError, match="seq_len"):
        activation_locality_loss(a0, 2)


# -- chunk sparsification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,S,E,chunk",
    [(16, 16, 3, 4), (24, 12, 4, 5), (30, 10, 3, 4), (12, 3, 4, 8), (8, 8, 2, 1), (6, 6, 3, 6), (4, 1, 3, 2)],
)
def test_chunk_sparsity_matches_reference(T, S, E, chunk):
    a0 = _scores(T, E, seed=T * 7 + chunk)
    act = torch.relu(a0)
    got = chunk_sparsity_loss(act, S, chunk)
    want = ref_chunk_sparsity(act, S, chunk)
    assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, a0, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, a0)
    assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)


def test_chunk_sparsity_includes_the_trailing_partial_chunk_of_each_sequence():
    S, chunk = 10, 4  # chunks of 4, 4, 2 tokens per sequence
    act = torch.relu(_scores(2 * S, 3, seed=11)).detach()
    base = chunk_sparsity_loss(act, S, chunk)
    for i in (8, 9, 18, 19):  # tokens of the partial chunks
        moved = act.clone()
        moved[i] = torch.tensor([5.0, 0.0, 0.0], dtype=act.dtype) if act[i, 0] == 0 else torch.tensor(
            [0.0, 0.0, 5.0], dtype=act.dtype)
        assert float(chunk_sparsity_loss(moved, S, chunk)) != float(base)
    # 6 chunks x 3 experts; the partial chunks are averaged with the same weight as the full ones
    assert_close(base, ref_chunk_sparsity(act, S, chunk), rtol=1e-10, atol=0)
    # chunks do not cross sequences: as one 20-token sequence the chunking differs
    assert float(chunk_sparsity_loss(act, 2 * S, chunk)) != float(base)


def test_chunk_sparsity_hand_values():
    # one expert per token, the same expert all chunk: P = 1 for it, ~0 for the others
    one_hot = torch.zeros(4, 2, dtype=torch.float64)
    one_hot[:, 0] = 3.0
    p = 3.0 / (3.0 + 1e-5)
    want = ((1 - (1 - p + 1e-5) ** 4) + (1 - (1 + 1e-5) ** 4)) / 2
    assert_close(chunk_sparsity_loss(one_hot, 4, 4), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # no active expert anywhere: p = 0 (no division by zero), loss = 1 - (1 + eps)^L < 0 slightly
    zeros = torch.zeros(4, 2, requires_grad=True)
    loss = chunk_sparsity_loss(zeros, 4, 2)
    assert torch.isfinite(loss) and abs(float(loss.detach())) < 1e-4
    assert torch.isfinite(torch.autograd.grad(loss, zeros)[0]).all()
    with pytest.raises(ValueError, match="chunk"):
        chunk_sparsity_loss(zeros, 4, 0)


def test_cls_windows_lie_inside_sequences():
    active = torch.zeros(6, 2, dtype=torch.bool)
    active[0, 0] = active[3, 1] = True  # sequences of 3: windows of 2 -> tokens (0,1) and (3,4)
    assert_close(chunk_level_sparsity(active, 2, seq_len=3), torch.tensor(0.5))
    # as one sequence the windows are (0,1), (2,3), (4,5): 1/2, 1/2, 1 idle
    assert_close(chunk_level_sparsity(active, 2), torch.tensor(2 / 3))
    assert float(chunk_level_sparsity(active, 4, seq_len=3)) == 0.0


# -- the router ------------------------------------------------------------------------------------

D, E = 8, 4


def _old_relu_routing(router, x_TD):
    """What the relu router computed before the training objectives existed."""
    a0 = gemm.linear(x_TD, router.weight).float()  # the router's own product
    a1 = torch.relu(a0)
    rms = torch.sqrt(a1.square().mean(dim=-1, keepdim=True) + router.config.eps)
    a = router.gain.float() * a1 / rms
    active = a != 0
    idx = torch.where(active, torch.arange(E).expand_as(active), torch.full_like(active, -1, dtype=torch.long))
    return idx, torch.where(active, a, torch.zeros_like(a)), active


@pytest.mark.parametrize("z_loss_coef", [0.0, 0.1])
def test_coefficients_zero_leave_the_router_unchanged(z_loss_coef):
    torch.manual_seed(0)
    plain = build_router("relu", D, E, 1, z_loss_coef=z_loss_coef, cls_window=4)
    off = build_router("relu", D, E, 1, z_loss_coef=z_loss_coef, cls_window=4, al_coef=0.0, cs_coef=0.0,
                       al_alpha=3.0, cs_chunk=5, cs_max_factor=9.0)
    off.load_state_dict(plain.state_dict())
    assert set(plain.state_dict()) == {"weight", "gain"}
    x = torch.randn(24, D)
    idx, w, active = _old_relu_routing(plain, x)
    for r in (plain(x), plain.train()(x), off(x), off(x, seq_len=8)):
        assert torch.equal(r.indices, idx) and torch.equal(r.weights, w)
        assert set(r.losses) == ({"z"} if z_loss_coef else set())
        assert set(r.stats) == {"tokens_per_expert", "imbalance", "entropy", "dropped_fraction",
                                "active_per_token", "tls", "cls4", "load_entropy"}
        assert_close(r.stats["tls"], token_level_sparsity(active))
    assert_close(plain(x).stats["cls4"], chunk_level_sparsity(active, 4))
    # through the layer: same output, same (empty) losses
    torch.manual_seed(1)
    m1 = MoE(D, 16, E, 1, router="relu", dispatch="reference")
    m2 = MoE(D, 16, E, 1, router="relu", router_options={"al_coef": 0.0, "cs_coef": 0.0}, dispatch="reference")
    m2.load_state_dict(m1.state_dict())
    xb = torch.randn(3, 8, D)
    (y1, r1), (y2, r2) = m1(xb), m2(xb)
    assert torch.equal(y1, y2) and r1.losses == {} and r2.losses == {}


def test_losses_in_routing_are_scaled_and_sequence_aware():
    torch.manual_seed(2)
    m = MoE(D, 16, E, 1, router="relu", router_options={"al_coef": 2e-3, "cs_coef": 5e-2, "cs_chunk": 3},
            dispatch="reference")
    x = torch.randn(2, 7, D)  # S = 7: the chunk of 3 leaves a partial one per sequence
    _, r = m(x)
    router = m.router
    a0 = F.linear(x.reshape(-1, D), router.weight).float()
    a1 = torch.relu(a0)
    rms = torch.sqrt(a1.square().mean(dim=-1, keepdim=True) + router.config.eps)
    assert_close(r.losses["activation_locality"], 2e-3 * activation_locality_loss(a0, 7, 100.0))
    assert_close(r.losses["chunk_sparsity"], 5e-2 * chunk_sparsity_loss(a1 / rms, 7, 3))
    assert r.losses["chunk_sparsity"].requires_grad and r.losses["activation_locality"].requires_grad
    # as one 14-token sequence the values differ: the layer really passes S
    one_sequence = 2e-3 * activation_locality_loss(a0.detach(), 14, 100.0)
    assert float(r.losses["activation_locality"].detach()) != float(one_sequence)
    assert float(r.stats["cs_coef"]) == pytest.approx(5e-2)


def _imitation_step(m, teacher, opt, x):
    """One optimizer step of ``m`` imitating ``teacher`` on ``x`` (MSE plus the routing losses),
    with the router's after-step hook; returns the step's Routing."""
    with torch.no_grad():
        y = teacher(x)
    out, r = m(x)
    loss = F.mse_loss(out, y) + sum(r.losses.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    m.after_optimizer_step()
    return r


def _toy_sparsity(cs_coef, seed, steps=40):
    """Train a relu-router MoE to imitate a fixed random MLP on sequences made of 8-token runs of
    nearby tokens (so a chunk could share experts); return CLS_8, TLS and L_cs on held-out data.
    Feature 0 is a constant 2, an effective router bias: without one a linear router on
    zero-mean inputs can hardly switch experts off, whatever the loss asks."""
    torch.manual_seed(seed)
    B, S, Dm, Em = 8, 32, 16, 8
    teacher = torch.nn.Sequential(torch.nn.Linear(Dm, 32), torch.nn.Tanh(), torch.nn.Linear(32, Dm))
    m = MoE(Dm, 16, Em, 1, router="relu", activation="silu",
            router_options={"cs_coef": cs_coef, "cs_chunk": 8, "cls_window": 8})
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)

    def batch(g):
        centres = torch.randn(B, S // 8, 1, Dm, generator=g).expand(B, S // 8, 8, Dm).reshape(B, S, Dm)
        x = centres + 0.3 * torch.randn(B, S, Dm, generator=g)
        x[..., 0] = 2.0
        return x

    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        _imitation_step(m, teacher, opt, batch(g))
    m.eval()
    with torch.no_grad():
        x_TD = batch(torch.Generator().manual_seed(999)).reshape(-1, Dm)
        r = m.router(x_TD, seq_len=S)
        a1 = torch.relu(F.linear(x_TD, m.router.weight))
        l_cs = chunk_sparsity_loss(a1, S, 8)  # p is scale-invariant: the RMS factor does not matter
    return float(r.stats["cls8"]), float(r.stats["tls"]), float(l_cs)


@pytest.mark.parametrize("seed", [0, 1])
def test_chunk_sparsity_loss_raises_chunk_level_sparsity(seed):
    # measured over seeds 0-7: CLS_8 rises by 0.32-0.45 (from 0.28-0.52)
    cls0, tls0, l0 = _toy_sparsity(0.0, seed)
    cls1, tls1, l1 = _toy_sparsity(2.0, seed)
    assert cls1 > cls0 + 0.15, (cls0, cls1)
    assert tls1 > tls0 and l1 < l0 - 0.05, (tls0, tls1, l0, l1)


# -- the adaptive λ_cs schedule --------------------------------------------------------------------

SCHED = dict(cs_coef=0.1, cs_adaptive=True, cs_adapt_every=5, cs_adapt_after=10, cs_max_factor=4.0,
             cs_min_ratio=1.025)
# per step L_cs, one window (5 steps) per value: ratios 1 (no change), 1.01 (-> 1.025), 0.5,
# 10 (capped at 4x), 2 (already at the cap), 0.9
WINDOWS = [1.0, 1.0, 1.01, 0.505, 5.05, 10.1, 9.09, 9.09]


def reference_lambdas(losses, lam0, every, after, max_factor, min_ratio, ramp=True):
    """λ used by the forwards of steps 1..n, written from the rule: at step u (a multiple of
    every, u >= after, with a full previous window) r = mean(L[u-every+1..u]) / mean(L[u-2every+1..
    u-every]); r >= min_ratio if r > 1; λ_u·r <= max_factor·λ0; λ goes linearly to λ_u·r by u+every."""
    lam = [lam0]  # lam[n-1]: λ of step n
    target, start, start_lam = lam0, 0, lam0
    for u in range(1, len(losses) + 1):
        if u % every == 0 and u >= after and u >= 2 * every:
            cur = sum(losses[u - every:u]) / every
            prev = sum(losses[u - 2 * every:u - every]) / every
            r = cur / prev
            if r > 1:
                r = max(r, min_ratio)
            r = min(r, max_factor * lam0 / lam[u - 1])
            start, start_lam, target = u, lam[u - 1], lam[u - 1] * r
        k = (u + 1 - start) / every if ramp else 1.0
        lam.append(start_lam + (target - start_lam) * min(1.0, k))
    return lam[:-1]


def _drive(router, losses, record=None):
    out = []
    for L in losses:
        out.append(float(router.cs_coef_now))
        router.record_chunk_sparsity(torch.tensor(L * 0.5, dtype=torch.float64))  # two forwards per step: mean L
        router.record_chunk_sparsity(torch.tensor(L * 1.5, dtype=torch.float64))
        router.after_optimizer_step()
    return out


@pytest.mark.parametrize("ramp", [True, False])
def test_adaptive_schedule_follows_the_rule(ramp):
    losses = [v for v in WINDOWS for _ in range(5)]
    router = build_router("relu", D, E, 1, cs_adapt_ramp=ramp, **SCHED)
    got = _drive(router, losses)
    want = reference_lambdas(losses, 0.1, 5, 10, 4.0, 1.025, ramp)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    lam = lambda step: got[step - 1]  # noqa: E731  (λ of the forwards of a step)
    # hand values at the window ends (λ reaches λ_u·r exactly at u + every)
    assert lam(11) == pytest.approx(0.1)  # ratio 1: unchanged
    assert lam(20) == pytest.approx(0.1 * 1.025)  # ratio 1.01 raised to 1.025
    assert lam(25) == pytest.approx(0.1 * 1.025 * 0.5)  # ratio 0.5
    assert lam(30) == pytest.approx(0.4)  # ratio 10, capped at 4 x 0.1
    assert lam(35) == pytest.approx(0.4)  # ratio 2 but already at the cap
    assert lam(40) == pytest.approx(0.36)  # ratio 0.9
    assert max(got) <= 0.4 + 1e-15
    if ramp:
        assert lam(16) == pytest.approx(0.1 + 0.1 * 0.025 / 5)  # one fifth of the way
    else:
        assert lam(16) == pytest.approx(0.1 * 1.025)


def test_adaptive_schedule_survives_a_state_dict_round_trip():
    losses = [v * (1 + 0.01 * i) for i, v in enumerate(v for v in WINDOWS for _ in range(5))]
    want = _drive(build_router("relu", D, E, 1, **SCHED), losses)
    first = build_router("relu", D, E, 1, **SCHED)
    head = _drive(first, losses[:17])
    lam18 = float(first.cs_coef_now)
    first.record_chunk_sparsity(torch.tensor(losses[17] * 0.5, dtype=torch.float64))  # mid-step: one forward counted
    resumed = build_router("relu", D, E, 1, **SCHED)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert int(resumed.cs_step) == 17
    resumed.record_chunk_sparsity(torch.tensor(losses[17] * 1.5, dtype=torch.float64))  # the step's second forward
    resumed.after_optimizer_step()
    tail = _drive(resumed, losses[18:])
    assert head + [lam18] + tail == want  # exactly
    assert len(set(want)) > 10  # the schedule did move


def test_schedule_state_is_float64_buffers_and_records_only_training_forwards():
    router = build_router("relu", D, E, 1, **SCHED)
    assert {"cs_coef_now", "cs_ramp", "cs_step", "cs_pending", "cs_window"} <= set(router.state_dict())
    router.to(torch.bfloat16)
    assert router.cs_coef_now.dtype == torch.float64 and router.weight.dtype == torch.bfloat16
    router.float()
    x = torch.randn(16, D)
    router.eval()(x)
    assert float(router.cs_pending[1]) == 0
    r = router.train()(x, seq_len=8)
    assert float(router.cs_pending[1]) == 1
    assert float(router.cs_pending[0]) == pytest.approx(float(r.losses["chunk_sparsity"].detach()) / 0.1)
    plain = build_router("relu", D, E, 1, cs_coef=0.1)
    plain.after_optimizer_step()  # a no-op without cs_adaptive
    assert "cs_step" not in plain.state_dict()


# -- config validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("al_coef", -1e-3), ("al_coef", float("nan")), ("al_coef", float("inf")), ("al_alpha", 0.0),
     ("al_alpha", -1.0), ("cs_coef", -0.1), ("cs_coef", "0.1"), ("cs_chunk", 0), ("cs_chunk", 2.0),
     ("cs_chunk", True), ("cs_adapt_every", 0), ("cs_adapt_after", -1), ("cs_max_factor", 0.5),
     ("cs_max_factor", float("nan")), ("cs_min_ratio", 0.99), ("cs_adaptive", 1), ("cs_adapt_ramp", "yes"),
     ("cs_target", 0.0), ("cs_target", 1.0), ("cs_target", 1.5), ("cs_target", "0.75"), ("cs_target", True),
     ("cs_target", float("nan")), ("cs_target_stat", "cls8"), ("cs_target_stat", None), ("cs_target_rate", 1.0),
     ("cs_target_rate", 0.5), ("cs_target_rate", float("inf")), ("cs_min_factor", -0.1), ("cs_min_factor", 1.5),
     ("cs_warmup_steps", -1), ("cs_warmup_steps", 2.5), ("cs_warmup_steps", True)],
)
def test_bad_objective_options_name_the_field(field, value):
    options = {"cs_coef": 0.1, field: value}
    with pytest.raises(ValueError, match=field):
        ReLUConfig(**options)
    with pytest.raises(ValueError, match=field):
        MoE(D, 16, E, 1, router="relu", router_options=options)


def test_adaptive_needs_a_coefficient():
    with pytest.raises(ValueError, match="cs_coef"):
        ReLUConfig(cs_adaptive=True)


def test_target_and_warmup_need_a_coefficient_and_exclude_the_loss_ratio_rule():
    with pytest.raises(ValueError, match="cs_target needs cs_coef"):
        ReLUConfig(cs_target=0.75)
    with pytest.raises(ValueError, match="cs_warmup_steps needs cs_coef"):
        ReLUConfig(cs_warmup_steps=10)
    with pytest.raises(ValueError, match="cs_target and cs_adaptive"):
        ReLUConfig(cs_coef=0.1, cs_target=0.75, cs_adaptive=True)
    with pytest.raises(ValueError, match="cs_target"):
        MoE(D, 16, E, 1, router="relu", router_options={"cs_coef": 0.1, "cs_target": 0.75, "cs_adaptive": True})
    with pytest.raises(ValueError, match="unknown option.*cs_targets"):
        build_router("relu", D, E, 1, cs_coef=0.1, cs_targets=0.75)


# -- warmup of λ_cs --------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"cs_adaptive": True, "cs_adapt_every": 2, "cs_adapt_after": 0},
                                   {"cs_target": 0.9, "cs_adapt_every": 2, "cs_adapt_after": 0}])
def test_warmup_ramps_the_coefficient_linearly_from_zero(extra):
    W = 4
    torch.manual_seed(3)
    router = build_router("relu", D, E, 1, cs_coef=0.1, cs_warmup_steps=W, **extra).train()
    x = torch.randn(16, D)
    got = []
    for _ in range(W + 3):
        r = router(x, seq_len=8)
        got.append(float(r.stats["cs_coef"]))
        a1 = torch.relu(F.linear(x, router.weight)).detach()
        rms = torch.sqrt(a1.square().mean(dim=-1, keepdim=True) + router.config.eps)
        l_cs = chunk_sparsity_loss(a1 / rms, 8, router.config.cs_chunk)
        assert_close(r.losses["chunk_sparsity"].detach(), got[-1] * l_cs, rtol=1e-5, atol=1e-9)
        router.after_optimizer_step()
    # step n uses (n - 1) / W of λ: 0 at step 1, the full λ from step W + 1; no adaptation before
    # step W (the stat is float32)
    assert got[:W] == pytest.approx([0.1 * k / W for k in range(W)], rel=1e-6, abs=0)
    assert got[0] == 0.0
    if not extra:
        assert got[W:] == pytest.approx([0.1] * 3, rel=1e-6)
    else:  # adapted from step W on: the ramp then moves from the full λ
        assert 0.1 * 0.9 < got[W] < 0.1 * 1.3
    # eval forwards see the same coefficient and record nothing
    router.eval()
    pending = router.cs_pending.clone()
    assert float(router(x, seq_len=8).stats["cs_coef"]) == pytest.approx(float(router.cs_coef_now))
    assert torch.equal(router.cs_pending, pending)


def test_no_warmup_keeps_the_fixed_coefficient_stateless():
    router = build_router("relu", D, E, 1, cs_coef=0.1, cs_warmup_steps=0)
    assert set(router.state_dict()) == {"weight", "gain"}
    r = router(torch.randn(8, D))
    assert float(r.stats["cs_coef"]) == pytest.approx(0.1)


# -- the sparsity-target schedule ------------------------------------------------------------------

TARGET = dict(cs_coef=0.1, cs_target=0.75, cs_adapt_every=5, cs_adapt_after=10, cs_target_rate=1.5,
              cs_max_factor=4.0, cs_min_factor=0.25)


def reference_target_lambdas(sparsity, lam0, every, after, target, rate, lo, hi, warmup=0, ramp=True):
    """λ_n (before warmup) of the forwards of steps 1..n, written from the rule: at step u (a
    multiple of every, u >= after, u >= warmup) with s = mean(sparsity[u-every+1..u]): r = rate
    below the target, 1/rate above; λ_u·r clamped to [lo·λ0, hi·λ0]; λ goes linearly to λ_u·r
    by u + every."""
    lam = [lam0]
    target_lam, start, start_lam = lam0, 0, lam0
    for u in range(1, len(sparsity) + 1):
        if u % every == 0 and u >= after and u >= warmup:
            s = sum(sparsity[u - every:u]) / every
            r = rate if s < target else 1 / rate if s > target else 1.0
            new = min(max(lam[u - 1] * r, lo * lam0), hi * lam0)
            start, start_lam, target_lam = u, lam[u - 1], new
        k = (u + 1 - start) / every if ramp else 1.0
        lam.append(start_lam + (target_lam - start_lam) * min(1.0, k))
    return lam[:-1]


def _drive_sparsity(router, values):
    out = []
    for s in values:
        out.append(float(router.cs_coef_now))
        router.record_sparsity(torch.tensor(s - 0.01, dtype=torch.float64))  # two forwards per step: mean s
        router.record_sparsity(torch.tensor(s + 0.01, dtype=torch.float64))
        router.after_optimizer_step()
    return out


# per window of 5 steps: too dense (x1.5) four times -> capped at 4x, then too sparse (/1.5) until the
# floor of 0.25x, then exactly on target (unchanged)
TARGET_WINDOWS = [0.5, 0.6, 0.7, 0.74, 0.7, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.75, 0.75]


@pytest.mark.parametrize("ramp", [True, False])
def test_target_schedule_follows_the_rule_and_stays_in_bounds(ramp):
    values = [v for v in TARGET_WINDOWS for _ in range(5)]
    router = build_router("relu", D, E, 1, cs_adapt_ramp=ramp, **TARGET)
    got = _drive_sparsity(router, values)
    want = reference_target_lambdas(values, 0.1, 5, 10, 0.75, 1.5, 0.25, 4.0, ramp=ramp)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    lam = lambda step: got[step - 1]  # noqa: E731
    assert lam(10) == pytest.approx(0.1)  # nothing before cs_adapt_after
    assert lam(15) == pytest.approx(0.15)  # window 6..10 too dense: up by 1.5
    assert lam(20) == pytest.approx(0.225)
    assert lam(25) == pytest.approx(0.3375)
    assert lam(30) == pytest.approx(0.4)  # 0.50625 capped at cs_max_factor x 0.1
    assert lam(35) == pytest.approx(0.4 / 1.5)  # window 26..30 too sparse: down
    assert min(got) == pytest.approx(0.025) and lam(70) == pytest.approx(0.025)  # the floor 0.25 x 0.1
    assert lam(75) == pytest.approx(0.025)  # on target: unchanged
    assert 0.025 - 1e-15 <= min(got) and max(got) <= 0.4 + 1e-15
    # the direction: λ never falls while too dense, never rises while too sparse
    for u in range(15, 75, 5):
        s = sum(values[u - 5:u]) / 5
        assert (got[u + 4] >= got[u - 1]) if s < 0.75 else (got[u + 4] <= got[u - 1])


def test_target_schedule_waits_for_the_warmup():
    values = [0.1] * 30  # far too dense all along
    router = build_router("relu", D, E, 1, **{**TARGET, "cs_adapt_after": 0, "cs_warmup_steps": 12})
    got = _drive_sparsity(router, values)
    want = reference_target_lambdas(values, 0.1, 5, 0, 0.75, 1.5, 0.25, 4.0, warmup=12)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[:15] == [0.1] * 15  # the first adaptation is at step 15 (the first multiple of 5 >= 12)
    assert got[15] == pytest.approx(0.11) and got[19] == pytest.approx(0.15)


@pytest.mark.parametrize("stat", ["tls", "cls"])
def test_target_records_the_measured_sparsity_of_training_forwards(stat):
    torch.manual_seed(4)
    router = build_router("relu", D, E, 1, cs_coef=0.1, cs_target=0.5, cs_target_stat=stat, cls_window=2)
    x1, x2 = torch.randn(16, D), torch.randn(16, D)
    router.eval()(x1, seq_len=8)
    assert float(router.cs_pending[1]) == 0
    router.train()
    r1, r2 = router(x1, seq_len=8), router(x2, seq_len=8)
    key = "tls" if stat == "tls" else "cls2"
    assert router.cs_pending.tolist() == pytest.approx([float(r1.stats[key]) + float(r2.stats[key]), 2.0])
    router.after_optimizer_step()
    assert router.cs_window[1].tolist() == pytest.approx([(float(r1.stats[key]) + float(r2.stats[key])) / 2, 1.0])


def test_target_schedule_survives_a_state_dict_round_trip():
    values = [v + 0.003 * i for i, v in enumerate(v for v in TARGET_WINDOWS for _ in range(5))]
    options = {**TARGET, "cs_warmup_steps": 7, "cs_adapt_after": 5}
    want = _drive_sparsity(build_router("relu", D, E, 1, **options), values)
    first = build_router("relu", D, E, 1, **options)
    head = _drive_sparsity(first, values[:23])
    lam24 = float(first.cs_coef_now)
    first.record_sparsity(torch.tensor(values[23] - 0.01, dtype=torch.float64))  # mid-step
    resumed = build_router("relu", D, E, 1, **options)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for name in ("cs_coef_now", "cs_ramp", "cs_step", "cs_pending", "cs_window"):
        assert torch.equal(getattr(resumed, name), getattr(first, name)), name
    resumed.record_sparsity(torch.tensor(values[23] + 0.01, dtype=torch.float64))
    resumed.after_optimizer_step()
    tail = _drive_sparsity(resumed, values[24:])
    assert head + [lam24] + tail == want  # exactly
    assert len(set(want)) > 8
    # and the warmup factor of the forwards resumes too
    x = torch.randn(8, D)
    fresh = build_router("relu", D, E, 1, **options)
    fresh.load_state_dict(copy.deepcopy(first.state_dict()))
    assert torch.equal(fresh.eval()(x).stats["cs_coef"], first.eval()(x).stats["cs_coef"])


def test_target_pushes_sparsity_towards_it_in_training():
    """End to end on the toy task of :func:`_toy_sparsity`: a target above the plain router's TLS
    raises λ and TLS, a target below it lowers λ."""
    def run(target):
        torch.manual_seed(0)
        Dm, Em, B, S = 16, 8, 4, 32
        m = MoE(Dm, 16, Em, 1, router="relu", activation="silu",
                router_options={"cs_coef": 0.5, "cs_target": target, "cs_adapt_every": 2, "cs_adapt_after": 0,
                                "cs_target_rate": 1.5, "cs_chunk": 8, "cs_max_factor": 8.0})
        teacher = torch.nn.Sequential(torch.nn.Linear(Dm, 32), torch.nn.Tanh(), torch.nn.Linear(32, Dm))
        opt = torch.optim.Adam(m.parameters(), lr=3e-2)
        g = torch.Generator().manual_seed(1)
        tls = []
        for _ in range(30):
            x = torch.randn(B, S, Dm, generator=g)
            x[..., 0] = 2.0
            tls.append(float(_imitation_step(m, teacher, opt, x).stats["tls"]))
        return float(m.router.cs_coef_now), sum(tls[-6:]) / 6

    lam_hi, tls_hi = run(0.95)
    lam_lo, tls_lo = run(0.05)
    assert lam_hi > 0.5 and lam_lo < 0.5, (lam_hi, lam_lo)
    assert tls_hi > tls_lo, (tls_hi, tls_lo)


# -- load entropy ----------------------------------------------------------------------------------


def test_load_entropy_hand_values():
    assert float(load_entropy(torch.tensor([5, 5, 5, 5]))) == pytest.approx(1.0)
    assert float(load_entropy(torch.tensor([0, 12, 0, 0]))) == 0.0
    assert float(load_entropy(torch.tensor([3, 3, 0, 0]))) == pytest.approx(0.5)  # log 2 / log 4
    load = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    p = [0.1, 0.2, 0.3, 0.4]
    want = -sum(q * math.log(q) for q in p) / math.log(5)
    assert float(load_entropy(load)) == pytest.approx(want, rel=1e-6)
    assert float(load_entropy(torch.zeros(4))) == 0.0  # nothing routed
    assert float(load_entropy(torch.tensor([7]))) == 0.0  # one expert: no spread


def _one_hot_router():
    """A relu router whose score for expert e is feature e: token e_i activates expert i alone."""
    router = build_router("relu", E, E, 1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


def test_load_entropy_of_a_constructed_routing():
    router = _one_hot_router()
    uniform = torch.eye(E).repeat(3, 1)  # 12 tokens, 3 per expert
    r = router(uniform)
    assert r.stats["tokens_per_expert"].tolist() == [3] * E
    assert float(r.stats["load_entropy"]) == pytest.approx(1.0)
    collapsed = torch.zeros(12, E)
    collapsed[:, 2] = 1.0  # every token on expert 2
    r = router(collapsed)
    assert float(r.stats["load_entropy"]) == 0.0
    assert float(r.stats["tls"]) == pytest.approx(0.75) and float(r.stats[f"cls{router.config.cls_window}"]) == 0.75
    mixed = torch.cat([torch.eye(E)[[0, 0, 0, 1]], torch.tensor([[1.0, 1.0, 0.0, 0.0]])])  # loads 4, 2, 0, 0
    r = router(mixed)
    assert r.stats["tokens_per_expert"].tolist() == [4, 2, 0, 0]
    want = -(4 / 6 * math.log(4 / 6) + 2 / 6 * math.log(2 / 6)) / math.log(E)
    assert float(r.stats["load_entropy"]) == pytest.approx(want, rel=1e-6)
