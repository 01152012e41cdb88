"""The GEMM backend switch: oneDNN products equal torch's, outputs and gradients; the switch is
validated, scoped and honoured (by the Python products and by the compiled kernel)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from sparseroute.kernels import backend, gemm, ops
from sparseroute.moe import MoE

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN")
needs_kernels = pytest.mark.skipif(os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1",
                                   reason="the compiled kernels are off (SPARSEROUTE_NO_EXTENSIONS=1)")


def _ops_called(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def _linear_and_grads(x, w, fn, g):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.fixture(params=["matmul", "linear_op"])
def onednn_path(request, monkeypatch):
    """Each of the two ways gemm reaches oneDNN: its matmul through the compiled kernels (where
    they are built and it runs here), and torch's oneDNN linear op (the fallback)."""
    if not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    if request.param == "matmul":
        if not ops.onednn_mm_is_direct():
            pytest.skip("oneDNN's matmul is not reachable here (no compiled kernels, or not on this CPU)")
    else:
        monkeypatch.setattr(ops, "onednn_mm_is_direct", lambda: False)
    return request.param


@pytest.mark.parametrize("shape", [(64, 48), (3, 40, 48), (2, 5, 7, 48), (2, 48), (64, 3), (48, 64)])
@pytest.mark.parametrize("out", [40, 2, 96])
def test_linear_on_onednn_equals_torch(shape, out, onednn_path):
    """Any leading dims, both orders of in and out features, and products with a dimension below
    MIN_DIM (those stay on ATen)."""
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(out, shape[-1])
    g = torch.randn(*shape[:-1], out)
    ref = _linear_and_grads(x, w, F.linear, g)
    with gemm.use_backend("onednn"):
        got = _linear_and_grads(x, w, gemm.linear, g)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_onednn_is_really_used_and_aten_is_not(onednn_path):
    """The forward and both gradients run as sparseroute::mm (seen by the profiler), on oneDNN's
    matmul or on torch's oneDNN linear op, none on aten's matmul; the aten backend runs neither."""
    x, w = torch.randn(64, 48, requires_grad=True), torch.randn(40, 48, requires_grad=True)
    with gemm.use_backend("onednn"):
        called = _ops_called(lambda: gemm.linear(x, w).sum().backward())
    assert sum(n == "sparseroute::mm" for n in called) == 3, called
    assert sum("_linear_pointwise" in n for n in called) == (3 if onednn_path == "linear_op" else 0)
    assert not any(n in ("aten::mm", "aten::addmm", "aten::linear") for n in called), called
    with gemm.use_backend("aten"):
        called = _ops_called(lambda: gemm.linear(x, w).sum().backward())
    assert not any(n == "sparseroute::mm" or "_linear_pointwise" in n for n in called)


@needs_onednn
def test_a_stride_zero_gradient_and_no_grad_work():
    """``.sum()`` sends an expanded (stride-0) gradient; under no_grad nothing is saved."""
    x, w = torch.randn(32, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    with gemm.use_backend("onednn"):
        gemm.linear(x, w).sum().backward()
        with torch.no_grad():
            y = gemm.linear(x, w)
    assert_close(x.grad, w.sum(0).expand(32, 16), rtol=1e-5, atol=1e-5)
    assert_close(w.grad, x.detach().sum(0).expand(8, 16), rtol=1e-5, atol=1e-5)
    assert y.grad_fn is None


def test_other_dtypes_stay_on_aten_and_flop_counter_counts_onednn():
    """bf16 is torch's own product to the bit; under FlopCounterMode the oneDNN products
    (sparseroute::mm, with its FLOP formula) are counted, forward and backward."""
    x, w = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16)
    with gemm.use_backend("auto"):
        assert torch.equal(gemm.linear(x, w), F.linear(x, w))
        x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            gemm.linear(x32, w32)
        assert counter.get_total_flops() == 2 * 16 * 32 * 8
        with FlopCounterMode(display=False) as counter:
            gemm.linear(x32, w32).sum().backward()
        assert counter.get_total_flops() == 3 * 2 * 16 * 32 * 8



def test_the_kernel_takes_float32_and_bfloat16_to_onednn_only():
    """The compiled kernel's capability queries: oneDNN's matmul for float32 and bfloat16 (each
    where it runs on this CPU), never for float16 or float64; and the kernel refuses a product on
    oneDNN for a dtype it does not run, naming the product."""
    from sparseroute.kernels import codes
    from sparseroute.kernels import extension as cpu_kernels

    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip(f"no compiled kernels: {cpu_kernels.unavailable_reason()}")
    f32, bf16 = torch.empty(0), torch.empty(0, dtype=torch.bfloat16)
    assert kernels.onednn_usable() == kernels.onednn_usable_for(f32)
    for dtype in (torch.float16, torch.float64):
        assert not kernels.onednn_usable_for(torch.empty(0, dtype=dtype))
    x, w_S, tok = torch.randn(8, 16, dtype=torch.float64), torch.rand(8, dtype=torch.float64), torch.arange(8)
    w_in, w_out = torch.randn(2, 16, 16, dtype=torch.float64), torch.randn(2, 8, 16, dtype=torch.float64)
    onednn_down = codes.backend_codes(["aten", "onednn", "aten", "aten", "aten", "aten"])
    with pytest.raises(RuntimeError, match="product 'down' cannot run on 'onednn'.*Double"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok, [4, 4], 0, 1, onednn_down)
    out = kernels.mlp_forward(x, w_S, w_in, w_out, tok, [4, 4], 0, 1, codes.backend_codes("aten"))[0]
    assert out.dtype == torch.float64
    if kernels.onednn_usable_for(bf16):  # bfloat16 on oneDNN, where its bfloat16 matmul runs here
        args = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in (x, w_S, w_in, w_out, tok)]
        out = kernels.mlp_forward(*args, [4, 4], 0, 1, codes.backend_codes("onednn"))[0]
        ref = kernels.mlp_forward(*args, [4, 4], 0, 1, codes.backend_codes("aten"))[0]
        assert out.dtype == torch.bfloat16
        assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.float().abs().max()))


def test_matmul_and_linear_module():
    torch.manual_seed(0)
    x, w = torch.randn(10, 12), torch.randn(12, 6)
    assert_close(gemm.matmul(x, w), x @ w, rtol=1e-4, atol=1e-5)
    lin = gemm.Linear(12, 6, bias=True)
    ref = torch.nn.Linear(12, 6, bias=True)
    ref.load_state_dict(lin.state_dict())
    assert set(lin.state_dict()) == {"weight", "bias"}
    assert_close(lin(x), ref(x), rtol=1e-4, atol=1e-5)


def test_backend_names_are_checked_and_scoped(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown GEMM backend 'mkl'; known: \['auto', 'aten', 'onednn'\]"):
        gemm.set_backend("mkl")
    before = gemm.get_backend()
    with gemm.use_backend("aten"):
        assert gemm.get_backend() == "aten" and gemm.resolved_backend() == "aten"
    assert gemm.get_backend() == before
    with pytest.raises(RuntimeError, match="boom"), gemm.use_backend("aten"):
        raise RuntimeError("boom")
    assert gemm.get_backend() == before
    monkeypatch.setattr(backend, "onednn_available", lambda: False)
    with pytest.raises(ValueError, match="'onednn' asked for, but this torch build has no oneDNN"):
        gemm.set_backend("onednn")
    with gemm.use_backend("auto"):
        assert gemm.resolved_backend() == "aten"


def test_the_environment_variable_is_read_and_checked(monkeypatch):
    monkeypatch.setattr(backend, "_state", {})
    monkeypatch.setenv("SPARSEROUTE_GEMM", "aten")
    assert gemm.get_backend() == "aten"
    monkeypatch.setattr(backend, "_state", {})
    monkeypatch.setenv("SPARSEROUTE_GEMM", "blas")
    with pytest.raises(ValueError, match=r"\$SPARSEROUTE_GEMM: unknown GEMM backend 'blas'"):
        gemm.get_backend()


@needs_onednn
@needs_kernels
@pytest.mark.parametrize("T, D, E, differ", [(256, 96, 4, True), (77, 50, 3, False)])
def test_the_kernel_takes_the_backend_of_its_forward(T, D, E, differ):
    """The compiled kernel runs its products on the backend chosen at the forward (its backward
    too, even if the switch changed in between): each backend's results are reproducible, both
    equal the reference, and at D = 96 they differ in the last bits (at D = 50 the two libraries
    happen to sum in the same order). With oneDNN the kernel pads each expert's rows with zero
    rows to a multiple of 32; odd row counts and D = 50 check that the padding adds nothing."""
    torch.manual_seed(0)
    moe = MoE(D, 80, E, 2)
    x, g = torch.randn(T, D), torch.randn(T, D)

    def step(backend_fwd, backend_bwd):
        moe.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        with gemm.use_backend(backend_fwd):
            y, _ = moe(xr, dispatch="parallel")
        with gemm.use_backend(backend_bwd):
            y.backward(g)
        return [y.detach(), xr.grad] + [p.grad.clone() for p in moe.experts.parameters()]

    aten, onednn = step("aten", "aten"), step("onednn", "onednn")
    assert all(torch.equal(a, b) for a, b in zip(onednn, step("onednn", "aten")))
    assert all(torch.equal(a, b) for a, b in zip(aten, step("aten", "onednn")))
    assert differ == (not all(torch.equal(a, b) for a, b in zip(aten, onednn)))  # two libraries ran
    moe.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    y, _ = moe(xr, dispatch="reference")
    y.backward(g)
    expected = [y.detach(), xr.grad] + [p.grad.clone() for p in moe.experts.parameters()]
    for got in (aten, onednn):
        for a, b in zip(got, expected):
            assert_close(a, b, rtol=1e-4, atol=1e-5)


_SHAPES_SCRIPT = """
import sys
import torch
from sparseroute.kernels import extension as cpu_kernels
kernels = cpu_kernels.load()
dtype = getattr(torch, "{dtype}")
backends = [int(b) for b in sys.argv[1].split(",")]
# asked before the products below, so that its own probes are not among them
assert kernels.onednn_usable() and kernels.onednn_usable_for(torch.empty(0, dtype=dtype))
torch.manual_seed(0)
T, D, F, E = 150, 40, 24, 3
counts = [33, 47, 70]  # 150 rows, one token each
x, w_S = torch.randn(T, D, dtype=dtype), torch.rand(T, dtype=dtype)
w_in, w_out = torch.randn(E, D, 2 * F, dtype=dtype), torch.randn(E, F, D, dtype=dtype)
tok_S = torch.randperm(T)
print("KERNEL START", flush=True)
out, h, a, s = kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, counts, 0, 1, backends)
kernels.mlp_backward(torch.randn(T, D, dtype=dtype), x, w_S, w_in, w_out, tok_S, counts, h, a, s, 0, [True] * 4, 1, backends)
print("KERNEL END", flush=True)
"""


@needs_onednn
@pytest.mark.parametrize("dtype, tag", [("float32", "f32"), ("bfloat16", "bf16")])
def test_the_kernel_pads_rows_so_that_onednn_shapes_repeat(dtype, tag):
    """oneDNN builds a kernel per exact shape; the expert kernel pads each expert's rows to a
    multiple of 32 so that changing loads reuse them: every product it runs on oneDNN has 32k
    rows, or (the weight gradients) sums over 32k rows, whatever the loads (here 33, 47 and 70).
    The weight gradients take x^T and a^T as transposed views (oneDNN's "ba" source), not copies.
    The same in bfloat16, which the kernel also runs on oneDNN where oneDNN's bfloat16 matmul
    runs on the CPU (torch's own bfloat16 matmul would build a kernel per exact shape). Each
    product runs exactly where the backends list says: in float32 on the kernel's own row
    products where those run (AVX-512, a multiple of 16 columns: here x @ w_in and x^T dL/dh,
    48 columns, but not the others, with 40 or 24 columns), the others on oneDNN; oneDNN sees
    exactly the products on oneDNN."""
    import os
    import re
    import subprocess
    import sys

    from sparseroute.kernels import codes
    from sparseroute.kernels import extension as cpu_kernels

    kernels = cpu_kernels.load()  # built by the session fixture, so the child only loads it
    if kernels is None or not kernels.onednn_usable_for(torch.empty(0, dtype=getattr(torch, dtype))):
        pytest.skip(f"oneDNN's {dtype} matmul does not run on this CPU (or no compiled kernels)")
    D, F = 40, 24

    def own(product):  # a product the kernel can run itself: float32, AVX-512, a multiple of 16 columns
        return dtype == "float32" and kernels.row_gemm_runs(codes.expert_matrix(product, D, F, 2 * F)[1])

    names = ["own" if own(p) else "onednn" for p in codes.PRODUCTS]
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    script = _SHAPES_SCRIPT.replace("{dtype}", dtype)
    arg = ",".join(map(str, codes.backend_codes(names)))
    run = subprocess.run([sys.executable, "-c", script, arg], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.split("KERNEL START")[1].split("KERNEL END")[0].splitlines()
    products = [
        (tuple(map(int, m.groups())), f"src:{tag}::blocked:ba" in ln)
        for ln, m in ((ln, re.search(r",(\d+)x(\d+):(\d+)x(\d+),", ln)) for ln in lines if ",exec," in ln and ",matmul," in ln)
        if m and f"src:{tag}:" in ln
    ]
    # x @ w_in, a @ w_out, g @ w_out^T, dL/dh @ w_in^T (columns 2F, D, F, D); x^T dL/dh, a^T g (2F, D)
    on_onednn = dict(zip(codes.PRODUCTS, (n == "onednn" for n in names)))
    row_wise = sum(on_onednn[p] for p in ("up", "down", "grad_act", "grad_x"))
    sums = sum(on_onednn[p] for p in ("grad_w_in", "grad_w_out"))
    if dtype == "float32" and kernels.row_gemm_runs(16):
        assert (row_wise, sums) == (3, 1)  # only x @ w_in and x^T dL/dh (48 columns) run on the kernel's own
    assert len(products) == (row_wise + sums) * 3  # each product on oneDNN once per expert, three experts
    rows, grads = [], []
    for (m, k, k2, n), transposed in products:
        assert k == k2
        if m in (D, F):  # a weight gradient, x^T dL/dh or g^T a: a sum over the padded rows
            grads.append(k)
            assert transposed and k % 32 == 0, (m, k, n)
        else:
            rows.append(m)
            assert not transposed
    # the row-wise products have 32k rows (33, 47 -> 64; 70 -> 96), as have the weight gradients' sums
    assert set(rows) == set(grads) == {64, 96}
    assert len(grads) == sums * 3


def test_the_kernels_onednn_matmul_checks_its_arguments():
    from sparseroute.kernels import extension as cpu_kernels

    kernels = cpu_kernels.load()
    if kernels is None or not kernels.onednn_usable():
        pytest.skip("oneDNN's matmul is not reachable here")
    a, b = torch.randn(8, 5), torch.randn(5, 6)
    out = torch.empty(8, 6)
    kernels.onednn_mm(a.t().contiguous().t(), b, out)  # a transposed-dense operand is fine
    assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.onednn_mm(a, b, torch.empty(8, 5))
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        kernels.onednn_mm(a.double(), b.double(), out.double())
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.onednn_mm(a, b, torch.empty(6, 8).t())

