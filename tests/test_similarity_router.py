"""Similarity-aware router (Graph of Tokens design), attention_mixed_probs and routing_fluctuation.

Legend: T tokens, D model dim, E experts, K slots, N sequences, S sequence length.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparseroute.moe import MoE, build_router
from sparseroute.moe.routers.base import topk_of
from sparseroute.moe.routers.similarity import SimilarityConfig, attention_mixed_probs
from sparseroute.routing import routing_fluctuation


def _router(D=8, E=6, k=2, seed=0, **options):
    torch.manual_seed(seed)
    return build_router("similarity", D, E, k, **options)


def _x(T, D, seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed)) * 2


def _plain(router, x_TD):
    """Plain softmax top-k routing of the router's own logits."""
    probs_TE = (x_TD @ router.weight.t()).softmax(-1)
    return topk_of(probs_TE, router.top_k, router.renormalize())


def _features(router, x_TD):
    f = x_TD @ router.weight.t() if router.proj is None else x_TD @ router.proj.t()
    return F.normalize(f, dim=-1)


def _loop_reference(router, x_TD, seq_len):
    """a_ij, p~ and p^ by explicit loops over sequences, i and j <= i."""
    cfg = router.config
    p_TE = (x_TD @ router.weight.t()).softmax(-1)
    f = _features(router, x_TD)
    rows = []
    for start in range(0, x_TD.shape[0], seq_len):
        for i in range(start, start + seq_len):
            scores = torch.stack([torch.dot(f[i], f[j]) / cfg.temperature for j in range(start, i + 1)])
            a = scores.softmax(0)
            mixed = sum(a[n] * p_TE[start + n] for n in range(i - start + 1))
            rows.append((1 - cfg.mix) * p_TE[i] + cfg.mix * mixed)
    mixed_TE = torch.stack(rows)
    return topk_of(mixed_TE, router.top_k, router.renormalize()), mixed_TE


# -- reduces to plain routing --------------------------------------------------------------


@pytest.mark.parametrize("features,E", [("projection", 6), ("logits", 8)])
@pytest.mark.parametrize("k", [1, 2])
def test_zero_temperature_is_plain_routing(features, E, k):
    D, S = 8, 8
    router = _router(D, E, k, features=features, temperature=1e-4)
    x = _x(3 * S, D)
    # precondition: no near-duplicate tokens (off-diagonal cosines well below 1)
    with torch.no_grad():
        f = _features(router, x).reshape(3, S, -1)
    cos = f @ f.transpose(1, 2) - 2 * torch.eye(S)
    assert float(cos.max()) < 0.99
    r = router(x, seq_len=S)
    idx, w = _plain(router, x)
    assert torch.equal(r.indices, idx)
    assert_close(r.weights, w, atol=1e-6, rtol=1e-5)


def test_mix_zero_is_plain_routing_exactly():
    router = _router(mix=0.0, temperature=1.0)
    x = _x(12, 8)
    r = router(x, seq_len=4)
    topk = build_router("topk", 8, 6, 2)
    with torch.no_grad():
        topk.weight.copy_(router.weight)
    r_plain = topk(x)
    assert torch.equal(r.indices, r_plain.indices)
    assert torch.equal(r.weights, r_plain.weights)
    assert_close(r.stats["selection_entropy"], r.stats["base_entropy"], rtol=0, atol=0)


def test_duplicate_tokens_keep_plain_routing_at_small_temperature():
    """Exact duplicates share a_ij at tau -> 0, but they have the same p, so routing is plain."""
    router = _router(temperature=1e-4)
    x = _x(6, 8)
    x = torch.cat([x[:3], x[:1], x[3:5]])  # token 3 duplicates token 0
    r = router(x, seq_len=6)
    idx, w = _plain(router, x)
    assert torch.equal(r.indices, idx)
    assert_close(r.weights, w, atol=1e-6, rtol=1e-5)


# -- the mixing really happens and matches a loop reference ---------------------------------


def test_mixed_rows_sum_to_one_and_differ_from_plain():
    router = _router(temperature=0.5, mix=1.0)
    x = _x(16, 8)
    _, p, mixed = router.mixed_probs(x, 8)
    assert_close(mixed.sum(-1), torch.ones(16))
    assert bool((mixed >= 0).all())
    assert_close(mixed[0], p[0])  # the first token of a sequence has only itself
    assert_close(mixed[8], p[8])
    assert (mixed[1:8] - p[1:8]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.5, "mix": 0.7},
        {"temperature": 0.3, "mix": 1.0, "features": "logits"},
        {"temperature": 2.0, "mix": 0.4, "d_feat": 3},
    ],
)
@pytest.mark.parametrize("k", [1, 3])
def test_matches_loop_reference_values_and_gradients(options, k):
    D, E, S, N = 5, 6, 4, 3
    router = _router(D, E, k, **options)  # the router computes in fp32 (its logits are .float())
    x0 = _x(N * S, D)
    g = torch.randn(N * S, k, generator=torch.Generator().manual_seed(7))

    def grads(fn):
        router.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        idx, w = fn(x)
        (w * g).sum().backward()
        out = {"x": x.grad}
        for name, prm in router.named_parameters():
            out[name] = prm.grad
        return idx, w.detach(), out

    def fast(x):
        r = router(x, seq_len=S)
        return r.indices, r.weights

    def slow(x):
        return _loop_reference(router, x, S)[0]

    idx, w, g_fast = grads(fast)
    idx_ref, w_ref, g_ref = grads(slow)
    assert torch.equal(idx, idx_ref)
    assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    assert set(g_fast) == set(g_ref) == ({"x", "weight"} | ({"proj"} if router.proj is not None else set()))
    for name in g_ref:
        assert g_ref[name] is not None and g_fast[name] is not None, name
        assert_close(g_fast[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")
    # the similarity path really carries gradient to the feature projection
    if router.proj is not None:
        assert float(g_fast["proj"].abs().max()) > 0


# -- causality and sequence separation ---------------------------------------------------------


@pytest.mark.parametrize("features", ["projection", "logits"])
def test_causal_within_a_sequence(features):
    D, S, N = 8, 10, 2
    router = _router(D, features=features, temperature=0.3)
    x = _x(N * S, D)
    r = router(x, seq_len=S)
    for t in (0, 3, 8):
        y = x.clone()
        y[S + t + 1 : 2 * S] += 5 * torch.randn(S - t - 1, D)  # sequence 1, positions > t
        y[t + 1 : S] = -y[t + 1 : S]  # sequence 0, positions > t
        r2 = router(y, seq_len=S)
        for seq in (0, 1):
            keep = slice(seq * S, seq * S + t + 1)
            assert torch.equal(r2.indices[keep], r.indices[keep]), (t, seq)
            assert_close(r2.weights[keep], r.weights[keep], rtol=0, atol=1e-7)
    # and the later positions did change (the test can fail)
    assert not torch.equal(r2.weights[t + 1 : S], r.weights[t + 1 : S])


def test_sequences_do_not_see_each_other():
    D, S, N = 8, 6, 3
    router = _router(D, temperature=0.3)
    x = _x(N * S, D)
    r = router(x, seq_len=S)
    y = x.clone()
    y[S : 2 * S] = torch.randn(S, D) * 3  # replace sequence 1 entirely
    r2 = router(y, seq_len=S)
    for seq in (0, 2):
        keep = slice(seq * S, (seq + 1) * S)
        assert torch.equal(r2.indices[keep], r.indices[keep])
        assert_close(r2.weights[keep], r.weights[keep], rtol=0, atol=1e-7)
    # one long sequence instead: later tokens now see sequence 0, so their routing changes
    r_one = router(x)  # seq_len defaults to all T tokens
    assert not torch.allclose(r_one.weights[S:], r.weights[S:])
    assert_close(r_one.weights[:S], r.weights[:S])


def test_moe_layer_passes_sequence_length():
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, 2, router="similarity", router_options={"temperature": 0.3})
    x = torch.randn(3, 5, 8)
    _, r_batched = moe(x)
    r_direct = moe.router(x.reshape(15, 8), seq_len=5)
    assert torch.equal(r_batched.indices, r_direct.indices)
    assert_close(r_batched.weights, r_direct.weights)


# -- attention-aware building block -------------------------------------------------------------


def test_attention_mixed_probs_identity_and_running_mean():
    N, S, E = 2, 5, 4
    p = torch.randn(N * S, E).softmax(-1)
    eye = torch.eye(S).expand(N, S, S)
    assert_close(attention_mixed_probs(p, eye, S), p)
    uniform = torch.ones(S, S).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(N, S, S)
    p_NSE = p.reshape(N, S, E)
    running = p_NSE.cumsum(1) / torch.arange(1, S + 1).view(1, S, 1)
    assert_close(attention_mixed_probs(p, uniform, S), running.reshape(N * S, E))
    half = attention_mixed_probs(p, uniform, S, mix=0.25)
    assert_close(half, 0.75 * p + 0.25 * running.reshape(N * S, E))
    assert_close(half.sum(-1), torch.ones(N * S))
    assert attention_mixed_probs(p, uniform, S, mix=0.0) is p
    # bf16 attention weights are accepted and the result keeps p's dtype
    assert attention_mixed_probs(p, uniform.bfloat16(), S).dtype == torch.float32


def test_attention_mixed_probs_errors():
    p = torch.rand(6, 3)
    with pytest.raises(ValueError, match="attn must be"):
        attention_mixed_probs(p, torch.eye(3).expand(1, 3, 3), 3)
    with pytest.raises(ValueError, match="seq_len"):
        attention_mixed_probs(p, torch.eye(4).expand(1, 4, 4), 4)
    with pytest.raises(ValueError, match="mix"):
        attention_mixed_probs(p, torch.eye(3).expand(2, 3, 3), 3, mix=1.5)
    with pytest.raises(ValueError, match="probs"):
        attention_mixed_probs(p[0], torch.eye(3).expand(2, 3, 3), 3)


# -- fluctuation ----------------------------------------------------------------------------------


def test_routing_fluctuation_known_values():
    a = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    b = torch.tensor([[0, 2], [3, 2], [1, 3], [2, 3]])  # top-1 differs for tokens 1 and 3
    assert routing_fluctuation(a, b) == 0.5
    assert routing_fluctuation(a, a) == 0.0
    assert routing_fluctuation(a[:, :1], (a[:, :1] + 1) % 4) == 1.0
    assert routing_fluctuation(a, b[:, :1]) == 0.5  # only slot 0 matters; K may differ
    assert routing_fluctuation(a[:0], b[:0]) == 0.0
    with pytest.raises(ValueError, match="same tokens"):
        routing_fluctuation(a, b[:3])
    with pytest.raises(ValueError, match="idx_b"):
        routing_fluctuation(a, b[:, 0])


# -- the intended effect ----------------------------------------------------------------------------


def test_mixing_lowers_selection_entropy_of_noisy_similar_tokens():
    """Two clusters of similar tokens; the first member of each is confident, the later ones have
    noisy, nearly flat base distributions with random argmax. Mixing lets them borrow the
    cluster's choice: lower selection entropy and one expert per cluster. (Mixing confident,
    disagreeing distributions would raise entropy instead: entropy is concave.)"""
    D, E = 8, 4
    options = {"features": "projection", "d_feat": 4, "temperature": 0.1}
    mixed = _router(D, E, 1, **options)
    plain = _router(D, E, 1, **options, mix=0.0)
    for router in (mixed, plain):
        with torch.no_grad():
            router.proj.copy_(torch.cat([torch.eye(4), torch.zeros(4, 4)], 1))  # features: dims 0-3
            router.weight.copy_(torch.cat([torch.zeros(4, 4), torch.eye(4)], 1))  # logits: dims 4-7
    g = torch.Generator().manual_seed(3)
    cluster = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    confident_expert = {0: 2, 1: 0}
    x = torch.zeros(len(cluster), D)
    for t, c in enumerate(cluster):
        x[t, c] = 1.0  # cluster feature (orthogonal between clusters)
        x[t, :4] += 0.05 * torch.randn(4, generator=g)  # similar, not identical
        if t < 2:
            x[t, 4 + confident_expert[c]] = 5.0
        else:
            x[t, 4:] = 0.4 * torch.randn(4, generator=g)
    r_mix = mixed(x)
    r_plain = plain(x)
    h_mix = float(r_mix.stats["selection_entropy"])
    h_plain = float(r_plain.stats["selection_entropy"])
    assert h_mix < h_plain - 0.02, (h_mix, h_plain)
    assert_close(r_mix.stats["base_entropy"], r_plain.stats["selection_entropy"])
    top1_mix = r_mix.indices[:, 0].tolist()
    assert top1_mix == [confident_expert[c] for c in cluster]
    # the plain routing of the noisy tokens scatters over experts
    assert routing_fluctuation(r_mix.indices, r_plain.indices) >= 0.3


# -- stats, edge cases, config ---------------------------------------------------------------------


def test_stats_and_losses():
    router = _router(temperature=0.2, load_balance_coef=0.5, z_loss_coef=0.1)
    x = _x(8, 8)
    r = router(x, seq_len=4)
    _, p, mixed = router.mixed_probs(x, 4)
    h = lambda q: float(-(q * q.log()).sum(-1).mean().detach())  # noqa: E731
    assert math.isclose(float(r.stats["selection_entropy"]), h(mixed), rel_tol=1e-5)
    assert math.isclose(float(r.stats["base_entropy"]), h(p), rel_tol=1e-5)
    assert set(r.losses) == {"load_balance", "z"}


def test_edge_cases():
    router = _router(E=3, k=3, temperature=0.5)
    r = router(torch.zeros(0, 8))
    assert r.indices.shape == (0, 3)
    r1 = router(_x(1, 8))
    idx, w = _plain(router, _x(1, 8))
    assert torch.equal(r1.indices, idx)
    assert_close(r1.weights, w)
    assert_close(router(_x(6, 8), seq_len=1).weights, _plain(router, _x(6, 8))[1])  # S = 1: no neighbours
    with pytest.raises(ValueError, match="seq_len"):
        router(_x(6, 8), seq_len=4)


def test_parameters():
    assert _router(D=8, E=6, d_feat=5).routing_parameters() == 8 * 6 + 8 * 5
    assert _router(D=8, E=6, features="logits").routing_parameters() == 8 * 6


@pytest.mark.parametrize(
    "field,value",
    [
        ("features", "graph"),
        ("d_feat", 0),
        ("d_feat", 2.5),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", float("inf")),
        ("mix", 1.5),
        ("mix", -0.1),
        ("renormalize", "yes"),
        ("load_balance_coef", -1.0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SimilarityConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        build_router("similarity", 8, 4, 2, **{field: value})
