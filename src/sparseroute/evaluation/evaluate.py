"""Evaluation of a trained LM: cross-entropy and perplexity on held-out text, with the routing
statistics of its MoE layers and of its sparse attention layers in eval mode.

Legend: B batch, S sequence, V vocab.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from sparseroute.data import eval_batches
from sparseroute.models import TransformerLM

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: TransformerLM, tokens, batch_size: int, seq_len: int, max_tokens: int, device) -> dict[str, Any]:
    """Mean cross-entropy (nats/token) and perplexity over up to ``max_tokens`` of ``tokens``, in
    windows spread over the whole split (:func:`sparseroute.data.eval_windows`: the same text for
    every run and seed), with the counts of scored tokens and windows; for MoE models also
    ``routing``: per MoE layer, token-weighted means of the scalar routing statistics
    in eval mode (entropy, imbalance, active experts, hop collinearity, hops taken, ...); for models
    with sparse attention also ``attention``: per sparse attention layer, token-weighted means of
    its scalar selection statistics (density, blocks_per_query, recall, mass, ...)."""
    was_training = model.training
    model.eval()
    total, count, windows = 0.0, 0, 0
    layers: list[dict[str, float]] = []
    attention: list[dict[str, float]] = []
    for x, y in eval_batches(tokens, batch_size, seq_len, max_tokens=max_tokens):
        x, y = x.to(device), y.to(device)
        out = model(x)
        logits = out.logits
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"))
        count += y.numel()
        windows += y.shape[0]
        if not layers:
            layers = [{} for _ in out.routings]
        if not attention:
            attention = [{} for _ in out.attention_routings]
        for acc, routings in ((layers, out.routings), (attention, out.attention_routings)):
            for lay, r in zip(acc, routings):  # token-weighted means of the scalar routing stats
                for key, value in r.stats.items():
                    if value.numel() == 1:
                        lay[key] = lay.get(key, 0.0) + float(value) * y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation split is shorter than one sequence; use a larger corpus or a shorter seq_len")
    loss = total / count
    res: dict[str, Any] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count, "windows": windows}
    if layers:
        res["routing"] = [{k: v / count for k, v in sorted(lay.items())} for lay in layers]
    if attention:
        res["attention"] = [{k: v / count for k, v in sorted(lay.items())} for lay in attention]
    return res
