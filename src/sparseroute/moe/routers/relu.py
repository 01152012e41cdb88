"""BlockFFN router (arXiv 2507.08771): ReLU then RMSNorm over experts, no top-k.

Legend: T tokens, D model dim, E experts, K slots per token (here K = E: slot e is expert e),
B sequences, S sequence length.

A0 = W x; A1 = ReLU(A0); A = g * A1 / sqrt(mean_e(A1^2) + eps), g a learnable per-expert gain.
Expert e is active for a token exactly when A[e] > 0, so the number of active experts varies per
token. Statistics: TLS (fraction of inactive experts per token, averaged) and CLS_L (fraction of
experts inactive for every token of a window of L consecutive tokens of one sequence, averaged over
the non-overlapping windows).

Training objectives (off by default; see :class:`ReLUConfig`), returned in ``Routing.losses``
already scaled, in train and eval mode alike (eval never adds them to anything):

- ``activation_locality`` = al_coef · :func:`~sparseroute.moe.losses.activation_locality_loss`
  of A0 (previous token's scores pushed towards the current token's pattern; target not
  detached, as in the authors' code);
- ``chunk_sparsity`` = λ_cs · :func:`~sparseroute.moe.losses.chunk_sparsity_loss` of A1/rms
  (the un-gained normalised activations, as in the authors' ``rms`` branch).

Adaptive λ_cs (``cs_adaptive``), checked against the authors' ``AdaptiveLinearScheduler``
(thunlp/BlockFFN): optimizer steps n = 1, 2, ... each record the mean L_cs of the training forwards
since the previous step; windows are the steps (n-every, n] for n a multiple of ``cs_adapt_every``.
At such an n >= ``cs_adapt_after`` with r = mean(current window) / mean(previous window):
r <- max(r, cs_min_ratio) if r > 1; r <- min(r, cs_coef · cs_max_factor / λ_n); then λ moves
*linearly* from λ_n to λ_n · r over the next ``cs_adapt_every`` steps (``cs_adapt_ramp``; False:
jump at once). The schedule lives in buffers (saved by ``state_dict``) and is advanced by
:meth:`ReLURouter.after_optimizer_step`. Unlike the authors' single global λ driven by the loss
summed over layers, each router here keeps its own λ driven by its own L_cs.

Sparsity target (``cs_target``; instead of ``cs_adaptive``): λ_cs is driven towards the sparsity
it should buy rather than by the loss trend, as ReMoE does for its L1 coefficient (the BlockFFN
schedule follows the loss and has no target; in runs of a few hundred steps here it let L_cs win
over the LM loss and collapse routing onto the same experts for every token, docs/RESULTS.md).
Not in the BlockFFN paper. Optimizer steps n = 1, 2, ...
each record the mean, over the training forwards since the previous step, of the measured
sparsity s of the batch: ``cs_target_stat`` = "tls" (token-level sparsity; target 1 − k/E uses k
of E experts per token on average, e.g. 0.75 = 2 of 8, the expert FLOPs of top-2) or "cls" (the
reported CLS at ``cls_window`` tokens). At n a multiple of ``cs_adapt_every`` with
n >= ``cs_adapt_after``, with s̄ the mean over the window (n-every, n]: r = ``cs_target_rate``
if s̄ < cs_target (too dense: push harder), 1 / cs_target_rate if s̄ > cs_target, 1 if equal;
then λ moves to λ_n · r over the next window exactly as above (``cs_adapt_ramp``).

Bounds, both rules: λ_cs stays in [cs_min_factor · cs_coef, cs_max_factor · cs_coef] (r is
clamped so that λ_n · r lies there; cs_min_factor defaults to 0: no floor but 1e-12 · cs_coef,
which keeps λ > 0). λ starts at cs_coef.

Warmup (``cs_warmup_steps`` = W > 0; any of the three: fixed λ, ``cs_adaptive``, ``cs_target``):
the forwards of optimizer step n (n = 1, 2, ...) use min(1, (n − 1) / W) · λ_n, a linear ramp
from 0 at step 1 to the full λ at step W + 1. λ_n itself is not adapted before step W: the first
adaptation is at the first multiple of ``cs_adapt_every`` that is >= max(cs_adapt_after, W)
(windows are recorded during the warmup too, so the windows it compares may hold warmup steps).
The ``cs_coef`` stat is the λ the forward used, warmup included.

State: λ_n, the ramp, the step count and the window sums are buffers (``state_dict``), present
only when λ_cs is scheduled (``cs_adaptive``, ``cs_target`` or ``cs_warmup_steps``), so a resumed
run continues all three bit-identically. ``cs_target_stat="cls"`` needs sequences of at least
``cls_window`` tokens (CLS is 0 otherwise and λ would only rise).

Statistic ``load_entropy`` (:func:`load_entropy`): the normalised entropy of the batch's
per-expert load, 1 = uniform, 0 = every token on one expert. High CLS with a low load entropy is
collapse (every token on the same few experts), not locality. Under a capacity drop it keeps the
value of the undropped routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sparseroute.moe.losses import activation_locality_loss, chunk_sparsity_loss
from sparseroute.moe.routers.base import RouterConfig, register_router
from sparseroute.moe.routers.topk import LinearRouter
from sparseroute.routing import Routing


@torch.no_grad()
def token_level_sparsity(active_TE: Tensor) -> Tensor:
    """TLS: mean fraction of experts a token leaves inactive."""
    if active_TE.shape[0] == 0:
        return torch.zeros(())
    return 1.0 - active_TE.float().mean()


@torch.no_grad()
def chunk_level_sparsity(active_TE: Tensor, window: int, seq_len: int | None = None) -> Tensor:
    """CLS_L: mean over non-overlapping windows of L tokens of the fraction of experts inactive for
    every token of the window. Windows lie inside the sequences of ``seq_len`` consecutive tokens
    (None: one sequence); a trailing partial window of each sequence is ignored; 0 if there is no
    full one."""
    T, E = active_TE.shape
    S = T if seq_len is None else seq_len
    n = S // window
    if T == 0 or n == 0:
        return torch.zeros(())
    used_NE = active_TE.reshape(T // S, S, E)[:, : n * window].reshape(-1, window, E).any(dim=1)
    return 1.0 - used_NE.float().mean()


@torch.no_grad()
def load_entropy(load_E: Tensor) -> Tensor:
    """Normalised entropy of a per-expert load (counts or shares, >= 0): H(p) / log E with
    p = load / sum(load); 1 = the same load on every expert, 0 = all of it on one expert. 0 when
    nothing is routed or E = 1 (there is no spread to measure)."""
    E = load_E.shape[-1]
    load = load_E.double()
    total = load.sum()
    if E < 2:
        return torch.zeros((), device=load_E.device)
    p = load / total.clamp_min(1e-300)
    h = -(p * torch.log(p.clamp_min(1e-300))).sum() / math.log(E)
    return torch.where(total > 0, h, torch.zeros_like(h)).clamp(0.0, 1.0).float()


def _finite(cfg, name: str, low: float, strict: bool = False) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > low if strict else value >= low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}; got {value!r}")


def _int(cfg, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ReLUConfig(RouterConfig):
    """eps: RMSNorm epsilon. cls_window: L of the CLS statistic (BlockFFN reports CLS8).

    al_coef: weight of the activation-locality loss (BlockFFN: 2e-3; 0 = off).
    al_alpha: its sigmoid steepness alpha (BlockFFN: 100).
    cs_coef: (initial) weight λ_cs of the chunk-sparsification loss (BlockFFN: 5e-2; 0 = off).
    cs_chunk: its chunk length in tokens (BlockFFN: 64).
    cs_adaptive: adapt λ_cs from the loss trend (module docstring); needs cs_coef > 0.
    cs_adapt_every / cs_adapt_after: window length and first adaptation, in optimizer steps.
    cs_max_factor: λ_cs never exceeds cs_max_factor · cs_coef. cs_min_ratio: a ratio above 1 is
    raised to at least this. cs_adapt_ramp: move λ linearly over the next window (as the authors
    do) rather than at once.
    cs_target: a target sparsity in (0, 1) that λ_cs is driven to (module docstring); None = off.
    Needs cs_coef > 0 and excludes cs_adaptive. cs_target_stat: what is measured, "tls" or "cls".
    cs_target_rate: > 1, the factor λ is multiplied (below target) or divided (above) by per
    window. cs_min_factor: in [0, 1], λ_cs never falls below cs_min_factor · cs_coef (both rules).
    cs_warmup_steps: λ_cs ramps linearly from 0 over this many optimizer steps (0 = none).
    """

    eps: float = 1e-6
    cls_window: int = 8
    load_balance_coef: float = 0.0
    al_coef: float = 0.0
    al_alpha: float = 100.0
    cs_coef: float = 0.0
    cs_chunk: int = 64
    cs_adaptive: bool = False
    cs_adapt_every: int = 100
    cs_adapt_after: int = 1000
    cs_max_factor: float = 4.0
    cs_min_ratio: float = 1.025
    cs_adapt_ramp: bool = True
    cs_target: float | None = None
    cs_target_stat: str = "tls"
    cs_target_rate: float = 1.2
    cs_min_factor: float = 0.0
    cs_warmup_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0; got {self.eps!r}")
        if not isinstance(self.cls_window, int) or self.cls_window < 1:
            raise ValueError(f"cls_window must be a positive int; got {self.cls_window!r}")
        _finite(self, "al_coef", 0.0)
        _finite(self, "al_alpha", 0.0, strict=True)
        _finite(self, "cs_coef", 0.0)
        _int(self, "cs_chunk", 1)
        _int(self, "cs_adapt_every", 1)
        _int(self, "cs_adapt_after", 0)
        _finite(self, "cs_max_factor", 1.0)
        _finite(self, "cs_min_ratio", 1.0)
        for name in ("cs_adaptive", "cs_adapt_ramp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.cs_adaptive and self.cs_coef == 0:
            raise ValueError("cs_adaptive=True needs cs_coef > 0 (the initial λ_cs); got cs_coef=0")
        if self.cs_target is not None:
            value = self.cs_target
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
            if not ok:
                raise ValueError(f"cs_target must be a sparsity strictly between 0 and 1 (or None: off); got {value!r}")
            if self.cs_coef == 0:
                raise ValueError("cs_target needs cs_coef > 0 (the initial λ_cs); got cs_coef=0")
            if self.cs_adaptive:
                raise ValueError(
                    "cs_target and cs_adaptive are two λ_cs schedules (towards a sparsity target, or by the "
                    "loss trend); set only one of them"
                )
        if self.cs_target_stat not in ("tls", "cls"):
            raise ValueError(f"cs_target_stat must be 'tls' or 'cls'; got {self.cs_target_stat!r}")
        _finite(self, "cs_target_rate", 1.0, strict=True)
        _finite(self, "cs_min_factor", 0.0)
        if self.cs_min_factor > 1:
            raise ValueError(f"cs_min_factor must be in [0, 1] (λ_cs starts at cs_coef); got {self.cs_min_factor!r}")
        _int(self, "cs_warmup_steps", 0)
        if self.cs_warmup_steps > 0 and self.cs_coef == 0:
            raise ValueError("cs_warmup_steps needs cs_coef > 0 (the λ_cs it ramps up to); got cs_coef=0")

    @property
    def cs_scheduled(self) -> bool:
        """Whether λ_cs changes over training (adaptive, target-driven or warmed up): then the
        router keeps the schedule state in buffers."""
        return self.cs_adaptive or self.cs_target is not None or self.cs_warmup_steps > 0


_SCHEDULE = ("cs_coef_now", "cs_ramp", "cs_step", "cs_pending", "cs_window")
_MIN_FACTOR = 1e-12  # the floor of λ_cs / cs_coef when cs_min_factor = 0: λ stays > 0 (it divides)


@register_router("relu")
class ReLURouter(LinearRouter):
    Config = ReLUConfig
    pinned_buffers = _SCHEDULE  # float64 under .to(bf16): the schedule state
    variable_k = True
    sequence_aware = True

    def __init__(self, d_model, num_experts, top_k, config=None):
        super().__init__(d_model, num_experts, top_k, config)
        self.gain = nn.Parameter(torch.ones(num_experts))
        if self.config.cs_scheduled:  # only then: default checkpoints keep their keys
            f64 = dict(dtype=torch.float64)
            # λ_cs of the next forwards; (λ at the last adaptation, its ratio r, its step)
            self.register_buffer("cs_coef_now", torch.tensor(self.config.cs_coef, **f64))
            self.register_buffer("cs_ramp", torch.tensor([self.config.cs_coef, 1.0, 0.0], **f64))
            self.register_buffer("cs_step", torch.zeros((), dtype=torch.int64))  # optimizer steps
            # (sum, forwards) this step of L_cs (cs_adaptive) or of the measured sparsity (cs_target)
            self.register_buffer("cs_pending", torch.zeros(2, **f64))
            self.register_buffer("cs_window", torch.zeros(2, 2, **f64))  # [previous, current] x (sum, n)

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None, *, seq_len: int) -> Routing:
        cfg = self.config
        a0_TE = self.logits(x_TD)
        a1_TE = torch.relu(a0_TE)
        rms_T1 = torch.sqrt(a1_TE.square().mean(dim=-1, keepdim=True) + cfg.eps)
        a_TE = self.gain.float() * a1_TE / rms_T1
        active_TE = a_TE.detach() != 0
        experts = torch.arange(self.num_experts, device=x_TD.device).expand_as(active_TE)
        idx_TE = torch.where(active_TE, experts, torch.full_like(experts, -1))
        w_TE = torch.where(active_TE, a_TE, torch.zeros_like(a_TE))
        tls = token_level_sparsity(active_TE)
        cls = chunk_level_sparsity(active_TE, cfg.cls_window, seq_len)
        extra = {"tls": tls, f"cls{cfg.cls_window}": cls, "load_entropy": load_entropy(active_TE.sum(dim=0))}
        losses: dict[str, Tensor] = {}
        if cfg.al_coef > 0:
            losses["activation_locality"] = cfg.al_coef * activation_locality_loss(a0_TE, seq_len, cfg.al_alpha)
        if cfg.cs_coef > 0:
            l_cs = chunk_sparsity_loss(a1_TE / rms_T1, seq_len, cfg.cs_chunk)
            if cfg.cs_scheduled:
                if self.training:
                    if cfg.cs_target is not None:
                        self.record_sparsity(tls if cfg.cs_target_stat == "tls" else cls)
                    else:
                        self.record_chunk_sparsity(l_cs)
                coef = self.cs_coef_now
                if cfg.cs_warmup_steps > 0:
                    coef = coef * ((self.cs_step.double()) / cfg.cs_warmup_steps).clamp(max=1.0)
                losses["chunk_sparsity"] = coef.to(l_cs.dtype) * l_cs
                extra["cs_coef"] = coef.float()
            else:
                losses["chunk_sparsity"] = cfg.cs_coef * l_cs
                extra["cs_coef"] = torch.tensor(float(cfg.cs_coef))
        return self.finish(idx_TE, w_TE, logits_TE=a0_TE, extra_stats=extra, extra_losses=losses)

    # -- the adaptive λ_cs schedule -------------------------------------------------------------
    @torch.no_grad()
    def record_chunk_sparsity(self, l_cs: Tensor) -> None:
        """Count one forward's (unscaled) L_cs towards the current optimizer step."""
        self.cs_pending += torch.stack([l_cs.detach().to(self.cs_pending).reshape(()), self.cs_pending.new_ones(())])

    @torch.no_grad()
    def record_sparsity(self, sparsity: Tensor) -> None:
        """Count one training forward's measured sparsity (TLS or CLS, ``cs_target_stat``) towards
        the current optimizer step (the ``cs_target`` rule; same buffers as L_cs for cs_adaptive)."""
        self.record_chunk_sparsity(sparsity)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Advance the λ_cs schedule by one optimizer step (no-op unless ``cs_adaptive``,
        ``cs_target`` or ``cs_warmup_steps``)."""
        if not self.config.cs_scheduled:
            return
        cfg = self.config
        total, count = self.cs_pending
        if count > 0:  # a step without a training forward adds nothing to the window
            self.cs_window[1] += torch.stack([total / count, torch.ones_like(count)])
        self.cs_pending.zero_()
        self.cs_step += 1
        n = int(self.cs_step)
        if n % cfg.cs_adapt_every == 0:
            if n >= cfg.cs_adapt_after and n >= cfg.cs_warmup_steps:
                if cfg.cs_target is not None:
                    self._adapt_to_target(n)
                elif cfg.cs_adaptive:
                    self._adapt(n)
            self.cs_window[0] = self.cs_window[1]
            self.cs_window[1].zero_()
        base, ratio, start = self.cs_ramp.tolist()
        progress = min(1.0, (n + 1 - start) / cfg.cs_adapt_every) if cfg.cs_adapt_ramp else 1.0
        self.cs_coef_now.fill_(base * (ratio + (1.0 - ratio) * (1.0 - progress)))

    def _adapt(self, n: int) -> None:
        (prev_sum, prev_n), (cur_sum, cur_n) = self.cs_window.tolist()
        if prev_n == 0 or cur_n == 0 or prev_sum <= 0 or cur_sum <= 0:
            return  # nothing to compare yet: keep the current ramp
        cfg = self.config
        now = float(self.cs_coef_now)
        ratio = (cur_sum / cur_n) / (prev_sum / prev_n)
        if ratio > 1:
            ratio = max(cfg.cs_min_ratio, ratio)
        self._ramp_to(n, now, ratio)

    def _adapt_to_target(self, n: int) -> None:
        total, count = self.cs_window[1].tolist()
        if count == 0:
            return  # no training forward in the window: keep the current ramp
        cfg = self.config
        mean = total / count
        if mean < cfg.cs_target:  # too dense: push harder
            ratio = cfg.cs_target_rate
        elif mean > cfg.cs_target:  # sparser than asked: ease off
            ratio = 1.0 / cfg.cs_target_rate
        else:
            ratio = 1.0
        self._ramp_to(n, float(self.cs_coef_now), ratio)

    def _ramp_to(self, n: int, now: float, ratio: float) -> None:
        """Start the move of λ from ``now`` to now · ratio at step n, ratio clamped to the bounds."""
        cfg = self.config
        ratio = min(cfg.cs_coef * cfg.cs_max_factor / now, ratio)
        ratio = max(cfg.cs_coef * max(cfg.cs_min_factor, _MIN_FACTOR) / now, ratio)
        self.cs_ramp.copy_(torch.tensor([now, ratio, float(n)], dtype=torch.float64))

