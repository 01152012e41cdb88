"""The obviously correct executor: a loop over tokens and their slots. Oracle for tests only.

Legend: T tokens, D model dim, K slots per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseroute.moe.dispatch import EXECUTORS
from sparseroute.moe.experts import Experts
from sparseroute.routing import Routing


@EXECUTORS.register("reference")
def reference_dispatch(x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """y[t] = sum over used slots j of w[t, j] * expert_{idx[t, j]}(x[t])."""
    T, D = x_TD.shape
    rows = []
    for t in range(T):
        acc = x_TD.new_zeros(D)
        for j in range(routing.indices.shape[1]):
            e = int(routing.indices[t, j])
            if e < 0:
                continue
            y = experts.expert(e, x_TD[t : t + 1])[0]
            acc = acc + routing.weights[t, j].to(x_TD.dtype) * y
        rows.append(acc)
    return torch.stack(rows) if rows else x_TD.new_zeros(0, D)
