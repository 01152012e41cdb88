"""``dynamic_mask``: Trainable Dynamic Mask attention — a learned, query-independent bias per key
that both enters the attention logits and picks the keys.

Per kv-head h, key s gets the bias ``b_s = A_h · softplus(W_h · v_s)`` (A: [Hkv], W: [Hkv, Dh],
router parameters; v before any RoPE). The bias travels as the selection's ``key_bias``: the
executor adds it to every query's logit of that key, so A and W train through attention. The
selection is token-level whatever the layer's ``block_size`` (the routing's block size is 1, and
the layer's block size is ignored): each query t reads itself and the ``window`` keys s < t of
largest (detached) bias, all past keys when there are fewer. The bias depends on v_s only, so the
selection of t depends on positions <= t only.

The top-``window`` of every prefix is computed chunk by chunk (:func:`causal_topk_keys`): a chunk
of queries chooses among the best ``window`` keys of all earlier chunks and the chunk's own past
keys, so memory is O(S · (window + chunk)), never S².

Init: A = 1, W ~ N(0, 1/Dh) (from the global RNG, like any parameter).

Legend: B batch, H heads, Hkv kv-heads, S sequence, Dh head dim, W window, L chunk length,
K slots (= min(W, S - 1) + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.attention.routers.base import (
    ATTENTION_ROUTERS,
    AttentionRouter,
    AttentionRouterOptions,
    check_count,
)
from sparseroute.attention.selection import BlockRouting

__all__ = ["DynamicMaskOptions", "DynamicMaskRouter", "causal_topk_keys"]


@dataclass(frozen=True, kw_only=True)
class DynamicMaskOptions(AttentionRouterOptions):
    """window: past keys each query reads beside itself, chosen by the bias (>= 1)."""

    window: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("window", self.window)


def causal_topk_keys(bias_BHS: Tensor, window: int, chunk: int = 128) -> Tensor:
    """[B, Hkv, S, min(window, S - 1)] int64: for every query t the keys s < t of largest bias,
    in descending bias; -1 where t has fewer than ``window`` past keys."""
    B, Hkv, S = bias_BHS.shape
    W = max(0, min(window, S - 1))
    dev = bias_BHS.device
    out = torch.full((B, Hkv, S, W), -1, dtype=torch.long, device=dev)
    if W == 0:
        return out
    b = bias_BHS.detach().reshape(B * Hkv, S).float()
    BH = b.shape[0]
    pre_vals = torch.full((BH, W), float("-inf"), device=dev)
    pre_idx = torch.full((BH, W), -1, dtype=torch.long, device=dev)
    for t0 in range(0, S, chunk):
        t1 = min(S, t0 + chunk)
        L = t1 - t0
        vals_L = b[:, t0:t1]  # [BH, L]
        pos_L = torch.arange(t0, t1, device=dev)
        past_LL = pos_L.view(1, L) < pos_L.view(L, 1)  # [query, key]: key strictly before query
        cand_vals = torch.cat(
            [pre_vals.unsqueeze(1).expand(BH, L, W), vals_L.unsqueeze(1).masked_fill(~past_LL, float("-inf"))], dim=-1
        )
        cand_idx = torch.cat([pre_idx.unsqueeze(1).expand(BH, L, W), pos_L.view(1, 1, L).expand(BH, L, L)], dim=-1)
        top = cand_vals.topk(W, dim=-1)
        idx = cand_idx.gather(-1, top.indices)
        out.view(BH, S, W)[:, t0:t1] = torch.where(top.values > float("-inf"), idx, -1)
        # the best W keys before the next chunk
        all_vals = torch.cat([pre_vals, vals_L], dim=-1)
        all_idx = torch.cat([pre_idx, pos_L.view(1, L).expand(BH, L)], dim=-1)
        top = all_vals.topk(W, dim=-1)
        pre_vals, pre_idx = top.values, all_idx.gather(-1, top.indices)
    return out


@ATTENTION_ROUTERS.register("dynamic_mask")
class DynamicMaskRouter(AttentionRouter):
    """Keys by the learned bias A·softplus(W·v), which is also added to the logits."""

    Options = DynamicMaskOptions

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.A = nn.Parameter(torch.ones(self.n_kv_heads))
        self.W = nn.Parameter(torch.randn(self.n_kv_heads, self.head_dim) * self.head_dim**-0.5)

    def key_bias(self, v: Tensor) -> Tensor:
        """[B, Hkv, S]: A_h · softplus(W_h · v_s), differentiable in A, W and v."""
        proj_BHS = torch.einsum("bhsd,hd->bhs", v, self.W.to(v.dtype))
        return self.A.to(v.dtype).view(1, -1, 1) * F.softplus(proj_BHS)

    def route(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> BlockRouting:
        bias_BHS = self.key_bias(v)
        B, Hkv, S = bias_BHS.shape
        past_BHSW = causal_topk_keys(bias_BHS, self.options.window)
        self_BHS1 = torch.arange(S, device=v.device).view(1, 1, S, 1).expand(B, Hkv, S, 1)
        idx = torch.cat([self_BHS1, past_BHSW], dim=-1)
        b = bias_BHS.detach().float()
        stats = {"bias_mean": b.mean(), "bias_std": b.std() if b.numel() > 1 else b.new_zeros(())}
        return BlockRouting(idx, 1, key_bias=bias_BHS, stats=stats)

    def density_estimate(self, seq_len: int) -> float:
        kept = sum(min(t, self.options.window) + 1 for t in range(seq_len))
        return min(1.0, kept / max(1, seq_len * (seq_len + 1) / 2))
