"""The block-sparse attention executor: each query block attends only to the key blocks its
selection names.

Legend: B batch, H query heads, Hkv kv-heads (G = H / Hkv), S sequence (padded to Sp = N·bs),
Dh head dim, bs block size, N blocks, K slots, R = G·bs query rows of a (kv-head, query block),
C query blocks processed together, BH = B·Hkv.

Backends (``backend=``):

- ``"kernel"`` (CPU default where the compiled kernels are built, float32/float64): the
  ``sparseroute::block_attention`` op (:mod:`sparseroute.kernels.ops`): per query block, the
  selected K/V blocks are copied together, softmax and products run in cache, and only the output
  and the per-row log-sum-exp are kept; backward recomputes the probabilities per query block.
- ``"gather"`` (any device, pure PyTorch): an ``autograd.Function`` that, for a chunk of query
  blocks at a time, gathers only the selected K/V blocks, takes the softmax over them, and saves
  only the output and the per-row log-sum-exp; backward recomputes the probabilities chunk by
  chunk (a flash-attention-style backward). Its memory is the inputs and outputs plus one
  chunk's scores, independent of S² and of how many blocks are kept in total.
- ``"flex"`` (CUDA): the selection as a FlexAttention ``BlockMask``, run by the compiled
  ``flex_attention`` (:mod:`sparseroute.attention.flex`).
- ``"reference"``: :func:`sparseroute.attention.masked_reference` (dense, for tests).
- ``"auto"``: ``flex`` on CUDA when FlexAttention is available and there is no ``key_bias``;
  ``kernel`` on the CPU in float32/float64 when the compiled kernels are loaded; else ``gather``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseroute.attention.reference import masked_reference
from sparseroute.attention.selection import check_selection, normalize_block_indices
from sparseroute.kernels import ops

__all__ = ["block_sparse_attention", "BACKENDS", "CHUNK_ELEMENTS"]

BACKENDS = ("auto", "kernel", "gather", "flex", "reference")

#: score-matrix elements one chunk of query blocks may hold (fp32: 4 bytes each); bounds the
#: executor's working memory (scores, probability gradients, gathered K/V of a chunk)
CHUNK_ELEMENTS = 1 << 22


def _chunk_blocks(BH: int, R: int, K: int, bs: int, N: int) -> int:
    per_block = max(1, BH * R * K * bs)
    return max(1, min(N, CHUNK_ELEMENTS // per_block))


def _rows_layout(q: Tensor, Hkv: int, G: int, N: int, bs: int) -> Tensor:
    """q [B, H, S, Dh] -> [BH, N, R, Dh] (rows of one query block: G heads x bs positions)."""
    B, H, S, Dh = q.shape
    Sp = N * bs
    if Sp != S:
        q = torch.nn.functional.pad(q, (0, 0, 0, Sp - S))
    return q.view(B, Hkv, G, N, bs, Dh).permute(0, 1, 3, 2, 4, 5).reshape(B * Hkv, N, G * bs, Dh)


def _rows_unlayout(x: Tensor, B: int, Hkv: int, G: int, N: int, bs: int, S: int) -> Tensor:
    """Inverse of :func:`_rows_layout`: [BH, N, R, Dh] -> [B, H, S, Dh]."""
    Dh = x.shape[-1]
    out = x.view(B, Hkv, N, G, bs, Dh).permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv * G, N * bs, Dh)
    return out[:, :, :S] if N * bs != S else out


def _blocks_layout(k: Tensor, N: int, bs: int) -> Tensor:
    """k [B, Hkv, S, Dh] -> [BH·N, bs, Dh] (one row per key block)."""
    B, Hkv, S, Dh = k.shape
    Sp = N * bs
    if Sp != S:
        k = torch.nn.functional.pad(k, (0, 0, 0, Sp - S))
    return k.reshape(B * Hkv * N, bs, Dh)


class _Chunk:
    """Index bookkeeping of query blocks [n0, n1) (shared by forward and backward)."""

    def __init__(self, idx_BHNK: Tensor, n0: int, n1: int, N: int, bs: int, G: int, key_bias_b: Tensor | None,
                 dtype: torch.dtype):
        BH, _, K = idx_BHNK.shape
        dev = idx_BHNK.device
        idx = idx_BHNK[:, n0:n1]  # [BH, C, K]
        self.C = n1 - n0
        valid = idx >= 0
        base = torch.arange(BH, device=dev).view(BH, 1, 1) * N
        self.flat = (base + idx.clamp_min(0)).reshape(-1)  # block rows to gather / scatter into
        # allowed[bh, c, r, slot*bs + j]: the slot is used and its key is not after the query
        own = idx == torch.arange(n0, n1, device=dev).view(1, -1, 1)  # [BH, C, K]
        j = torch.arange(bs, device=dev)
        r_in_block = torch.arange(G * bs, device=dev) % bs
        after = j.view(1, bs) > r_in_block.view(G * bs, 1)  # [R, bs]: key j is after row r
        # additive mask [BH, C, R, K*bs]: -inf where not read, else 0 (+ the key bias)
        blocked = (~valid).view(BH, self.C, 1, K, 1) | (own.view(BH, self.C, 1, K, 1) & after.view(1, 1, G * bs, 1, bs))
        bias = torch.zeros(blocked.shape[:2] + (G * bs, K, bs), device=dev, dtype=dtype)
        bias.masked_fill_(blocked.expand_as(bias), float("-inf"))
        if key_bias_b is not None:  # the key bias of the gathered keys, [BH, C, 1, K, bs]
            bias = bias + key_bias_b.index_select(0, self.flat).view(BH, self.C, 1, K, bs).to(dtype)
        self.bias = bias.view(BH * self.C, G * bs, K * bs)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx_BHNK, key_bias, bs: int, scale: float):
        B, H, S, Dh = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        N = idx_BHNK.shape[2]
        K = idx_BHNK.shape[3]
        BH, R = B * Hkv, G * bs
        q_r = _rows_layout(q, Hkv, G, N, bs)
        k_b = _blocks_layout(k, N, bs)
        v_b = _blocks_layout(v, N, bs)
        kb_bias = None if key_bias is None else _blocks_layout(key_bias.unsqueeze(-1), N, bs).view(BH * N, bs)
        idx = idx_BHNK.reshape(BH, N, K)
        out_r = torch.empty(BH, N, R, Dh, dtype=q.dtype, device=q.device)
        # float32 at least: the backward's exp(s - lse) needs the log-sum-exp to full precision
        acc = torch.promote_types(q.dtype, torch.float32)
        lse_r = torch.empty(BH, N, R, dtype=acc, device=q.device)
        step = _chunk_blocks(BH, R, K, bs, N)
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            ch = _Chunk(idx, n0, n1, N, bs, G, kb_bias, q.dtype)
            qc = q_r[:, n0:n1].reshape(BH * ch.C, R, Dh)
            kc = k_b.index_select(0, ch.flat).view(BH * ch.C, K * bs, Dh)
            vc = v_b.index_select(0, ch.flat).view(BH * ch.C, K * bs, Dh)
            s = torch.baddbmm(ch.bias, qc, kc.transpose(1, 2), alpha=scale)
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, 0.0)
            s.sub_(m).exp_()
            l = s.sum(-1, keepdim=True)
            o = torch.bmm(s, vc)
            o.div_(l.clamp_min(torch.finfo(l.dtype).tiny))
            out_r[:, n0:n1] = o.view(BH, ch.C, R, Dh)
            # rows that read nothing: lse = +inf so that backward's exp(s - lse) is 0
            lse_r[:, n0:n1] = torch.where(l > 0, m + l.log(), float("inf")).view(BH, ch.C, R).to(acc)
        ctx.save_for_backward(q, k, v, idx_BHNK, key_bias, out_r, lse_r)
        ctx.bs, ctx.scale = bs, scale
        return _rows_unlayout(out_r, B, Hkv, G, N, bs, S)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, idx_BHNK, key_bias, out_r, lse_r = ctx.saved_tensors
        bs, scale = ctx.bs, ctx.scale
        B, H, S, Dh = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        N, K = idx_BHNK.shape[2], idx_BHNK.shape[3]
        BH, R = B * Hkv, G * bs
        q_r = _rows_layout(q, Hkv, G, N, bs)
        do_r = _rows_layout(grad_out.contiguous(), Hkv, G, N, bs)
        k_b = _blocks_layout(k, N, bs)
        v_b = _blocks_layout(v, N, bs)
        kb_bias = None if key_bias is None else _blocks_layout(key_bias.unsqueeze(-1), N, bs).view(BH * N, bs)
        idx = idx_BHNK.reshape(BH, N, K)
        dq_r = torch.empty_like(q_r)
        dk_b = torch.zeros_like(k_b)
        dv_b = torch.zeros_like(v_b)
        dbias_b = None if key_bias is None else torch.zeros(BH * N, bs, dtype=lse_r.dtype, device=q.device)
        # D_i = rowsum(dO ∘ O): the softmax backward's correction term
        delta_r = (do_r * out_r).sum(-1, dtype=lse_r.dtype)
        step = _chunk_blocks(BH, R, K, bs, N)
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            ch = _Chunk(idx, n0, n1, N, bs, G, kb_bias, q.dtype)
            qc = q_r[:, n0:n1].reshape(BH * ch.C, R, Dh)
            doc = do_r[:, n0:n1].reshape(BH * ch.C, R, Dh)
            kc = k_b.index_select(0, ch.flat).view(BH * ch.C, K * bs, Dh)
            vc = v_b.index_select(0, ch.flat).view(BH * ch.C, K * bs, Dh)
            p = torch.baddbmm(ch.bias, qc, kc.transpose(1, 2), alpha=scale)
            p.sub_(lse_r[:, n0:n1].reshape(BH * ch.C, R, 1).to(p.dtype)).exp_()
            dv_c = torch.bmm(p.transpose(1, 2), doc)  # [BH·C, K·bs, Dh]
            ds = torch.bmm(doc, vc.transpose(1, 2))
            ds.sub_(delta_r[:, n0:n1].reshape(BH * ch.C, R, 1).to(ds.dtype)).mul_(p)
            dq_r[:, n0:n1] = torch.bmm(ds, kc).mul_(scale).view(BH, ch.C, R, Dh)
            dk_c = torch.bmm(ds.transpose(1, 2), qc).mul_(scale)
            dk_b.index_add_(0, ch.flat, dk_c.view(-1, bs, Dh))
            dv_b.index_add_(0, ch.flat, dv_c.view(-1, bs, Dh))
            if dbias_b is not None:
                dbias_b.index_add_(0, ch.flat, ds.sum(1).view(-1, bs).to(dbias_b.dtype))
        dq = _rows_unlayout(dq_r, B, Hkv, G, N, bs, S)
        dk = dk_b.view(B, Hkv, N * bs, Dh)[:, :, :S]
        dv = dv_b.view(B, Hkv, N * bs, Dh)[:, :, :S]
        dbias = None
        if dbias_b is not None:
            dbias = dbias_b.view(B, Hkv, N * bs)[:, :, :S].to(key_bias.dtype)
        return dq, dk, dv, None, dbias, None, None


def _kernel_usable(q: Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and ops.available()


def _flex_available(q: Tensor) -> bool:
    if q.device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    key_bias: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of each query over the key blocks its selection names (causal inside its own
    block, never a future block); q [B, H, S, Dh], k/v [B, Hkv, S, Dh], block_indices
    [B, Hkv, ceil(S / block_size), K] int64 (-1 = unused); returns [B, H, S, Dh]. Forward and
    backward (q, k, v and ``key_bias`` [B, Hkv, S]). Equals :func:`masked_reference`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    check_selection(q, k, v, block_indices, block_size)
    if key_bias is not None and key_bias.shape != (q.shape[0], k.shape[1], q.shape[2]):
        raise ValueError(
            f"key_bias must be [B, Hkv, S] = {(q.shape[0], k.shape[1], q.shape[2])}; got {tuple(key_bias.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        if key_bias is None and _flex_available(q):
            backend = "flex"
        elif _kernel_usable(q):
            backend = "kernel"
        else:
            backend = "gather"
    if backend == "reference":
        return masked_reference(q, k, v, block_indices, block_size, scale=scale, key_bias=key_bias)
    if backend == "flex":
        if key_bias is not None:
            raise ValueError("backend='flex' does not take a key_bias; use backend='gather'")
        from sparseroute.attention.flex import flex_block_sparse_attention

        return flex_block_sparse_attention(q, k, v, block_indices, block_size, scale=scale)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    idx = normalize_block_indices(block_indices)
    if backend == "kernel":
        if not _kernel_usable(q):
            raise ValueError(
                "backend='kernel' needs the compiled kernels (sparseroute kernels build) and float32/float64 "
                f"CPU tensors; got {q.dtype} on {q.device.type}"
            )
        if key_bias is not None:
            key_bias = key_bias.to(q.dtype)
        return ops.block_attention(q, k, v, idx, key_bias, block_size, scale)
    return _BlockSparseAttention.apply(q, k, v, idx, key_bias, block_size, scale)
