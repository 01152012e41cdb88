"""Attention-aware similarity routing: the LM's head-averaged attention probabilities, the
``token_mixing`` argument of routers / MoE layers, and similarity routing with features="attention".

Legend: B batch, S sequence, D model dim, H heads, K head dim, T tokens (B·S), E experts,
N sequences.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparseroute.models import LMConfig, TransformerLM, apply_rope, rope_cos_sin
from sparseroute.moe import MoEConfig
from sparseroute.moe import MoE, build_router
from sparseroute.moe.dispatch import EXECUTORS
from sparseroute.moe.routers import ROUTERS
from sparseroute.moe.routers.base import topk_of
from sparseroute.moe.routers.similarity import attention_mixed_probs
from sparseroute.moe.routers.topk import TopKConfig, TopKRouter

V, D, L, H, FF, S = 64, 32, 2, 4, 64, 12
ATTN = {"features": "attention"}


def lm_config(router: str = "similarity", **options) -> LMConfig:
    opts = dict(ATTN, **options) if router == "similarity" else dict(options)
    moe = MoEConfig(num_experts=4, top_k=2, router=router, router_options=opts)
    return LMConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=H, d_ff=FF, max_seq_len=S, moe=moe)


def build(cfg: LMConfig, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(cfg).eval()


def causal_uniform(N: int, S: int) -> torch.Tensor:
    a = torch.ones(S, S).tril()
    return (a / a.sum(-1, keepdim=True)).expand(N, S, S).contiguous()


def causal_random(N: int, S: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(N, S, S, generator=g) * 2
    return scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def plain(router, x_TD):
    probs_TE = (x_TD @ router.weight.t()).softmax(-1)
    return topk_of(probs_TE, router.top_k, router.renormalize())


def _x(T, D_=8, seed=1):
    return torch.randn(T, D_, generator=torch.Generator().manual_seed(seed)) * 2


# -- (a) the attention layer's head-averaged probabilities ---------------------------------------


def _loop_probs(attn, x_BSD, cos_SK, sin_SK):
    """mean_h softmax_{j <= i}(q_h,i · k_h,j / sqrt(K)) with explicit loops, q/k from the module's
    projections with RoPE applied in the [B, H, S, K] layout."""
    B, S_, _ = x_BSD.shape
    Hn, K = attn.n_heads, attn.head_dim
    q = apply_rope(attn.q(x_BSD).view(B, S_, Hn, K).transpose(1, 2), cos_SK, sin_SK)
    k = apply_rope(attn.k(x_BSD).view(B, S_, Hn, K).transpose(1, 2), cos_SK, sin_SK)
    rows = []
    for b in range(B):
        for i in range(S_):
            row = torch.zeros(S_)
            for h in range(Hn):
                scores = torch.stack([torch.dot(q[b, h, i], k[b, h, j]) / math.sqrt(K) for j in range(i + 1)])
                row = row + torch.cat([scores.softmax(0), torch.zeros(S_ - i - 1)]) / Hn
            rows.append(row)
    return torch.stack(rows).reshape(B, S_, S_)


def test_head_averaged_probs_match_loop_reference_and_output_is_unchanged():
    model = build(lm_config())
    attn = model.blocks[0].attn
    B, S_ = 2, 6
    cos_SK, sin_SK = rope_cos_sin(S_, attn.head_dim, model.config.rope_base)
    x0 = torch.randn(B, S_, D, generator=torch.Generator().manual_seed(2))
    g = torch.randn(B, S_, S_, generator=torch.Generator().manual_seed(3))

    def run(fn):
        attn.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        probs = fn(x)
        (probs * g).sum().backward()
        return probs.detach(), x.grad, attn.q.weight.grad, attn.k.weight.grad

    p_fast, *g_fast = run(lambda x: attn(x, cos_SK, sin_SK, return_probs=True)[1])
    p_ref, *g_ref = run(lambda x: _loop_probs(attn, x, cos_SK, sin_SK))
    assert p_fast.shape == (B, S_, S_) and p_fast.dtype == torch.float32
    assert_close(p_fast, p_ref, atol=1e-6, rtol=1e-5)
    assert_close(p_fast.sum(-1), torch.ones(B, S_))
    assert bool((p_fast.triu(1) == 0).all())
    assert float((p_fast - torch.eye(S_)).abs().max()) > 1e-2  # not trivially the identity
    for a, b in zip(g_fast, g_ref):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        out_plain = attn(x0, cos_SK, sin_SK)
        out, _ = attn(x0, cos_SK, sin_SK, return_probs=True)
    assert torch.equal(out, out_plain)


# -- (b) the LM with attention-aware routing -----------------------------------------------------


def _moe_inputs(model, ids):
    """The input each MoE layer receives (forward hooks)."""
    seen = []
    hooks = [b.ffn.register_forward_hook(lambda m, args, kw, out: seen.append((args[0], kw)), with_kwargs=True)
             for b in model.blocks]
    try:
        out = model(ids)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def test_lm_forward_backward_and_the_routing_uses_the_attention_weights():
    model = build(lm_config(mix=0.7)).train()
    assert all(b.ffn.needs_token_mixing for b in model.blocks)
    ids = torch.randint(0, V, (3, S), generator=torch.Generator().manual_seed(0))
    out, seen = _moe_inputs(model, ids)
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), ids.reshape(-1)) + out.aux_loss()
    loss.backward()
    for name, prm in model.named_parameters():
        assert prm.grad is not None and bool(torch.isfinite(prm.grad).all()), name
    # the routing of block 0 is the router's on the MoE input with block 0's attention weights
    block = model.blocks[0]
    h_BSD, kw = seen[0]
    mixing_BSS = kw["token_mixing"]
    assert mixing_BSS.shape == (3, S, S) and mixing_BSS.requires_grad  # not detached
    with torch.no_grad():
        cos_SK, sin_SK = rope_cos_sin(S, model.config.head_dim, model.config.rope_base)
        _, ref_BSS = block.attn(block.attn_norm(model.embed(ids)), cos_SK, sin_SK, return_probs=True)
        assert_close(mixing_BSS.detach(), ref_BSS)
        r = block.ffn.router(h_BSD.reshape(-1, D), seq_len=S, token_mixing=ref_BSS)
    assert torch.equal(out.routings[0].indices, r.indices)
    assert_close(out.routings[0].weights.detach(), r.weights)
    # and the mixing mattered: plain routing of the same input differs
    idx, w = plain(block.ffn.router, h_BSD.detach().reshape(-1, D))
    assert not torch.allclose(w, r.weights)


def test_lm_routing_is_causal():
    model = build(lm_config())
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(ids).routings
    for t in (0, 4, S - 2):
        ids2 = ids.clone()
        ids2[:, t + 1 :] = (ids[:, t + 1 :] + 1 + torch.randint(0, V - 1, ids[:, t + 1 :].shape)) % V
        with torch.no_grad():
            pert = model(ids2).routings
        for r0, r1 in zip(base, pert):
            i0, i1 = r0.indices.reshape(2, S, -1), r1.indices.reshape(2, S, -1)
            w0, w1 = r0.weights.reshape(2, S, -1), r1.weights.reshape(2, S, -1)
            assert torch.equal(i0[:, : t + 1], i1[:, : t + 1]), t
            assert_close(w0[:, : t + 1], w1[:, : t + 1], atol=1e-6, rtol=1e-5)
            assert not torch.allclose(w0[:, t + 1 :], w1[:, t + 1 :])  # the test can fail


def test_lm_mix_zero_is_plain_topk_routing():
    sim = build(lm_config(mix=0.0))
    topk = build(lm_config("topk"))  # same seed, same parameters (no feature projection)
    assert [n for n, _ in sim.named_parameters()] == [n for n, _ in topk.named_parameters()]
    topk.load_state_dict(sim.state_dict())
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = sim(ids), topk(ids)
    assert torch.equal(a.logits, b.logits)
    for ra, rb in zip(a.routings, b.routings):
        assert torch.equal(ra.indices, rb.indices)
        assert torch.equal(ra.weights, rb.weights)


def test_lm_without_attention_features_does_not_compute_the_probabilities():
    """Other similarity features and other routers: the block asks for no attention weights."""
    for cfg in (lm_config(features="logits"), lm_config("topk")):
        model = build(cfg)
        assert not any(b.ffn.needs_token_mixing for b in model.blocks)
        calls = []
        for b in model.blocks:
            b.attn.register_forward_hook(lambda m, args, kw, out: calls.append(kw), with_kwargs=True)
        model(torch.randint(0, V, (1, 5)))
        assert calls == [{}, {}]


# -- (c) the similarity router with features="attention" ---------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_identity_mixing_is_plain_routing(k):
    N, S_ = 3, 5
    router = build_router("similarity", 8, 6, k, **ATTN)
    x = _x(N * S_)
    r = router(x, seq_len=S_, token_mixing=torch.eye(S_).expand(N, S_, S_))
    idx, w = plain(router, x)
    assert torch.equal(r.indices, idx)
    assert_close(r.weights, w, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("mix", [1.0, 0.6])
@pytest.mark.parametrize("mixing", ["uniform", "random"])
def test_given_mixing_matches_attention_mixed_probs(mix, mixing):
    N, S_, k = 2, 6, 2
    router = build_router("similarity", 8, 6, k, **ATTN, mix=mix)
    x = _x(N * S_)
    a_NSS = causal_uniform(N, S_) if mixing == "uniform" else causal_random(N, S_)
    r = router(x, seq_len=S_, token_mixing=a_NSS)
    p_TE = (x @ router.weight.t()).softmax(-1)
    mixed_TE = attention_mixed_probs(p_TE, a_NSS, S_, mix)
    if mixing == "uniform" and mix == 1.0:  # the running mean of p, written out
        running = p_TE.reshape(N, S_, -1).cumsum(1) / torch.arange(1, S_ + 1).view(1, S_, 1)
        assert_close(mixed_TE, running.reshape(N * S_, -1))
    idx, w = topk_of(mixed_TE, k, router.renormalize())
    assert torch.equal(r.indices, idx)
    assert_close(r.weights, w, atol=1e-7, rtol=1e-6)
    assert not torch.equal(r.indices, plain(router, x)[0]) or not torch.allclose(r.weights, plain(router, x)[1])
    _, _, mixed = router.mixed_probs(x, S_, a_NSS)
    assert_close(r.stats["selection_entropy"], -(mixed * mixed.log()).sum(-1).mean())


def test_attention_features_have_no_projection_and_ignore_temperature():
    a = build_router("similarity", 8, 6, 2, **ATTN, temperature=0.05)
    torch.manual_seed(0)
    b = build_router("similarity", 8, 6, 2, **ATTN, temperature=3.0, d_feat=7)
    b.load_state_dict(a.state_dict())
    assert a.proj is None and a.routing_parameters() == 8 * 6
    x, m = _x(12), causal_random(2, 6)
    ra, rb = a(x, seq_len=6, token_mixing=m), b(x, seq_len=6, token_mixing=m)
    assert torch.equal(ra.indices, rb.indices) and torch.equal(ra.weights, rb.weights)


def test_gradients_reach_the_mixing_weights_and_the_router():
    router = build_router("similarity", 8, 6, 2, **ATTN)
    x = _x(12).requires_grad_(True)
    m = causal_random(2, 6).requires_grad_(True)
    r = router(x, seq_len=6, token_mixing=m)
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    for t in (x.grad, m.grad, router.weight.grad):
        assert t is not None and float(t.abs().max()) > 0


def test_missing_token_mixing_is_a_clear_error():
    msg = "features='attention' needs the attention weights of the preceding attention layer"
    router = build_router("similarity", 8, 4, 2, **ATTN)
    with pytest.raises(ValueError, match=msg):
        router(_x(6), seq_len=3)
    with pytest.raises(ValueError, match=msg):
        build_router("similarity", 8, 4, 2, **ATTN, mix=0.0)(_x(6), seq_len=3)
    moe = MoE(8, 16, 4, 2, router="similarity", router_options=ATTN)
    with pytest.raises(ValueError, match="TransformerLM, or pass token_mixing"):
        moe(torch.randn(2, 3, 8))


@pytest.mark.parametrize(
    "bad, seq_len",
    [
        (torch.eye(3).expand(1, 3, 3), 3),  # N = 2 expected
        (torch.eye(6).expand(1, 6, 6), 3),  # S mismatch
        (torch.eye(3), 3),  # not 3-d
        (torch.eye(3, dtype=torch.long).expand(2, 3, 3), 3),  # not floating
        ([[1.0]], 3),
    ],
)
def test_bad_token_mixing_shape_names_it(bad, seq_len):
    for name in ("similarity", "topk"):
        router = build_router(name, 8, 4, 2, **(ATTN if name == "similarity" else {}))
        with pytest.raises(ValueError, match="token_mixing"):
            router(_x(6), seq_len=seq_len, token_mixing=bad)
    with pytest.raises(ValueError, match="token_mixing"):
        MoE(8, 16, 4, 2, router="similarity", router_options=ATTN)(_x(6).reshape(2, 3, 8), token_mixing=bad)


def test_moe_layer_passes_token_mixing_one_and_multi_hop():
    torch.manual_seed(0)
    B, S_ = 2, 5
    x = torch.randn(B, S_, 8)
    m = causal_random(B, S_)
    moe = MoE(8, 16, 4, 2, router="similarity", router_options=ATTN)
    assert moe.needs_token_mixing
    _, r = moe(x, token_mixing=m)
    r_direct = moe.router(x.reshape(-1, 8), seq_len=S_, token_mixing=m)
    assert torch.equal(r.indices, r_direct.indices)
    assert_close(r.weights, r_direct.weights)
    r_route = moe.route(x.reshape(-1, 8), seq_len=S_, token_mixing=m)
    assert torch.equal(r_route.weights, r.weights)
    # a [T, D] input is one sequence: [1, T, T]
    moe(x.reshape(-1, 8), token_mixing=causal_random(1, B * S_))
    for hop_routers in (False, True):
        torch.manual_seed(1)
        multi = MoE(8, 16, 4, 2, router="similarity", router_options=ATTN, hops=3, hop_routers=hop_routers)
        y, r = multi(x, token_mixing=m)  # every hop needs (and gets) the mixing weights
        y.sum().backward()
        assert float(r.stats["hops_per_token"]) == 3.0


class _Recorder(TopKRouter):
    """A top-k router that records the token_mixing it is given (not sequence-aware, so halting
    is allowed with it)."""

    uses_token_mixing = True

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def route(self, x_TD, token_ids_T, *, token_mixing=None):
        self.seen.append(token_mixing)
        return super().route(x_TD, token_ids_T)


def test_multi_hop_passes_token_mixing_until_tokens_halt():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    m = causal_uniform(2, 4)
    moe = MoE(8, 16, 4, 2, hops=3).eval()
    rec = _Recorder(8, 4, 2, TopKConfig())
    rec.load_state_dict(moe.router.state_dict())
    moe.router = rec
    y_plain, _ = moe(x)
    rec.seen.clear()
    moe.set_halting(1e-9)  # no token halts: every hop gets the whole sequences
    y, r = moe(x, token_mixing=m)
    assert float(r.stats["halted_fraction"]) == 0.0
    assert len(rec.seen) == 3 and all(s is m for s in rec.seen)
    assert_close(y, y_plain)
    rec.seen.clear()
    moe.set_halting(1e9)  # every token halts after hop 0
    moe(x, token_mixing=m)
    assert rec.seen == [m]
    # halt some tokens (threshold: the median hop-0 update ratio): hop 0 gets the weights, later hops None
    h_TD = x.reshape(-1, 8)
    with torch.no_grad():
        d_TD = moe._hop_output(h_TD, moe.route(h_TD), EXECUTORS.get(moe.config.dispatch), 0)
    moe.set_halting(float((d_TD.norm(dim=-1) / h_TD.norm(dim=-1)).median()))
    rec.seen.clear()
    _, r = moe(x, token_mixing=m)
    assert 0 < float(r.stats["halted_fraction"]) < 1
    assert rec.seen[0] is m and rec.seen[1:] == [None, None]


# -- (d) other routers ignore token_mixing -------------------------------------------------------


def _other_routers():
    for name in sorted(ROUTERS.names()):
        if name == "similarity":
            yield name, {"features": "projection"}
            yield name, {"features": "logits"}
        else:
            yield name, {"d_space": 4} if name == "cosine" else {}


@pytest.mark.parametrize("name, options", list(_other_routers()))
@pytest.mark.parametrize("train", [False, True])
def test_other_routers_ignore_token_mixing(name, options, train):
    N, S_, E, k = 2, 5, 4, 2
    x = _x(N * S_)
    ids = torch.randint(0, 50, (N * S_,), generator=torch.Generator().manual_seed(0))
    results = []
    for mixing in (None, causal_random(N, S_)):
        torch.manual_seed(0)
        router = build_router(name, 8, E, k, **options).train(train)
        assert not router.needs_token_mixing
        torch.manual_seed(1)  # routing noise, if any, is the same
        results.append(router(x, ids, seq_len=S_, token_mixing=mixing))
    a, b = results
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.weights, b.weights)
    assert a.losses.keys() == b.losses.keys()
    for key in a.losses:
        assert torch.equal(a.losses[key], b.losses[key]), key
    assert a.stats.keys() == b.stats.keys()
    for key in a.stats:
        assert torch.equal(torch.as_tensor(a.stats[key]), torch.as_tensor(b.stats[key])), key


@pytest.mark.parametrize("name", ["topk", "hash", "relu"])
def test_moe_layer_output_unchanged_by_token_mixing(name):
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, router=name)
    x = torch.randn(2, 5, 8)
    ids = torch.randint(0, 50, (2, 5))
    y0, r0 = moe(x, ids)
    y1, r1 = moe(x, ids, token_mixing=causal_uniform(2, 5))
    assert torch.equal(y0, y1) and torch.equal(r0.indices, r1.indices) and torch.equal(r0.weights, r1.weights)
