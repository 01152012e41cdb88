"""The decoder-only transformer LM assembled from an :class:`LMConfig`.

Legend: B batch, S sequence, D model dim, H heads, K head dim, V vocab, F FFN hidden.

Pre-norm blocks ``x + Attn(RMSNorm(x))``, ``x + FFN(RMSNorm(x))``; RoPE (rotate-half) on q and k;
causal ``F.scaled_dot_product_attention``, or on the layers of ``cfg.attention`` a block-sparse
:class:`sparseroute.attention.SparseAttention` (same q/k/v/o projections and RoPE tables, its
router picking the key blocks; one :class:`BlockRouting` per such layer in
``LMOutput.attention_routings``); a dense SwiGLU FFN or a sparseroute :class:`MoE`;
final RMSNorm and a (tied or untied) output head. MoE layers receive the input ids as
``token_ids`` (hash routing needs them). Note that ``expert_choice`` routing looks at the whole
batch, so with it the model is no longer strictly causal.

Attention-aware routing (``similarity`` router with ``features="attention"``): a block whose MoE
router needs ``token_mixing`` asks its attention layer for the head-averaged attention probabilities
[B, S, S] and passes them to the MoE layer. They are computed explicitly (one extra S x S matmul
per head, in fp32; the attention output itself still comes from SDPA) and *not detached*: the
routing weights depend on them, so the MoE loss and output also train the attention's q and k
projections, as the rest of the routing is trained end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.attention.module import SparseAttention
from sparseroute.attention.rope import apply_rope, rope_cos_sin
from sparseroute.attention.selection import BlockRouting
from sparseroute.kernels import gemm
from sparseroute.models.config import LMConfig
from sparseroute.moe import MoE
from sparseroute.moe.layer import after_optimizer_step
from sparseroute.routing import Routing

__all__ = ["LMOutput", "TransformerLM", "RMSNorm", "rope_cos_sin", "apply_rope", "head_averaged_probs"]


def head_averaged_probs(q_BHSK: Tensor, k_BHSK: Tensor) -> Tensor:
    """mean over heads of softmax(q kᵀ / sqrt(K) + causal mask): [B, S, S], fp32, row-stochastic."""
    S, K = q_BHSK.shape[-2], q_BHSK.shape[-1]
    scores_BHSS = torch.matmul(q_BHSK.float(), k_BHSK.float().transpose(-1, -2)) * K**-0.5
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=q_BHSK.device).tril()
    return scores_BHSS.masked_fill(~causal_SS, float("-inf")).softmax(dim=-1).mean(dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        D = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q = gemm.Linear(D, D, bias=False)
        self.k = gemm.Linear(D, D, bias=False)
        self.v = gemm.Linear(D, D, bias=False)
        self.o = gemm.Linear(D, D, bias=False)

    def forward(
        self, x_BSD: Tensor, cos_SK: Tensor, sin_SK: Tensor, *, return_probs: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The attention output [B, S, D]; with ``return_probs`` also the head-averaged attention
        probabilities mean_h softmax(q_h k_hᵀ / sqrt(K) + causal mask), [B, S, S] in fp32 (rows
        sum to 1, zero above the diagonal), computed explicitly (an extra S x S matmul per head)
        and differentiable; the output is unchanged (still SDPA)."""
        B, S, D = x_BSD.shape
        H, K = self.n_heads, self.head_dim
        # RoPE on the contiguous [B, S, H, K] projections (cheaper than on the transposed views)
        cos_S1K, sin_S1K = cos_SK.unsqueeze(1), sin_SK.unsqueeze(1)
        q_BHSK = apply_rope(self.q(x_BSD).view(B, S, H, K), cos_S1K, sin_S1K).transpose(1, 2)
        k_BHSK = apply_rope(self.k(x_BSD).view(B, S, H, K), cos_S1K, sin_S1K).transpose(1, 2)
        v_BHSK = self.v(x_BSD).view(B, S, H, K).transpose(1, 2)
        y_BHSK = F.scaled_dot_product_attention(q_BHSK, k_BHSK, v_BHSK, is_causal=True)
        out_BSD = self.o(y_BHSK.transpose(1, 2).reshape(B, S, D))
        if not return_probs:
            return out_BSD
        return out_BSD, head_averaged_probs(q_BHSK, k_BHSK)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = gemm.Linear(d_model, d_ff, bias=False)
        self.up = gemm.Linear(d_model, d_ff, bias=False)
        self.down = gemm.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, use_moe: bool, sparse_attention: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn: Attention | SparseAttention
        if sparse_attention:
            a = cfg.attention
            assert a is not None
            self.attn = SparseAttention(
                cfg.d_model, cfg.n_heads, a.n_kv_heads, a.router, a.router_options, a.block_size,
                rope_base=cfg.rope_base, backend=a.backend,
            )
        else:
            self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module
        if use_moe:
            m = cfg.moe
            assert m is not None
            self.ffn = MoE(cfg.d_model, config=m, d_ff=m.expert_d_ff(cfg.d_ff))
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    @property
    def is_sparse_attention(self) -> bool:
        return isinstance(self.attn, SparseAttention)

    def forward(
        self, x_BSD: Tensor, cos_SK: Tensor, sin_SK: Tensor, ids_BS: Tensor
    ) -> tuple[Tensor, Routing | None, BlockRouting | None]:
        """(x after the block, the MoE layer's Routing or None, the sparse attention's BlockRouting
        or None)."""
        attn_routing: BlockRouting | None = None
        if isinstance(self.attn, SparseAttention):
            # the config refuses attention-aware MoE routing on a sparse attention layer
            a_BSD, attn_routing = self.attn(self.attn_norm(x_BSD), cos_SK, sin_SK)
            mixing_BSS = None
        elif isinstance(self.ffn, MoE) and self.ffn.needs_token_mixing:
            # attention-aware routing: the router mixes with this block's attention weights
            a_BSD, mixing_BSS = self.attn(self.attn_norm(x_BSD), cos_SK, sin_SK, return_probs=True)
        else:
            a_BSD, mixing_BSS = self.attn(self.attn_norm(x_BSD), cos_SK, sin_SK), None
        x_BSD = x_BSD + a_BSD
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoE):
            y_BSD, routing = self.ffn(h_BSD, token_ids=ids_BS, token_mixing=mixing_BSS)
            return x_BSD + y_BSD, routing, attn_routing
        return x_BSD + self.ffn(h_BSD), None, attn_routing


@dataclass
class LMOutput:
    """logits [B, S, V]; aux_losses: the auxiliary losses of the MoE layers and of the sparse
    attention routers (already scaled by their coefficients), summed over layers by name;
    routings: one Routing per MoE layer, in layer order; attention_routings: one BlockRouting per
    sparse attention layer, in layer order (``stats``: density, blocks_per_query, recall, mass)."""

    logits: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    routings: list[Routing] = field(default_factory=list)
    attention_routings: list[BlockRouting] = field(default_factory=list)

    def aux_loss(self) -> Tensor:
        """Sum of all auxiliary losses; a 0-dim zero on the logits' device when there are none."""
        if not self.aux_losses:
            return torch.zeros((), device=self.logits.device, dtype=torch.float32)
        return torch.stack([v.float() for v in self.aux_losses.values()]).sum()


class TransformerLM(nn.Module):
    """``forward(input_ids_BS) -> LMOutput``. Build on ``torch.device("meta")`` to count the
    parameters of a large config without allocating it."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise ValueError(f"cfg must be an LMConfig; got {type(cfg).__name__}")
        self.config = cfg
        moe_layers = set(cfg.moe_layer_indices())
        sparse_layers = set(cfg.sparse_attention_layer_indices())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i in moe_layers, i in sparse_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # tied: no head module, the logits read embed.weight directly, so the state_dict holds the
        # matrix once (safetensors refuses tensors that share memory)
        self.head: nn.Linear | None = (
            None if cfg.tie_embeddings else gemm.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(init_std) for embeddings and linear weights, init_std/sqrt(2L) for the
        projections that write into the residual stream (attention out, FFN down); RMSNorm
        weights 1; MoE expert weights like the dense FFN; sparse attention's q/k/v/o projections
        like the dense attention's (routers, MoE and attention alike, keep their own init)."""
        cfg = self.config
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=std)
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(block.attn.o.weight, std=out_std)
            if isinstance(block.ffn, SwiGLU):
                nn.init.normal_(block.ffn.gate.weight, std=std)
                nn.init.normal_(block.ffn.up.weight, std=std)
                nn.init.normal_(block.ffn.down.weight, std=out_std)
            elif isinstance(block.ffn, MoE):
                # experts start like the dense FFN they replace, so dense-vs-MoE runs share an init scale
                experts = [block.ffn.experts] + ([block.ffn.shared.mlp] if block.ffn.shared is not None else [])
                for ex in experts:
                    nn.init.normal_(ex.w_in, std=std)
                    nn.init.normal_(ex.w_out, std=out_std)
            for norm in (block.attn_norm, block.ffn_norm):
                norm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def _check_ids(self, ids: Tensor) -> None:
        cfg = self.config
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"input_ids must be a [batch, seq] tensor; got {shape}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor; got dtype {ids.dtype}")
        if ids.shape[1] < 1:
            raise ValueError("input_ids: the sequence is empty; need at least one token")
        if ids.shape[1] > cfg.max_seq_len:
            raise ValueError(
                f"input_ids: sequence length {ids.shape[1]} exceeds max_seq_len={cfg.max_seq_len}; "
                "crop the input or build the model with a larger max_seq_len"
            )
        if ids.numel() and bool(((ids < 0) | (ids >= cfg.vocab_size)).any()):
            raise ValueError(
                f"input_ids: token ids must be in [0, vocab_size={cfg.vocab_size}); got values in "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )

    def forward(self, input_ids_BS: Tensor) -> LMOutput:
        self._check_ids(input_ids_BS)
        ids_BS = input_ids_BS.long()
        S = ids_BS.shape[1]
        cos_SK, sin_SK = rope_cos_sin(S, self.config.head_dim, self.config.rope_base, device=ids_BS.device)
        x_BSD = self.embed(ids_BS)
        aux: dict[str, Tensor] = {}
        routings: list[Routing] = []
        attention_routings: list[BlockRouting] = []
        for block in self.blocks:
            x_BSD, routing, attn_routing = block(x_BSD, cos_SK, sin_SK, ids_BS)
            for r, kept in ((attn_routing, attention_routings), (routing, routings)):
                if r is not None:
                    kept.append(r)
                    for name, value in r.losses.items():
                        aux[name] = aux[name] + value if name in aux else value
        logits_BSV = gemm.linear(self.norm(x_BSD), self.output_weight())
        return LMOutput(logits=logits_BSV, aux_losses=aux, routings=routings, attention_routings=attention_routings)

    def output_weight(self) -> Tensor:
        """The [V, D] output projection: the embedding matrix itself when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def moe_layers(self) -> list[MoE]:
        """The MoE modules, in layer order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def sparse_attention_layers(self) -> list[SparseAttention]:
        """The block-sparse attention modules, in layer order."""
        return [b.attn for b in self.blocks if isinstance(b.attn, SparseAttention)]

    def after_optimizer_step(self) -> None:
        """Run every router's post-step hook (loss-free bias balancing); call after ``opt.step()``."""
        after_optimizer_step(self)

    def num_parameters(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())
