"""Bad input raises ValueError whose message names the offending parameter."""

from __future__ import annotations

import pytest
import torch

from sparseroute.moe import EXECUTORS, ROUTERS, Experts, MoE, MoEConfig, build_router
from sparseroute.routing import Routing, apply_capacity, capacity_for

D, F, E = 8, 8, 4


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    return MoE(D, F, E, 2)


# -- top_k ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [E + 1, 0, -1, 2.0, True])
def test_bad_top_k(k):
    with pytest.raises(ValueError, match="top_k"):
        MoE(D, F, E, k)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(d_ff=F, num_experts=E, top_k=k)


@pytest.mark.parametrize("name", ["topk", "cosine", "hash", "expert_choice", "relu", "all_to_one"])
@pytest.mark.parametrize("k", [E + 1, 0])
def test_bad_top_k_router(name, k):
    with pytest.raises(ValueError, match="top_k"):
        build_router(name, D, E, k)


@pytest.mark.parametrize("name,value", [("d_model", 0), ("d_ff", -2), ("num_experts", 0)])
def test_bad_sizes(name, value):
    kw = {"d_model": D, "d_ff": F, "num_experts": E, "top_k": 1, name: value}
    with pytest.raises(ValueError, match=name):
        MoE(**kw)


# -- router options ------------------------------------------------------------------------------


@pytest.mark.parametrize("d_space", [0, -3])
def test_bad_d_space(d_space):
    with pytest.raises(ValueError, match="d_space"):
        MoE(D, F, E, 2, router="cosine", router_options={"d_space": d_space})
    with pytest.raises(ValueError, match="d_space"):
        build_router("cosine", D, E, 2, d_space=d_space)


def test_unknown_router_name_lists_known():
    with pytest.raises(ValueError, match="nonesuch") as info:
        MoE(D, F, E, 2, router="nonesuch")
    msg = str(info.value)
    assert "router" in msg
    for name in ("cosine", "topk", "hash", "sinkhorn", "expert_choice"):
        assert name in msg
    with pytest.raises(ValueError, match="known:.*cosine"):
        build_router("nonesuch", D, E, 2)
    with pytest.raises(ValueError, match="cosine"):
        ROUTERS.get("Cosine")


def test_unknown_router_option():
    with pytest.raises(ValueError, match="bogus") as info:
        MoE(D, F, E, 2, router="topk", router_options={"bogus": 1})
    assert "jitter" in str(info.value)  # lists the allowed options
    with pytest.raises(ValueError, match="d_space"):
        MoE(D, F, E, 2, router="topk", router_options={"d_space": 4})  # an option of another router
    with pytest.raises(ValueError, match="bogus"):
        build_router("sigmoid", D, E, 2, bogus=0.1)


@pytest.mark.parametrize(
    "router,options,param",
    [
        ("topk", {"jitter": 1.5}, "jitter"),
        ("topk", {"load_balance_coef": -1.0}, "load_balance_coef"),
        ("sigmoid", {"bias_update_rate": -0.1}, "bias_update_rate"),
        ("sinkhorn", {"probability": 2.0}, "probability"),
        ("sinkhorn", {"xi": 0.0}, "xi"),
        ("expert_choice", {"capacity_factor": -1.0}, "capacity_factor"),
        ("relu", {"cls_window": 0}, "cls_window"),
        ("cosine", {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_router_option_values(router, options, param):
    with pytest.raises(ValueError, match=param):
        MoE(D, F, E, 2, router=router, router_options=options)


# -- capacity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cf", [-0.5, 0.0, float("nan"), float("inf")])
def test_bad_capacity_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(D, F, E, 2, capacity_factor=cf)


def test_capacity_for_negative():
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_for(-1.0, 10, 2, 4)


def test_apply_capacity_negative():
    r = Routing(indices=torch.zeros(3, 1, dtype=torch.long), weights=torch.ones(3, 1), num_experts=2)
    with pytest.raises(ValueError, match="capacity"):
        apply_capacity(r, -1)


# -- the input x ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(D,), (2, 3, 4, D), ()])
def test_wrong_rank(moe, shape):
    with pytest.raises(ValueError, match=r"^x must be \[T, D\] or \[B, S, D\]"):
        moe(torch.randn(shape))


def test_not_a_tensor(moe):
    with pytest.raises(ValueError, match="^x must be"):
        moe([[0.0] * D])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_x(moe, dtype):
    with pytest.raises(ValueError, match="x must be a floating-point"):
        moe(torch.ones(3, D, dtype=dtype))


@pytest.mark.parametrize("shape", [(3, D - 1), (2, 3, D + 1)])
def test_wrong_last_dim(moe, shape):
    with pytest.raises(ValueError, match=f"x: last dimension must be d_model={D}"):
        moe(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_mismatch(moe, dtype):
    with pytest.raises(ValueError, match=r"x has dtype .* weights"):
        moe(torch.randn(3, D).to(dtype))
    moe_lo = MoE(D, F, E, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        moe_lo(torch.randn(3, D))


def test_router_input_shape():
    router = build_router("topk", D, E, 2)
    with pytest.raises(ValueError, match="router input"):
        router(torch.randn(3, D + 1))


# -- token ids -----------------------------------------------------------------------------------


def test_hash_needs_token_ids():
    moe = MoE(D, F, E, 2, router="hash")
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x, torch.zeros(2, 4, dtype=torch.long))  # wrong shape
    with pytest.raises(ValueError, match="token_ids"):
        moe(x, torch.zeros(2, 3))  # float ids
    with pytest.raises(ValueError, match="token_ids"):
        build_router("hash", D, E, 2)(torch.randn(3, D))
    y, r = moe(x, torch.zeros(2, 3, dtype=torch.long))  # and the right call works
    assert y.shape == x.shape and r.indices.shape == (6, 2)


# -- dispatch / activation -----------------------------------------------------------------------


def test_unknown_dispatch(moe):
    with pytest.raises(ValueError, match="nope") as info:
        MoE(D, F, E, 2, dispatch="nope")
    assert "dispatch" in str(info.value) and "grouped" in str(info.value)
    with pytest.raises(ValueError, match=r"dispatch 'fast'.*grouped"):
        moe(torch.randn(3, D), dispatch="fast")
    with pytest.raises(ValueError, match="loop"):
        EXECUTORS.get("Loop")


@pytest.mark.parametrize("act", ["tanh", "SwiGLU", ""])
def test_unknown_activation(act):
    with pytest.raises(ValueError, match="activation") as info:
        MoE(D, F, E, 2, activation=act)
    assert "swiglu" in str(info.value) and "gelu" in str(info.value)
    with pytest.raises(ValueError, match="activation"):
        Experts(E, D, F, act)
