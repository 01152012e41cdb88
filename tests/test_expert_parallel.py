"""The compiled expert-parallel executor ("parallel"): it builds, it is deterministic for a thread
count, and it refuses what it cannot run (its gradcheck is in test_dispatch_gradcheck.py)."""

import os
import warnings

import pytest
import torch
from torch.testing import assert_close

from sparseroute.kernels import extension as cpu_kernels
from sparseroute.moe import MoE


def test_kernel_builds():
    """The kernel must build wherever the test suite runs (a compiler and ninja are part of the
    dev install); only an explicit SPARSEROUTE_NO_EXTENSIONS=1 turns it off."""
    module = cpu_kernels.load()
    if os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1":
        assert module is None and "SPARSEROUTE_NO_EXTENSIONS" in cpu_kernels.unavailable_reason()
    else:
        assert module is not None, cpu_kernels.unavailable_reason()


def _train_step(moe, x, g, dispatch):
    moe.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_()
    y, r = moe(xr, dispatch=dispatch)
    torch.autograd.backward([y, sum(r.losses.values())], [g, None])
    return [y.detach(), xr.grad] + [p.grad.clone() for p in moe.parameters()]


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_deterministic_for_a_thread_count_and_close_across_counts(threads):
    torch.manual_seed(0)
    moe = MoE(32, 24, 6, 2)
    x, g = torch.randn(200, 32), torch.randn(200, 32)
    first = _train_step(moe, x, g, "parallel")
    again = _train_step(moe, x, g, "parallel")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    torch.set_num_threads(1)
    single = _train_step(moe, x, g, "parallel")
    ref = _train_step(moe, x, g, "reference")
    for a, b, r in zip(first, single, ref):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.fixture
def stealing():
    """The work-sharing switches of the kernel, restored afterwards."""
    kernels = cpu_kernels.load()
    yield kernels
    kernels._set_owner_delay_us(0)
    kernels._set_fail_stolen(False)
    kernels._set_stealing(True)


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_stolen_pieces_give_the_same_results_to_the_bit(threads, stealing, activation):
    """With part 0's thread held back before each of its pieces, the other thread takes pieces
    of part 0; the outputs and every gradient equal those of a run where nobody steals."""
    torch.manual_seed(0)
    moe = MoE(32, 24, 16, 2, activation=activation)
    x, g = torch.randn(300, 32), torch.randn(300, 32)
    stealing._set_stealing(False)
    before = stealing._steals()
    alone = _train_step(moe, x, g, "parallel")
    assert stealing._steals() == before
    stealing._set_stealing(True)
    stealing._set_owner_delay_us(3000)
    shared = _train_step(moe, x, g, "parallel")
    assert stealing._steals() >= before + 2  # in the forward and in the backward
    for a, b in zip(alone, shared):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_an_error_in_a_stolen_piece_reaches_the_caller(threads, stealing):
    """The owner of a stolen piece that raised stops waiting for it: the call raises instead of
    hanging, and the next call works."""
    torch.manual_seed(0)
    moe = MoE(32, 24, 16, 2)
    x, g = torch.randn(300, 32), torch.randn(300, 32)
    stealing._set_owner_delay_us(3000)
    stealing._set_fail_stolen(True)
    with pytest.raises(RuntimeError, match="stolen piece failed"):
        _train_step(moe, x, g, "parallel")
    stealing._set_fail_stolen(False)
    stealing._set_owner_delay_us(0)
    for a, b in zip(_train_step(moe, x, g, "parallel"), _train_step(moe, x, g, "reference")):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_refuses_activations_and_devices_it_lacks(monkeypatch):
    """Every activation sparseroute has runs in the kernel; one it lacked (here: GELU, removed
    from its table) would be refused with the reason, and auto would take the Python loop."""
    from sparseroute.moe import dispatch

    monkeypatch.setattr(dispatch, "KERNEL_ACTIVATIONS", {"swiglu": 0})
    moe = MoE(8, 8, 4, 2, activation="gelu")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="these use 'gelu'"):
        moe(x, dispatch="parallel")
    y_auto, _ = moe(x, dispatch="auto")
    assert torch.equal(y_auto, moe(x, dispatch="fused")[0])
    assert "CPU only" in dispatch._parallel_refusal(MoE(8, 8, 4, 2).experts, torch.device("meta"))


def test_dispatch_modes_see_every_op():
    """Under a Python dispatch mode (here torch's FLOP counter) auto takes the Python loop, whose
    ops the mode sees, and an explicit "parallel" says why it cannot run."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    moe = MoE(16, 8, 4, 2)
    x = torch.randn(10, 16)
    counts = {}
    for dispatch in ("auto", "fused"):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            moe(x, dispatch=dispatch)
        counts[dispatch] = counter.get_total_flops()
    assert counts["auto"] == counts["fused"] > 2 * 10 * 16 * 4  # more than the router's matmul
    with FlopCounterMode(display=False), pytest.raises(ValueError, match="dispatch mode"):
        moe(x, dispatch="parallel")


def test_without_the_kernel_parallel_raises_and_auto_warns_once(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {"error": "RuntimeError: no compiler"})
    monkeypatch.setattr("sparseroute.moe.dispatch._warned_unavailable", False)
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, 2)
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="compiled kernel is unavailable .*no compiler"):
        moe(x, dispatch="parallel")
    with pytest.warns(UserWarning, match="no compiler"):
        y, _ = moe(x, dispatch="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        y2, _ = moe(x, dispatch="auto")
    assert_close(y, moe(x, dispatch="fused")[0], rtol=0, atol=0)
    assert torch.equal(y, y2)


@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (37, 3, 5), (500, 8, 64)])
def test_counting_sort_equals_the_argsort(T, K, E):
    """The kernel's one-pass counting sort gives exactly the stable argsort's order, tokens and
    counts, unused (-1) slots included."""
    from sparseroute.moe.dispatch import sort_by_expert
    from sparseroute.routing import Routing

    kernels = cpu_kernels.load()
    gen = torch.Generator().manual_seed(T + K + E)
    indices = torch.randint(-1, E, (T, K), generator=gen)
    routing = Routing(indices, torch.rand(T, K, generator=gen), E)
    order, tok, counts = sort_by_expert(routing)
    k_order, k_tok, k_counts = kernels.sort_by_expert(indices, E)
    assert torch.equal(k_order, order) and torch.equal(k_tok, tok)
    assert k_counts == counts.tolist()
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.sort_by_expert(torch.full((2, 1), E), E)


def test_kernel_rejects_inconsistent_layouts():
    """Counts that do not cover the sorted rows, or name the wrong number of experts, unknown
    activation codes, tokens out of range and badly laid-out inputs are refused with a message,
    not read out of bounds."""
    kernels = cpu_kernels.load()
    x, w_S, tok_S = torch.randn(4, 3), torch.rand(4), torch.arange(4)
    w_in, w_out = torch.randn(2, 3, 10), torch.randn(2, 5, 3)
    with pytest.raises(RuntimeError, match="counts sum to 3 rows, tok_S has 4"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [1, 2], 0, 2, 0)
    with pytest.raises(RuntimeError, match="3 counts for 2 experts"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [1, 2, 1], 0, 2, 0)
    with pytest.raises(RuntimeError, match="unknown GEMM backend code 2"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 0, 2, 2)
    with pytest.raises(RuntimeError, match="unknown activation code 7"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 7, 2, 0)
    with pytest.raises(RuntimeError, match="10 columns for F = 5"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 1, 2, 0)  # GELU wants [E, D, F]
    # the row loops index x and the gradient with the tokens unchecked: the plan checks them once
    w_in = torch.randn(2, 3, 5)
    for bad in (torch.tensor([0, 1, 2, 4]), torch.tensor([0, -1, 2, 3])):
        with pytest.raises(RuntimeError, match=f"token {bad[bad.ne(torch.arange(4))].item()} out of range for 4 tokens"):
            kernels.mlp_forward(x, w_S, w_in, w_out, bad, [2, 2], 1, 2, 0)
    with pytest.raises(RuntimeError, match="tok_S must be a contiguous 1-D int64"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S.int(), [2, 2], 1, 2, 0)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        kernels.mlp_forward(torch.randn(3, 4).t(), w_S, w_in, w_out, tok_S, [2, 2], 1, 2, 0)
    out, h, a, s = kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 1, 2, 0)
    with pytest.raises(RuntimeError, match="output gradient must be a contiguous tensor of x's shape"):
        kernels.mlp_backward(torch.randn(4, 2), x, w_S, w_in, w_out, tok_S, [2, 2], h, a, s, 1, [True] * 4, 2, 0)


def _swiglu_activations(kernels, gate: torch.Tensor, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's weighted SwiGLU activations a of one row with this gate, up = 1 and routing
    weight 1, as the backward recomputes them: w_out's gradient for an output gradient of 1 is
    a^T · 1 = a (one row, on ATen: no padding rows). Also the forward's saved a and s."""
    F = gate.numel()
    w_in = torch.cat([gate, torch.ones(F)]).reshape(1, 1, 2 * F)
    x, w_S, tok_S, w_out = torch.ones(1, 1), torch.ones(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, F, 1)
    _, h, a, s = kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [1], 0, 1, 0)
    g_out = kernels.mlp_backward(torch.ones(1, 1), x, w_S, w_in, w_out, tok_S, [1], h, a, s, 0, needs, 1, 0)[3]
    return g_out[0, :, 0], a, s


def test_kernel_swiglu_sigmoid_matches_torch():
    """The SwiGLU pass computes sigmoid(gate) itself (a vectorisable exp): with up = 1 and routing
    weight 1 the weighted activation is gate * sigmoid(gate), within 3 ulp of torch's where that
    is not vanishingly small, about 0 below, NaN kept. Neither it nor the sigmoid is kept for the
    backward, which recomputes the activations: alone (only w_out's gradient asked for) or in
    the pass that computes dL/dh, to the same bits."""
    kernels = cpu_kernels.load()
    gate = torch.cat([torch.linspace(-100, 100, 40001), torch.tensor([0.0, -0.0, float("inf"), 1e-30])])
    a, saved_a, s = _swiglu_activations(kernels, gate, [False, False, False, True])
    assert saved_a.numel() == 0 and s.numel() == 0
    fused, _, _ = _swiglu_activations(kernels, gate, [True, True, True, True])
    assert torch.equal(a.view(torch.int32), fused.view(torch.int32))
    ref = gate * torch.sigmoid(gate)
    big = (gate.abs() > 1e-20) & gate.isfinite() & (gate > -80)
    ulps = (a.view(torch.int32) - ref.view(torch.int32)).abs()
    assert int(ulps[big].max()) <= 3
    assert float(a[gate <= -80].abs().max()) < 1e-30
    assert float(a[gate == float("inf")]) == float("inf") and float(a[gate == 0].abs().max()) == 0.0
    for needs in ([False, False, False, True], [True, True, True, True]):
        assert _swiglu_activations(kernels, torch.tensor([float("nan")]), needs)[0].isnan().all()


def test_kernel_row_products_equal_torch_for_every_tail():
    """The kernel's own float32 row products (the forward's, on AVX-512): rows gathered by index
    (repeats included) or dense, row counts that leave every remainder of the 6-row blocks,
    column counts that leave every remainder of the 64-column tiles, B's rows taken from a wider
    matrix. Each output is a sum in k order, so a row's result does not depend on where it falls:
    the same rows in reverse order give the same bits."""
    kernels = cpu_kernels.load()
    if not kernels._row_gemm_runs(16):
        pytest.skip("the kernel's own row products need AVX-512")
    assert not kernels._row_gemm_runs(40) and not kernels._row_gemm_runs(8)
    gen = torch.Generator().manual_seed(0)
    for n, K, N, wide in [(1, 1, 16, 16), (5, 3, 32, 48), (6, 24, 48, 48), (7, 128, 64, 80), (13, 40, 80, 80),
                          (64, 512, 256, 256), (23, 128, 112, 128)]:
        A = torch.randn(50, K, generator=gen)
        B = torch.randn(K, wide, generator=gen)
        idx = torch.randint(0, 50, (n,), generator=gen)
        idx[: n // 2] = idx[0]  # repeated rows
        got = kernels._row_gemm(A, idx, B, N)
        want = (A.double()[idx] @ B.double()[:, :N]).float()
        assert_close(got, want, rtol=1e-5, atol=1e-5 * K**0.5)
        rev = kernels._row_gemm(A, idx.flip(0).contiguous(), B, N)
        assert torch.equal(rev.flip(0).view(torch.int32), got.view(torch.int32))
        dense = kernels._row_gemm(A[:n].contiguous(), torch.empty(0, dtype=torch.long), B, N)
        assert_close(dense, (A.double()[:n] @ B.double()[:, :N]).float(), rtol=1e-5, atol=1e-5 * K**0.5)
    assert kernels._row_gemm(torch.empty(0, 8), torch.empty(0, dtype=torch.long), torch.randn(8, 16), 16).shape == (0, 16)


def test_kernel_sums_over_rows_equal_torch_for_every_tail():
    """The kernel's own weight-gradient products, A[ia]^T B[ib]: rows of A or B read by index
    (repeats included) or in order, row counts around the 128-row chunks, output rows that leave
    every remainder of the 6-row tiles, columns every remainder of the 64-column tiles; no rows
    give zeros."""
    kernels = cpu_kernels.load()
    if not kernels._row_gemm_runs(16):
        pytest.skip("the kernel's own row products need AVX-512")
    gen = torch.Generator().manual_seed(1)
    none = torch.empty(0, dtype=torch.long)
    for n, M, N in [(1, 1, 16), (5, 7, 32), (127, 13, 48), (128, 6, 64), (129, 24, 80), (300, 512, 256), (257, 128, 112)]:
        A, B = torch.randn(n + 9, M, generator=gen), torch.randn(n + 4, N, generator=gen)
        ia, ib = torch.randint(0, n + 9, (n,), generator=gen), torch.randint(0, n + 4, (n,), generator=gen)
        ia[: n // 3] = ia[0]
        for a_idx, b_idx in [(ia, ib), (ia, none), (none, ib)]:
            a_rows = A[a_idx] if a_idx.numel() else A[:n]
            b_rows = B[b_idx] if b_idx.numel() else B[:n]
            got = kernels._row_gemm_tn(A if a_idx.numel() else A[:n].contiguous(), a_idx,
                                       B if b_idx.numel() else B[:n].contiguous(), b_idx)
            want = (a_rows.double().t() @ b_rows.double()).float()
            assert_close(got, want, rtol=1e-5, atol=1e-5 * n**0.5)
    zeros = kernels._row_gemm_tn(torch.empty(0, 5), none, torch.empty(0, 32), none)
    assert zeros.shape == (5, 32) and not zeros.any()


def test_kernel_transpose_for_every_edge():
    """The transpose the backward's own products take the expert weights through (16 x 16 blocks
    in registers, the edges one value at a time) moves every value to its place."""
    kernels = cpu_kernels.load()
    if not kernels._row_gemm_runs(16):
        pytest.skip("the kernel's own row products need AVX-512")
    for R, C in [(16, 16), (32, 48), (17, 33), (512, 256), (5, 3), (1, 40), (40, 1), (0, 16), (31, 15)]:
        x = torch.randn(R, C)
        assert torch.equal(kernels._transpose(x), x.t().contiguous()), (R, C)


def test_kernel_bf16_conversions_round_as_torch_does():
    """The elementwise loops convert bfloat16 by integer arithmetic (so that they vectorize): the
    same bits as torch's conversion for every float32 that is not NaN (round to nearest, ties to
    even: halfway cases, overflow to inf, subnormals, -0.0), NaN to NaN, and back exactly."""
    kernels = cpu_kernels.load()
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = (torch.randint(0, 2**15, (4096,), generator=gen, dtype=torch.int32) << 16) | 0x8000  # halfway up
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.3895314e38, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45,
                            1.1754942e-38, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32), -ties.view(torch.float32), special])
    b, back = kernels._bf16_round_trip(x)
    nan = x.isnan()
    assert int(nan.sum()) > 1000  # random bit patterns include many NaNs
    expected = x.to(torch.bfloat16)
    assert torch.equal(b[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert b[nan].isnan().all()
    assert torch.equal(back[~nan].view(torch.int32), b[~nan].float().view(torch.int32))
    assert back[nan].isnan().all()


@pytest.fixture
def workspace():
    """The buffer pool on with room to spare; its limits restored afterwards."""
    before = cpu_kernels.workspace_state()
    cpu_kernels.set_workspace_limits(64, 1 << 30)
    yield
    cpu_kernels.set_workspace_limits(before["slots"], before["max_bytes"])


def _kernel_forward(kernels, seed=0):
    torch.manual_seed(seed)
    T, D, E, F = 40, 16, 4, 12  # h [80, 24]: no other buffer of its size
    x, w_S = torch.randn(T, D), torch.rand(2 * T)
    w_in, w_out = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    tok_S = torch.arange(2 * T) % T
    return kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [20, 20, 20, 20], 0, 2, 0)


def test_workspace_reuses_a_buffer_only_once_nothing_uses_it(workspace):
    """The kernel's buffers come back for a later call only after every tensor on them (the
    returned one, a view of it) is gone; results never depend on the reuse."""
    kernels = cpu_kernels.load()
    out, h, _, _ = _kernel_forward(kernels)  # SwiGLU: no saved activations besides h
    first = {t.data_ptr() for t in (out, h)}
    h_first = h.clone()
    out2, h2, _, _ = _kernel_forward(kernels)  # out and h alive: neither of their buffers
    assert first.isdisjoint({t.data_ptr() for t in (out2, h2)})
    assert torch.equal(h2, h_first) and torch.equal(out2, out)
    view, h_ptr = h[3:], h.data_ptr()
    del out, h, out2, h2
    out3, h3, _, _ = _kernel_forward(kernels, seed=1)  # h's buffer is held by the view
    assert h_ptr not in {out3.data_ptr(), h3.data_ptr()}
    assert torch.equal(view, h_first[3:])  # the data under the view is untouched
    del view, out3, h3
    _kernel_forward(kernels)  # settle: everything is free again
    kept = cpu_kernels.workspace_state()
    for seed in range(3):  # nothing held between calls: every buffer is a reused one
        _kernel_forward(kernels, seed)
        assert cpu_kernels.workspace_state() == kept


def _owners(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def test_workspace_buffers_have_one_owner_and_come_back_when_it_dies(workspace):
    """A pooled buffer's storage is owned by its tensor alone (as a fresh tensor's is), so
    autograd can add into it in place and take it as a .grad without a copy; when the tensor
    dies the block goes back to the pool, and the next call of the same size gets it."""
    kernels = cpu_kernels.load()
    cpu_kernels.set_workspace_limits(0, 0)  # an empty pool: no other free block of h's size
    cpu_kernels.set_workspace_limits(64, 1 << 30)
    out, h, _, _ = _kernel_forward(kernels)
    assert _owners(out) == _owners(h) == _owners(torch.empty(3))
    ptr, before = h.data_ptr(), cpu_kernels.workspace_state()
    del h
    after = cpu_kernels.workspace_state()
    assert after["kept"] == before["kept"] + 1 and after["kept_bytes"] > before["kept_bytes"]
    del out
    _, h2, _, _ = _kernel_forward(kernels, seed=1)
    assert h2.data_ptr() == ptr


def test_workspace_buffers_can_grow(workspace):
    """A pooled buffer resizes like any tensor: the data is kept and the old block comes back."""
    out, _, _, _ = _kernel_forward(cpu_kernels.load())
    first, kept = out.clone(), cpu_kernels.workspace_state()["kept"]
    out.resize_(out.shape[0] * 5, out.shape[1])  # a size no free block has
    assert torch.equal(out[: first.shape[0]], first)
    assert cpu_kernels.workspace_state()["kept"] == kept + 1


def test_workspace_keeps_live_graphs_intact(workspace):
    """Two forwards before one backward (gradient accumulation, two losses), with the cache on
    and off: the same gradients, so a graph's saved activations are never reused under it."""
    torch.manual_seed(0)
    moe = MoE(16, 8, 4, 2)
    x1, x2, g1, g2 = torch.randn(30, 16), torch.randn(30, 16), torch.randn(30, 16), torch.randn(30, 16)

    def grads():
        moe.zero_grad(set_to_none=True)
        for _ in range(2):  # the second round reuses what the first freed
            moe.zero_grad(set_to_none=True)
            y1, _ = moe(x1, dispatch="parallel")
            y2, _ = moe(x2, dispatch="parallel")
            torch.autograd.backward([y1, y2], [g1, g2])
        return [p.grad.clone() for p in moe.parameters()]

    cached = grads()
    cpu_kernels.set_workspace_limits(0, 0)
    assert cpu_kernels.workspace_state()["kept"] == 0
    for a, b in zip(cached, grads()):
        assert torch.equal(a, b)


def test_workspace_limits_are_checked_and_kept(workspace):
    with pytest.raises(ValueError, match="slots and max_bytes must be >= 0"):
        cpu_kernels.set_workspace_limits(-1, 0)
    cpu_kernels.set_workspace_limits(1, 1 << 20)
    _kernel_forward(cpu_kernels.load())
    state = cpu_kernels.workspace_state()
    assert state["slots"] == 1 and state["max_bytes"] == 1 << 20 and state["kept"] <= 1
    assert state["kept_bytes"] <= 1 << 20


def test_per_token_sums_in_runs_and_row_by_row_agree():
    """The per-token sums read each piece's rows in runs of consecutive tokens: as they are when
    the rows are in token order (as the sort leaves them), else after sorting them by token. A
    token's rows are added in piece order either way, so reversing each expert's rows changes no
    bit of the output or of x's gradient. A token no expert took gets zeros."""
    kernels = cpu_kernels.load()
    torch.manual_seed(3)
    T, D, E, F, n = 700, 24, 4, 8, 300  # blocks of 1 MiB / (24 · 4 B) tokens: several per thread
    x, g = torch.randn(T, D), torch.randn(T, D)
    w_in, w_out = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    toks = [torch.randperm(T - 1)[:n].sort().values for _ in range(E)]  # token T - 1: no rows
    results = []
    for order in (lambda t: t, lambda t: t.flip(0)):
        tok_S = torch.cat([order(t) for t in toks])
        w_S = torch.cat([order(t.float() / T) for t in toks])
        out, h, a, s = kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [n] * E, 0, 2, 0)
        gx = kernels.mlp_backward(g, x, w_S, w_in, w_out, tok_S, [n] * E, h, a, s, 0, [True, False, False, False], 2, 0)[0]
        results.append((out, gx))
    (out, gx), (out_rows, gx_rows) = results
    assert torch.equal(out, out_rows) and torch.equal(gx, gx_rows)
    assert torch.equal(out[-1], torch.zeros(D)) and torch.equal(gx[-1], torch.zeros(D))
    assert out[:-1].abs().sum(dim=1).gt(0).any()
