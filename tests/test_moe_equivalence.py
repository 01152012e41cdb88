"""Every router x fast executor ("grouped", "loop", "fused", and "parallel" with each GEMM backend)
equals the "reference" executor.

Outputs and gradients (w.r.t. x and every parameter) are compared on one module; the torch RNG
is reset before each forward so train-mode randomness (jitter, Sinkhorn coin flips) agrees.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from sparseroute.kernels import gemm
from sparseroute.moe import MoE
from sparseroute.moe.routers import ROUTERS

ALL_ROUTERS = (
    "topk",
    "sigmoid",
    "expert_choice",
    "cosine",
    "similarity",
    "kmeans",
    "hash",
    "random_fixed",
    "sinkhorn",
    "relu",
    "round_robin",
    "all_to_one",
)
FAST = ("grouped", "loop", "fused", "parallel")
needs_kernels = pytest.mark.skipif(os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1",
                                   reason="the compiled kernels are off (SPARSEROUTE_NO_EXTENSIONS=1)")


@dataclass
class Case:
    name: str
    router: str = "topk"
    E: int = 4
    k: int = 2
    shape: tuple[int, ...] = (2, 5)  # x.shape[:-1]
    D: int = 8
    F: int = 8
    activation: str = "swiglu"
    router_options: dict[str, Any] = field(default_factory=dict)
    shared: bool = False
    shared_gate: bool = False
    capacity_factor: float | None = None
    dtype: torch.dtype = torch.float32
    train: bool = False
    dominant: int | None = None  # topk: set the router so this expert dominates every token
    expect: tuple[str, ...] = ()  # properties of the routing the case must exhibit

    def __str__(self) -> str:
        return self.name


FIXED = [
    # every router, eval mode, fp32, [B, S, D]
    *[
        Case(f"{r}-basic", router=r, router_options={"d_space": 8} if r == "cosine" else {})
        for r in ALL_ROUTERS
    ],
    # train mode with randomness
    Case("topk-jitter-train", router_options={"jitter": 0.3}, train=True, shape=(3, 4)),
    Case("sinkhorn-p1-train", router="sinkhorn", router_options={"probability": 1.0}, train=True,
         shape=(12,), expect=("sinkhorn_applied",)),
    Case("sigmoid-train", router="sigmoid", train=True, shape=(9,)),
    Case("expert_choice-train-cf2", router="expert_choice", router_options={"capacity_factor": 2.0},
         train=True, shape=(7,)),
    # T = 1
    Case("topk-T1", shape=(1,)),
    Case("topk-T1-3d", shape=(1, 1), k=1),
    Case("expert_choice-T1", router="expert_choice", shape=(1,)),
    Case("sinkhorn-T1-train", router="sinkhorn", router_options={"probability": 1.0}, train=True, shape=(1,)),
    Case("hash-T1", router="hash", shape=(1,), k=3),
    # k = E
    Case("topk-k=E", E=3, k=3, shape=(6,)),
    Case("cosine-k=E", router="cosine", E=4, k=4, router_options={"d_space": 4}, shape=(2, 3)),
    Case("random_fixed-k=E", router="random_fixed", E=5, k=5, shape=(4,)),
    Case("E1-k1", E=1, k=1, shape=(5,)),
    # all tokens to one expert
    Case("all_to_one-k1", router="all_to_one", k=1, shape=(3, 4), expect=("one_expert", "empty_expert")),
    Case("topk-dominant-k1", k=1, dominant=2, shape=(10,), expect=("one_expert", "empty_expert")),
    Case("topk-dominant-k2-gelu", k=2, dominant=0, activation="gelu", shape=(2, 6)),
    # an expert with no tokens
    Case("round_robin-empty", router="round_robin", E=6, k=1, shape=(3,), expect=("empty_expert",)),
    Case("hash-empty", router="hash", E=8, k=1, shape=(2,), expect=("empty_expert",)),
    # activations / shared experts
    Case("topk-gelu", activation="gelu"),
    Case("topk-silu", activation="silu", shape=(7,)),
    Case("topk-relu-act", activation="relu", shape=(7,)),
    Case("topk-shared", shared=True),
    Case("sigmoid-shared-gated-gelu", router="sigmoid", shared=True, shared_gate=True, activation="gelu"),
    Case("relu-shared", router="relu", shared=True, shape=(11,)),
    # capacity dropping
    Case("topk-cap0.5", capacity_factor=0.5, shape=(4, 4), expect=("dropped",)),
    Case("all_to_one-cap0.5", router="all_to_one", k=2, capacity_factor=0.5, shape=(8,), expect=("dropped",)),
    Case("cosine-cap0.5-T1", router="cosine", router_options={"d_space": 8}, k=2, capacity_factor=0.5,
         shape=(3,), expect=("dropped",)),
    Case("topk-cap1.25", capacity_factor=1.25, shape=(16,)),
    # shapes that F.grouped_mm cannot take directly (16-byte stride alignment)
    Case("topk-misaligned-D6-F5", D=6, F=5, shape=(5,)),
    # bf16
    *[
        Case(f"{r}-bf16", router=r, dtype=torch.bfloat16, shape=(2, 6),
             router_options={"d_space": 8} if r == "cosine" else {})
        for r in ALL_ROUTERS
    ],
    Case("topk-bf16-shared-cap", dtype=torch.bfloat16, shared=True, capacity_factor=0.5, shape=(12,),
         expect=("dropped",)),
    Case("sinkhorn-bf16-train", router="sinkhorn", router_options={"probability": 1.0}, train=True,
         dtype=torch.bfloat16, shape=(8,)),
    Case("topk-bf16-D12", dtype=torch.bfloat16, D=12, F=6, shape=(5,)),
]


def _random_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        router = rng.choice(ALL_ROUTERS)
        E = rng.randint(1, 8)
        k = rng.randint(1, E)
        shape = rng.choice([(rng.randint(1, 12),), (rng.randint(1, 3), rng.randint(1, 5))])
        opts: dict[str, Any] = {}
        if router == "cosine":
            opts["d_space"] = rng.choice([1, 4, 8])
        if router == "sinkhorn":
            opts["probability"] = 1.0
        if router == "topk" and rng.random() < 0.5:
            opts["jitter"] = 0.2
        out.append(
            Case(
                f"random{i}-{router}-E{E}k{k}",
                router=router,
                E=E,
                k=k,
                shape=shape,
                D=rng.choice([4, 8, 16]),
                F=rng.choice([4, 8, 12]),
                activation=rng.choice(["swiglu", "gelu"]),
                router_options=opts,
                shared=rng.random() < 0.3,
                capacity_factor=rng.choice([None, None, 0.5, 1.0]),
                train=rng.random() < 0.5,
            )
        )
    return out


CASES = FIXED + _random_cases(10, seed=20240611)


def _build(case: Case) -> tuple[MoE, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    torch.manual_seed(0)
    moe = MoE(
        case.D,
        case.F,
        case.E,
        case.k,
        router=case.router,
        router_options=case.router_options,
        activation=case.activation,
        capacity_factor=case.capacity_factor,
        num_shared_experts=1 if case.shared else 0,
        shared_gate=case.shared_gate,
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*case.shape, case.D, generator=gen)
    if case.dominant is not None:
        x = x.abs() + 0.5  # every token has a large positive component along ones
        with torch.no_grad():
            moe.router.weight[case.dominant] = 20.0 * torch.ones(case.D) / case.D**0.5
    ids = torch.randint(0, 1000, case.shape, generator=gen) if ROUTERS.get(case.router).needs_token_ids else None
    moe = moe.to(case.dtype)
    x = x.to(case.dtype)
    g = torch.randn(*case.shape, case.D, generator=gen).to(case.dtype)  # upstream gradient
    moe.train(case.train)
    return moe, x, ids, g


def _run(moe: MoE, x: torch.Tensor, ids, g: torch.Tensor, dispatch: str):
    moe.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1234)
    y, routing = moe(xr, ids, dispatch=dispatch)
    (y.float() * g.float()).sum().backward()
    grads = {"x": xr.grad}
    for name, p in moe.named_parameters():
        grads[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    return y.detach(), grads, routing


def _tol(case: Case, ref: torch.Tensor) -> dict[str, float]:
    if case.dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-4}
    scale = float(ref.detach().float().abs().max()) if ref.numel() else 0.0
    return {"atol": 2e-2 * max(scale, 1e-3), "rtol": 2e-2}


def _check_expectations(case: Case, routing) -> None:
    load = routing.tokens_per_expert()
    for e in case.expect:
        if e == "dropped":
            assert float(routing.stats["dropped_fraction"]) > 0, "capacity case dropped nothing"
        elif e == "one_expert":
            assert int((load > 0).sum()) == 1, f"expected all tokens on one expert; load={load.tolist()}"
        elif e == "empty_expert":
            assert bool((load == 0).any()), f"expected an expert with no tokens; load={load.tolist()}"
        elif e == "sinkhorn_applied":
            assert float(routing.stats["sinkhorn_applied"]) == 1.0
        else:  # pragma: no cover
            raise AssertionError(e)


def check_matches_reference(case: Case, dispatch: str, device: str = "cpu") -> None:
    """``dispatch`` equals "reference" on ``device``: the routing, the output and every gradient."""
    moe, x, ids, g = _build(case)
    moe, x, g = moe.to(device), x.to(device), g.to(device)
    ids = ids.to(device) if ids is not None else None
    y_ref, g_ref, r_ref = _run(moe, x, ids, g, "reference")
    y, grads, r = _run(moe, x, ids, g, dispatch)

    # the same decision on both runs (the RNG reset worked), so only the executor differs
    torch.testing.assert_close(r.indices, r_ref.indices, rtol=0, atol=0)
    assert_close(r.weights, r_ref.weights, rtol=0, atol=0)
    _check_expectations(case, r)

    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y.float()).all()
    assert_close(y, y_ref, **_tol(case, y_ref))
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert grads[name].device == x.device, name
        assert_close(grads[name], g_ref[name], **_tol(case, g_ref[name]), msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dispatch", [d for d in FAST if d != "parallel"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case, dispatch: str) -> None:
    check_matches_reference(case, dispatch)


@needs_kernels
@pytest.mark.parametrize("backend", ["aten", "onednn"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parallel_matches_reference_on_each_gemm_backend(case: Case, backend: str) -> None:
    """The compiled kernel's per-expert products on torch's matmul and on oneDNN."""
    if backend == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    with gemm.use_backend(backend):
        check_matches_reference(case, "parallel")


def test_cases_cover_every_router_and_train_mode() -> None:
    routers = {c.router for c in CASES}
    assert routers == set(ALL_ROUTERS)
    assert set(ROUTERS.names()) == set(ALL_ROUTERS)
    trained = {c.router for c in CASES if c.train}
    assert {"topk", "sinkhorn"} <= trained
    assert any(c.train and c.router_options.get("jitter", 0) > 0 for c in CASES)


def test_reference_is_a_real_oracle() -> None:
    """Reference output equals a hand-written sum over slots (guards against an oracle that
    agrees with the fast paths because both are wrong)."""
    case = Case("hand", E=3, k=2, shape=(4,), activation="gelu")
    moe, x, _, _ = _build(case)
    y, routing = moe(x, dispatch="reference")
    ex = moe.experts
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routing.slots):
            e = int(routing.indices[t, j])
            h = torch.nn.functional.gelu(x[t] @ ex.w_in[e])
            expected[t] += routing.weights[t, j] * (h @ ex.w_out[e])
    assert_close(y, expected, atol=1e-6, rtol=1e-5)
    # weights really matter: a topk k=2 routing has renormalised weights summing to 1
    assert_close(routing.weights.sum(1), torch.ones(4))


def grouped_mm_calls(monkeypatch, T: int, D: int, F: int, E: int, dtype: torch.dtype, device: str = "cpu") -> int:
    """How many times one forward + backward of a "grouped" SwiGLU layer calls F.grouped_mm; its
    output is checked against the reference executor's too."""
    calls = []
    real = torch.nn.functional.grouped_mm

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "grouped_mm", spy)
        torch.manual_seed(0)
        moe = MoE(D, F, E, 2).to(device=device, dtype=dtype)
        x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
        y, _ = moe(x, dispatch="grouped")
        y.float().square().sum().backward()
        n = len(calls)
        y_ref, _ = moe(x, dispatch="reference")
    assert_close(y, y_ref, **_tol(Case("t", dtype=dtype), y_ref))
    return n


def test_grouped_uses_grouped_mm_when_aligned(monkeypatch) -> None:
    """The "grouped" executor really calls F.grouped_mm on aligned shapes, and on shapes that
    miss its 16-byte stride alignment falls back instead of raising inside F.grouped_mm."""
    # expected F.grouped_mm calls per forward (up and down projection); swiglu's w_in is [E, D, 2F]
    for D, F, dtype, n_calls in (
        (8, 8, torch.float32, 2),
        (8, 8, torch.bfloat16, 2),
        (6, 8, torch.float32, 0),  # x rows of 24 bytes; w_out rows of 24 bytes
        (8, 6, torch.float32, 1),  # up projection fine (2F = 12 floats), h rows of 24 bytes
        (8, 4, torch.bfloat16, 1),  # h rows of 8 bytes
        (12, 8, torch.bfloat16, 0),
    ):
        assert grouped_mm_calls(monkeypatch, 5, D, F, 4, dtype) == n_calls, (D, F, dtype)


def test_zero_tokens() -> None:
    """T = 0 ([0, D] and [B, 0, D]) gives an empty output on every executor."""
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, 2)
    for shape in ((0, 8), (2, 0, 8)):
        x = torch.randn(*shape)
        for d in ("reference", *FAST):
            if d == "parallel" and os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1":
                continue
            y, r = moe(x, dispatch=d)
            assert y.shape == x.shape
            assert r.indices.shape == (0, 2)
