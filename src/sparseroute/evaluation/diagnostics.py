"""What routers do, measured on a trained model and fixed text.

Legend: B batch, S sequence, T tokens, D model dim, E experts, F expert hidden.

- :func:`routing_profile`: per MoE layer, the routing entropy, load imbalance, active experts per
  token, and for multi-hop layers cos(Δh_0, Δh_1) (collinearity of the hop updates) and the hops
  taken per token.
- :func:`halting_curve`: relative-norm halting swept over thresholds τ (eval mode, zero-shot):
  loss and perplexity, the routed-expert work actually dispatched, the share of it saved against
  τ = 0, and the wall-clock time of the evaluation; :func:`halting_choice` picks τ on validation
  text and reports its effect on test text.
- :func:`routing_fluctuation`: the share of tokens whose top-1 expert differs between two models
  (e.g. two checkpoints of one run) on the same text, per MoE layer.
- :func:`router_expert_coupling`: per expert, |cos| between its router direction (the linear
  router's row; for the cosine router Pᵀc_e, its centroid mapped back to model space; for the
  k-means router its centroid) and the principal input direction of its expert weights (the top
  left-singular vector of w_in[e], a D-vector).
- :func:`expert_specialisation`: per layer and expert, the tokens (bytes for the byte tokenizer)
  routed to it most often as top-1, with their lift over the corpus frequency.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sparseroute.data import eval_batches
from sparseroute.evaluation.evaluate import evaluate
from sparseroute.models import TransformerLM

__all__ = ["routing_profile", "halting_taus", "halting_curve", "halting_choice", "routing_fluctuation", "router_expert_coupling",
           "expert_specialisation", "set_halting"]


def _batches(tokens, batch_size: int, seq_len: int, max_tokens: int):
    return list(eval_batches(tokens, batch_size, seq_len, max_tokens=max_tokens))


def set_halting(model: TransformerLM, threshold: float) -> None:
    """Set the eval-mode halting threshold of every MoE layer of ``model``."""
    for moe in model.moe_layers():
        moe.set_halting(threshold)


def _evaluate(model: TransformerLM, tokens, batch_size: int, seq_len: int, max_tokens: int) -> dict[str, Any]:
    """:func:`~sparseroute.evaluation.evaluate` (loss, ppl, tokens, per-layer routing
    statistics), on the model's own device."""
    return evaluate(model, tokens, batch_size, seq_len, max_tokens, next(model.parameters()).device)


def routing_profile(model: TransformerLM, tokens, *, batch_size: int = 8, seq_len: int = 256,
                    max_tokens: int = 32_768) -> list[dict[str, float]]:
    """Per MoE layer, token-weighted means of the routing statistics on ``tokens`` (eval mode)."""
    return _evaluate(model, tokens, batch_size, seq_len, max_tokens).get("routing", [])


def halting_taus(model: TransformerLM, tokens, quantiles: Sequence[float], *, batch_size: int = 8,
                 seq_len: int = 256, max_tokens: int = 32_768) -> list[float]:
    """Thresholds at the given quantiles of the hop-0 relative update norm ||MoE(h_0)|| / ||h_0||,
    pooled over tokens and multi-hop layers: τ at quantile q halts about a share q of the tokens
    after their first hop (the scale of that ratio differs between models, so a fixed grid of τ
    can miss it entirely)."""
    if any(not 0 < q < 1 for q in quantiles):
        raise ValueError(f"quantiles must be in (0, 1); got {list(quantiles)}")
    was = model.training
    model.eval()
    ratios: list[Tensor] = []
    try:
        with torch.no_grad():
            for x, _ in _batches(tokens, batch_size, seq_len, max_tokens):
                for r in model(x).routings:
                    if "update_ratio" in r.stats:
                        ratios.append(r.stats["update_ratio"].float().cpu())
    finally:
        model.train(was)
    if not ratios:
        raise ValueError("halting_taus needs a multi-hop MoE model (moe.hops >= 2)")
    pooled = torch.cat(ratios)
    return [float(v) for v in torch.quantile(pooled, torch.tensor([float(q) for q in quantiles]))]


def halting_curve(model: TransformerLM, tokens, taus: Sequence[float], *, batch_size: int = 8, seq_len: int = 256,
                  max_tokens: int = 32_768, repeats: int = 1) -> list[dict[str, Any]]:
    """Evaluate ``model`` with halting threshold τ for each τ in ``taus`` (τ = 0 is added first as
    the baseline if missing). Per τ: loss, ppl, ppl change vs τ = 0 (%), mean (token, expert)
    pairs dispatched per token summed over layers and hops, the share of that expert work saved
    vs τ = 0, hops per token (mean over layers) and the median evaluation time over ``repeats``."""
    if not model.moe_layers():
        raise ValueError("halting_curve needs a model with MoE layers")
    if any(t < 0 or math.isnan(t) for t in taus):
        raise ValueError(f"taus must be >= 0; got {list(taus)}")
    ordered = [0.0] + [float(t) for t in taus if t != 0]
    rows: list[dict[str, Any]] = []
    try:
        for tau in ordered:
            set_halting(model, tau)
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                res = _evaluate(model, tokens, batch_size, seq_len, max_tokens)
                times.append(time.perf_counter() - t0)
            layers = res["routing"]
            rows.append({
                "tau": tau, "loss": res["loss"], "ppl": res["ppl"],
                "expert_pairs_per_token": sum(lay.get("active_per_token", 0.0) for lay in layers),
                "hops_per_token": float(np.mean([lay.get("hops_per_token", 1.0) for lay in layers])),
                "seconds": float(np.median(times)), "tokens": res["tokens"],
            })
    finally:
        set_halting(model, 0.0)
    base = rows[0]
    for r in rows:
        r["ppl_change_pct"] = 100.0 * (r["ppl"] / base["ppl"] - 1.0)
        r["moe_flops_saved"] = 1.0 - r["expert_pairs_per_token"] / base["expert_pairs_per_token"]
        r["time_saved"] = 1.0 - r["seconds"] / base["seconds"]
    return rows


#: the default budget of halting: the largest saving whose perplexity is within this many percent
#: of no halting
HALTING_MAX_PPL_PCT = 0.5


def halting_choice(model: TransformerLM, val_tokens, test_tokens, taus: Sequence[float], *,
                   max_ppl_change_pct: float = HALTING_MAX_PPL_PCT, batch_size: int = 8, seq_len: int = 256,
                   max_tokens: int = 32_768, repeats: int = 1) -> dict[str, Any]:
    """Halting with its threshold chosen on validation text and its effect measured on test text,
    so the reported saving is not the optimistic one of the text it was tuned on.

    The curve of :func:`halting_curve` over ``taus`` is evaluated on ``val_tokens``; the chosen τ
    is the one with the largest share of MoE work saved whose validation perplexity is at most
    ``max_ppl_change_pct`` percent above τ = 0 (τ = 0 when none is; ties go to the smaller τ).
    That τ is then evaluated on ``test_tokens`` against τ = 0 there. Returns ``{"tau",
    "max_ppl_change_pct", "chosen_on": "validation", "validation": [rows], "test": row}``, where the
    test row (as in :func:`halting_curve`) holds the test perplexity change, the MoE work saved and
    the wall-clock saved at the chosen τ."""
    kw = {"batch_size": batch_size, "seq_len": seq_len, "max_tokens": max_tokens, "repeats": repeats}
    val_rows = halting_curve(model, val_tokens, taus, **kw)
    within = [r for r in val_rows if r["ppl_change_pct"] <= max_ppl_change_pct]
    chosen = max(within, key=lambda r: (r["moe_flops_saved"], -r["tau"])) if within else val_rows[0]
    test_rows = halting_curve(model, test_tokens, [chosen["tau"]], **kw)
    return {"tau": chosen["tau"], "max_ppl_change_pct": max_ppl_change_pct, "chosen_on": "validation",
            "validation": val_rows, "test": test_rows[-1], "test_baseline_ppl": test_rows[0]["ppl"]}


@torch.no_grad()
def _top1_per_layer(model: TransformerLM, batches) -> list[Tensor]:
    was = model.training
    model.eval()
    per_layer: list[list[Tensor]] = []
    try:
        for x, _ in batches:
            out = model(x)
            if not per_layer:
                per_layer = [[] for _ in out.routings]
            for acc, r in zip(per_layer, out.routings):
                # the slot with the largest weight; -1 where a token uses no expert
                w = torch.where(r.indices >= 0, r.weights.float(), torch.full_like(r.weights.float(), -math.inf))
                best = w.argmax(dim=-1, keepdim=True)
                top = r.indices.gather(1, best).squeeze(1)
                acc.append(torch.where(torch.isfinite(w.gather(1, best).squeeze(1)), top, torch.full_like(top, -1)))
    finally:
        model.train(was)
    return [torch.cat(a) for a in per_layer]


def routing_fluctuation(model_a: TransformerLM, model_b: TransformerLM, tokens, *, batch_size: int = 8,
                        seq_len: int = 256, max_tokens: int = 32_768) -> list[float]:
    """Per MoE layer, the share of tokens whose top-1 expert differs between the two models."""
    batches = _batches(tokens, batch_size, seq_len, max_tokens)
    a, b = _top1_per_layer(model_a, batches), _top1_per_layer(model_b, batches)
    if len(a) != len(b):
        raise ValueError(f"the models have {len(a)} and {len(b)} MoE layers; compare checkpoints of one run")
    return [float((x != y).float().mean()) for x, y in zip(a, b)]


@torch.no_grad()
def router_expert_coupling(model: TransformerLM) -> list[list[float] | None]:
    """Per MoE layer, per expert |cos(router direction, principal input direction of w_in[e])|
    (``None`` for a router with no direction, e.g. hash). Random directions in D dims give about
    sqrt(2 / (π D)); values well above that mean router and expert are aligned."""
    out: list[list[float] | None] = []
    for moe in model.moe_layers():
        dirs_ED = moe.router.expert_directions()
        if dirs_ED is None:
            out.append(None)
            continue
        w_EDF = moe.experts.w_in.detach().float()
        vals = []
        for e in range(w_EDF.shape[0]):
            u_D = torch.linalg.svd(w_EDF[e], full_matrices=False).U[:, 0]
            vals.append(abs(float(F.cosine_similarity(u_D, dirs_ED[e], dim=0))))
        out.append(vals)
    return out


def expert_specialisation(model: TransformerLM, tokens, *, top: int = 8, batch_size: int = 8, seq_len: int = 256,
                          max_tokens: int = 32_768) -> list[list[list[tuple[int, int, float]]]]:
    """Per MoE layer, per expert: the ``top`` input tokens routed to it most often as top-1, as
    (token id, count, lift), lift = share of the expert's tokens / share in the text."""
    batches = _batches(tokens, batch_size, seq_len, max_tokens)
    ids_T = torch.cat([x.reshape(-1) for x, _ in batches])
    base = Counter(ids_T.tolist())
    n = ids_T.numel()
    result = []
    E = model.moe_layers()[0].config.num_experts
    for top1_T in _top1_per_layer(model, batches):
        layer = []
        for e in range(E):
            routed = ids_T[top1_T == e].tolist()
            c = Counter(routed)
            m = max(1, len(routed))
            layer.append([(tok, cnt, (cnt / m) / (base[tok] / n)) for tok, cnt in c.most_common(top)])
        result.append(layer)
    return result
