"""The compiled kernels as torch operators: registered under torch.ops.sparseroute with consistent
schemas, fake implementations and autograd (torch.library.opcheck), traced by torch.compile with
no graph break, counted by FlopCounterMode; and the plan that decides where each product runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from sparseroute.kernels import codes, extension, ops, plan
from sparseroute.moe import MoE

needs_kernels = pytest.mark.skipif(
    os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1", reason="the compiled kernels are off (SPARSEROUTE_NO_EXTENSIONS=1)"
)


def _routing(T, E, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    idx[::5, -1] = -1  # some unused slots
    w = torch.rand(T, K, generator=g)
    return idx, torch.where(idx >= 0, w, torch.zeros_like(w))


@needs_kernels
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("backends", ["aten", "onednn"])
def test_expert_mlp_op_passes_opcheck(activation, backends):
    """Schema, fake tensor, autograd registration and AOT dispatch agree with the real op."""
    module = extension.load()
    if backends == "onednn" and not module.onednn_usable():
        pytest.skip("oneDNN's float32 matmul does not run on this CPU")
    T, D, F, E, K = 24, 16, 8, 4, 2
    H = 2 * F if activation == "swiglu" else F
    idx, w = _routing(T, E, K)
    x = torch.randn(T, D, requires_grad=True)
    w_in = torch.randn(E, D, H, requires_grad=True)
    w_out = torch.randn(E, F, D, requires_grad=True)
    args = (x, idx, w.requires_grad_(), w_in, w_out, codes.activation_code(activation), 2,
            codes.backend_codes(backends))
    torch.library.opcheck(torch.ops.sparseroute.expert_mlp.default, args)


@needs_kernels
def test_softmax_topk_and_mm_pass_opcheck():
    logits = torch.randn(20, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.sparseroute.softmax_topk.default, (logits, 2, True))
    a, b = torch.randn(12, 16), torch.randn(16, 10)
    torch.library.opcheck(torch.ops.sparseroute.mm.default, (a, b), test_utils=("test_schema", "test_faketensor"))


@needs_kernels
def test_expert_mlp_op_equals_the_reference_with_gradients():
    """Outputs and every gradient (x, routing weights, both weight tensors) against the per-token
    reference executor, with unused slots and an expert that gets no token."""
    torch.manual_seed(0)
    moe = MoE(24, 16, 6, 3)
    idx, w = _routing(40, 5, 3)  # expert 5 gets nothing
    w = w.requires_grad_()
    x = torch.randn(40, 24, requires_grad=True)
    from sparseroute.moe.dispatch import EXECUTORS
    from sparseroute.routing import Routing

    outs = []
    for name in ("parallel", "reference"):
        moe.zero_grad()
        for t in (x, w):
            t.grad = None
        y = EXECUTORS.get(name)(x, Routing(indices=idx, weights=w, num_experts=6), moe.experts)
        y.pow(2).sum().backward()
        outs.append([y.detach(), x.grad.clone(), w.grad.clone(), moe.experts.w_in.grad.clone(),
                     moe.experts.w_out.grad.clone()])
    for a, b in zip(*outs):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(outs[0][3][5]) == 0  # the idle expert's gradient is zero


@needs_kernels
@pytest.mark.parametrize("router", ["topk", "cosine", "expert_choice"])
def test_compiled_moe_has_no_graph_break_and_equals_eager(router):
    """torch.compile(fullgraph=True) traces the MoE layer, the kernel ops included, forward and
    backward; the results equal eager mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoE(32, 16, 8, 2, router=router)
    x = torch.randn(2, 24, 32)
    g = torch.randn(2, 24, 32)

    def step(module):
        module.zero_grad(set_to_none=True)
        xr = x.detach().clone().requires_grad_()
        y, routing = module(xr)
        loss = (y * g).sum() + sum(routing.losses.values(), torch.zeros(()))
        loss.backward()
        return [y.detach(), xr.grad] + [p.grad for p in module.parameters() if p.grad is not None]

    eager = step(moe)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    got = step(compiled)
    assert len(got) == len(eager)
    for a, b in zip(got, eager):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_compiled_with_inductor_too():
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoE(32, 16, 8, 2)
    x = torch.randn(48, 32, requires_grad=True)
    y_eager = moe(x)[0]
    compiled = torch.compile(moe, fullgraph=True)
    y = compiled(x)[0]
    assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("E,k,F", [(8, 2, 32), (16, 4, 16)])
def test_flop_counter_counts_the_expert_products(E, k, F):
    """A MoE forward under FlopCounterMode: the expert products are 2·T·k·3·D·F for SwiGLU
    experts (within 1%), whichever executor runs (the kernel op has a FLOP formula)."""
    torch.manual_seed(0)
    T, D = 64, 32
    moe = MoE(D, F, E, k)
    x = torch.randn(T, D)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        moe(x)
    router = 2 * T * D * E
    experts = counter.get_total_flops() - router
    expected = 2 * T * k * 3 * D * F
    assert abs(experts - expected) <= 0.01 * expected, (experts, expected)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    if ops.available():
        assert "sparseroute.expert_mlp" in counts, counts


@needs_kernels
def test_flop_counter_counts_the_backward_too():
    torch.manual_seed(0)
    T, D, E, k, F = 64, 32, 8, 2, 32
    moe = MoE(D, F, E, k)
    x = torch.randn(T, D, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y, _ = moe(x)
        y.sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    forward = 2 * T * k * 3 * D * F
    assert counts["sparseroute.expert_mlp"] == forward
    assert counts["sparseroute.expert_mlp_backward"] == 2 * forward  # dL/da, dL/dx, and both weight gradients


# -- the plan --------------------------------------------------------------------------------------


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    from sparseroute.kernels import backend

    monkeypatch.setattr(plan, "_cache_path", lambda: tmp_path / "plans.json")
    monkeypatch.setattr(backend, "_state", {"backend": "auto"})  # whatever $SPARSEROUTE_GEMM says
    plan.clear_cache()
    yield tmp_path
    plan.clear_cache()


@needs_kernels
def test_plan_modes(plan_cache, monkeypatch):
    module = extension.load()
    for mode in ("rule", "onednn", "own"):
        monkeypatch.setenv("SPARSEROUTE_KERNEL_PLAN", mode)
        p = plan.expert_plan(torch.float32, 512, 128, 64, 8, "swiglu", 2)
        assert len(p.backends) == len(codes.PRODUCTS)
        if mode != "rule":
            assert p.source == "forced"
    monkeypatch.setenv("SPARSEROUTE_KERNEL_PLAN", "fastest")
    with pytest.raises(ValueError, match="unknown plan mode"):
        plan.expert_plan(torch.float32, 512, 128, 64, 8, "swiglu", 2)
    monkeypatch.setenv("SPARSEROUTE_KERNEL_PLAN", "rule")
    # float64 and tiny widths never go to the own loops or oneDNN
    assert set(plan.expert_plan(torch.float64, 512, 128, 64, 8, "swiglu", 2).backends) == {"aten"}
    assert set(plan.expert_plan(torch.float32, 2, 128, 8, 2, "swiglu", 2).backends) == {"aten"}
    from sparseroute.kernels import backend

    with backend.use_backend("aten"):
        assert set(plan.expert_plan(torch.float32, 512, 128, 64, 8, "swiglu", 2).backends) == {"aten"}
    if module.onednn_usable() and module.row_gemm_runs(16):
        rule = plan.expert_plan(torch.float32, 512, 128, 64, 8, "swiglu", 2)
        assert set(rule.backends) <= {"own", backend.resolved_backend()}


@needs_kernels
def test_tuning_keeps_the_rule_unless_another_plan_is_clearly_faster(plan_cache, monkeypatch):
    module = extension.load()
    if not (module.onednn_usable() and module.row_gemm_runs(16)):
        pytest.skip("nothing to tune here: the own loops do not run on this CPU")
    monkeypatch.setenv("SPARSEROUTE_KERNEL_PLAN", "tune")
    args = (torch.float32, 512, 128, 64, 8, "swiglu", 2)
    rule = plan._rule(plan._limits(module, torch.float32, 512, 128, 256)[0], 512, 128, 256)[0]
    seen = []

    def close(backends):  # every other candidate 1% faster than the rule's: within the margin
        seen.append(list(backends))
        return 1.0 if list(backends) == rule else 0.99

    p = plan.expert_plan(*args, timer=close)
    assert list(p.backends) == rule and len({tuple(b) for b in seen}) >= 2
    assert len(seen) == len({tuple(b) for b in seen}) * (plan.ROUNDS + 1)  # in turns, after a warm-up round

    def onednn_wins(backends):
        return 0.5 if all(b != "own" for b in backends) else 1.0

    p = plan.expert_plan(*args, timer=onednn_wins)
    assert "own" not in p.backends and p.source == "tuned"


@needs_kernels
def test_a_tuned_plan_is_cached_per_machine_and_the_first_writer_wins(plan_cache, monkeypatch):
    module = extension.load()
    if not (module.onednn_usable() and module.row_gemm_runs(16)):
        pytest.skip("nothing to tune here: the own loops do not run on this CPU")
    monkeypatch.setenv("SPARSEROUTE_KERNEL_PLAN", "tune")
    monkeypatch.setattr(plan, "ROUNDS", 1)
    monkeypatch.setattr(plan, "TUNE_TOKENS", 256)
    args = (torch.float32, 64, 32, 8, 2, "swiglu", 2)
    first = plan.expert_plan(*args)
    assert first.source == "tuned"
    stored = json.loads((plan_cache / "plans.json").read_text())
    (key, value), = stored.items()
    assert "torch" in key and extension.build_dir().name in key and "D64 F32 E8 K2 swiglu threads2" in key and value == list(first.backends)
    # another process (here: a cleared memo) reads the stored choice instead of timing again
    plan.clear_cache()
    forced = ["onednn"] * len(codes.PRODUCTS)
    stored[key] = forced
    (plan_cache / "plans.json").write_text(json.dumps(stored))
    again = plan.expert_plan(*args)
    assert again.source == "cached" and list(again.backends) == forced
    peek = plan.expert_plan(torch.float32, 64, 32, 16, 2, "swiglu", 2, peek=True)
    assert peek.source == "untuned"
