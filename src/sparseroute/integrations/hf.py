"""Convert Hugging Face sparse-MoE blocks to and from :class:`~sparseroute.moe.layer.MoE`.

Legend: E experts, D model dim, F expert hidden, Fs shared-expert hidden, k experts per token.

Supported: softmax top-k blocks in the transformers >= 5 layout (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE and blocks built the same way), recognised by their attributes, not their class names:

    block.gate                 router; ``weight`` [E, D], ``top_k``, optional ``norm_topk_prob``;
                               ``gate(x_TD) -> (logits, scores_TK, indices_TK)``
    block.experts              ``gate_up_proj`` [E, 2F, D] (rows: F gate, then F up),
                               ``down_proj`` [E, D, F], ``act_fn`` SiLU, no biases
    block.shared_expert        optional dense MLP: ``gate_proj``/``up_proj`` [Fs, D], ``down_proj`` [D, Fs]
    block.shared_expert_gate   optional Linear(D, 1): the shared output is scaled by sigmoid(w·x)

Weight mapping (HF stores ``nn.Linear``-style [out, in]; ``Experts`` stores [in, out]):

    MoE.experts.w_in[e]          [D, 2F]  = gate_up_proj[e].T        (first F columns: gate)
    MoE.experts.w_out[e]         [F, D]   = down_proj[e].T
    MoE.router.weight            [E, D]   = gate.weight
    MoE.shared.mlp.w_in[0]       [D, 2Fs] = cat(gate_proj.weight.T, up_proj.weight.T, dim=1)
    MoE.shared.mlp.w_out[0]      [Fs, D]  = down_proj.weight.T
    MoE.shared.gate.weight       [1, D]   = shared_expert_gate.weight

Conventions: the router is a float32 softmax over ``x @ gate.weight.T`` and the k largest
probabilities are the weights; they are renormalised to sum to 1 if ``gate.norm_topk_prob`` is
true (Qwen2/3-MoE, OLMoE; their configs default to False). A gate without that attribute is probed
with a zero input (uniform probabilities): Mixtral always renormalises. The gate is then checked
on a small random input against the MoE's router, so a router that computes something else
(sigmoid, grouped or biased routing) is refused rather than converted wrongly. Mixtral's
``router_jitter_noise`` (training only, scales the experts' input too) has no counterpart: the
MoE gets no jitter and a warning says so. The MoE has no auxiliary loss (``load_balance_coef=0``).

This module reads attributes only; transformers is needed to build blocks, not to import it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseroute.moe.layer import MoE
from sparseroute.moe.routers.topk import TopKRouter

__all__ = ["from_hf", "to_hf"]

_SUPPORTED = (
    "supported: a block with `gate` (weight [E, D], top_k, optional norm_topk_prob; a softmax top-k router "
    "returning (logits, scores, indices)), `experts` (gate_up_proj [E, 2F, D], down_proj [E, D, F], SiLU act_fn, "
    "no biases), optional `shared_expert` (gate_proj/up_proj/down_proj Linear, no bias, SiLU) and optional "
    "`shared_expert_gate` (Linear(D, 1), no bias), as in Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE"
)


def _unsupported(block: nn.Module, what: str) -> ValueError:
    return ValueError(f"unsupported MoE block {type(block).__name__}: {what}; {_SUPPORTED}")


@dataclass(frozen=True)
class _Spec:
    num_experts: int
    d_model: int
    d_ff: int
    top_k: int
    renormalize: bool
    shared_d_ff: int | None
    shared_gate: bool
    dtype: torch.dtype
    device: torch.device


def _param(block: nn.Module, module: Any, owner: str, name: str, ndim: int) -> Tensor:
    p = getattr(module, name, None)
    if not isinstance(p, Tensor):
        raise _unsupported(block, f"`{owner}` has no tensor `{name}` (found {type(p).__name__})")
    if p.dim() != ndim:
        raise _unsupported(block, f"`{owner}.{name}` must be {ndim}-D; found shape {tuple(p.shape)}")
    return p


def _check_silu(block: nn.Module, owner: str, act: Any) -> None:
    if not callable(act):
        raise _unsupported(block, f"`{owner}.act_fn` is missing (found {type(act).__name__})")
    t = torch.linspace(-6.0, 6.0, 49)
    try:
        with torch.no_grad():
            ok = torch.allclose(act(t), F.silu(t), rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 - any failure means "not a plain elementwise SiLU"
        ok = False
    if not ok:
        raise _unsupported(block, f"`{owner}.act_fn` is {type(act).__name__}, which does not compute SiLU")


def _check_linear(block: nn.Module, owner: str, lin: Any, shape: tuple[int, int]) -> None:
    w = _param(block, lin, owner, "weight", 2)
    if getattr(lin, "bias", None) is not None:
        raise _unsupported(block, f"`{owner}` has a bias")
    if tuple(w.shape) != shape:
        raise _unsupported(block, f"`{owner}.weight` has shape {tuple(w.shape)}, expected {shape}")


def _probe_renormalize(block: nn.Module, gate: nn.Module, E: int, D: int, k: int, w: Tensor) -> bool:
    """Renormalisation from ``norm_topk_prob``, else from a zero input (uniform probabilities)."""
    flag = getattr(gate, "norm_topk_prob", None)
    if flag is not None:
        if not isinstance(flag, bool):
            raise _unsupported(block, f"`gate.norm_topk_prob` must be a bool; found {flag!r}")
        return flag
    if k == E:  # all experts chosen: renormalising changes nothing
        return True
    scores = _call_gate(block, gate, torch.zeros(1, D, dtype=w.dtype, device=w.device), E, k)[1]
    total = float(scores.float().sum())
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if abs(total - 1.0) < tol:
        return True
    if abs(total - k / E) < tol:
        return False
    raise _unsupported(
        block,
        f"on a zero input the gate's top-{k} scores sum to {total:.4g}; a softmax top-k router gives "
        f"1 (renormalised) or {k}/{E} (not)",
    )


def _call_gate(block: nn.Module, gate: nn.Module, x_TD: Tensor, E: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        out = gate(x_TD)
    T = x_TD.shape[0]
    if (
        not isinstance(out, (tuple, list))
        or len(out) != 3
        or not all(isinstance(o, Tensor) for o in out)
        or tuple(out[1].shape) != (T, k)
        or tuple(out[2].shape) != (T, k)
    ):
        found = (
            f"a {type(out).__name__} of {len(out)}"
            if isinstance(out, (tuple, list))
            else f"a {type(out).__name__}"
            + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
        )
        raise _unsupported(block, f"`gate(x)` returned {found}, not (logits [T, E], scores [T, k], indices [T, k])")
    return out[0], out[1], out[2]


def _check_gate(block: nn.Module, gate: nn.Module, E: int, D: int, k: int, renormalize: bool, w: Tensor) -> None:
    """The gate must compute what ``TopKRouter`` computes (checked on a few random tokens)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, D, generator=gen).to(device=w.device, dtype=w.dtype)
    _, scores, idx = _call_gate(block, gate, x, E, k)
    with torch.no_grad():
        probs = F.linear(x, w).float().softmax(dim=-1)
        ref_p, _ = torch.topk(probs, k, dim=-1)
        if idx.dtype not in (torch.int32, torch.int64) or idx.min() < 0 or idx.max() >= E:
            raise _unsupported(block, "`gate(x)` returned indices that are not expert ids in [0, E)")
        got_p = probs.gather(1, idx.long()).sort(dim=-1, descending=True).values  # tolerant of exact ties
        ref_w = ref_p / ref_p.sum(dim=-1, keepdim=True) if renormalize else ref_p
        got_w = scores.float().gather(1, (-probs.gather(1, idx.long())).argsort(dim=-1))
    tol = 2e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if not torch.allclose(got_p, ref_p, rtol=tol, atol=tol):
        raise _unsupported(block, "the gate does not pick the experts with the k largest softmax probabilities")
    if not torch.allclose(got_w, ref_w, rtol=tol, atol=tol):
        raise _unsupported(
            block,
            "the gate's scores are not the top-k softmax probabilities"
            + (" renormalised to sum to 1" if renormalize else " (unrenormalised)"),
        )


def _inspect(block: Any) -> _Spec:
    if not isinstance(block, nn.Module):
        raise ValueError(f"expected a Hugging Face MoE block (an nn.Module); got {type(block).__name__}; {_SUPPORTED}")
    gate = getattr(block, "gate", None)
    experts = getattr(block, "experts", None)
    if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
        found = ", ".join(f"{n}={type(getattr(block, n, None)).__name__}" for n in ("gate", "experts"))
        raise _unsupported(block, f"it needs `gate` and `experts` submodules (found {found})")

    w = _param(block, gate, "gate", "weight", 2)
    E, D = w.shape
    k = getattr(gate, "top_k", None)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
        raise _unsupported(block, f"`gate.top_k` must be an int in [1, {E}]; found {k!r}")
    gate_up = _param(block, experts, "experts", "gate_up_proj", 3)
    down = _param(block, experts, "experts", "down_proj", 3)
    if down.shape[0] != E or down.shape[1] != D:
        raise _unsupported(block, f"`experts.down_proj` has shape {tuple(down.shape)}, expected [E={E}, D={D}, F]")
    Fh = down.shape[2]
    if tuple(gate_up.shape) != (E, 2 * Fh, D):
        raise _unsupported(
            block, f"`experts.gate_up_proj` has shape {tuple(gate_up.shape)}, expected [E, 2F, D] = {(E, 2 * Fh, D)}"
        )
    # flags set by transformers' use_experts_implementation (absent on plain modules: defaults)
    for flag, want in (
        ("is_transposed", False),
        ("is_concatenated", True),
        ("has_gate", True),
        ("has_bias", False),
        ("has_post_expert_norm", False),
    ):
        value = getattr(experts, flag, want)
        if value != want:
            raise _unsupported(block, f"`experts.{flag}` is {value!r} (only {want!r} is supported)")
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
        raise _unsupported(block, "`experts` overrides `_apply_gate` (a custom gated activation)")
    _check_silu(block, "experts", getattr(experts, "act_fn", None))
    scale = getattr(block, "routed_scaling_factor", getattr(gate, "routed_scaling_factor", 1.0))
    if scale != 1.0:
        raise _unsupported(block, f"routed_scaling_factor={scale!r} (only 1.0)")

    shared = getattr(block, "shared_expert", None)
    shared_gate = getattr(block, "shared_expert_gate", None)
    shared_ff = None
    expected = {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    if shared is not None:
        if not isinstance(shared, nn.Module):
            raise _unsupported(block, f"`shared_expert` is a {type(shared).__name__}, not a module")
        gp = _param(block, getattr(shared, "gate_proj", None), "shared_expert.gate_proj", "weight", 2)
        shared_ff = gp.shape[0]
        _check_linear(block, "shared_expert.gate_proj", shared.gate_proj, (shared_ff, D))
        _check_linear(block, "shared_expert.up_proj", getattr(shared, "up_proj", None), (shared_ff, D))
        _check_linear(block, "shared_expert.down_proj", getattr(shared, "down_proj", None), (D, shared_ff))
        _check_silu(block, "shared_expert", getattr(shared, "act_fn", None))
        expected |= {f"shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")}
    if shared_gate is not None:
        if shared is None:
            raise _unsupported(block, "it has `shared_expert_gate` but no `shared_expert`")
        _check_linear(block, "shared_expert_gate", shared_gate, (1, D))
        expected.add("shared_expert_gate.weight")

    params = dict(block.named_parameters())
    extra = sorted(set(params) - expected) + [f"{n} (buffer)" for n, b in block.named_buffers() if b is not None]
    if extra:
        raise _unsupported(block, f"it holds tensors this converter does not map: {', '.join(extra)}")
    dtypes = {p.dtype for p in params.values()}
    devices = {p.device for p in params.values()}
    if len(dtypes) != 1 or len(devices) != 1:
        raise _unsupported(
            block, f"its parameters must share one dtype and device; found {sorted(map(str, dtypes | devices))}"
        )

    renormalize = _probe_renormalize(block, gate, E, D, k, w)
    _check_gate(block, gate, E, D, k, renormalize, w)
    return _Spec(E, D, Fh, k, renormalize, shared_ff, shared_gate is not None, w.dtype, w.device)


def from_hf(block: nn.Module, *, dispatch: str = "auto") -> MoE:
    """Build an :class:`MoE` computing what the Hugging Face MoE ``block`` computes (in eval mode),
    with copies of its weights, on the block's dtype and device. ``MoE(x)[0]`` matches ``block(x)``
    (the same routing decisions; the outputs up to the summation order of the products). The MoE
    runs on the same executor as any ``MoE(...)`` (``dispatch="auto"``: the compiled
    expert-parallel kernel on the CPU, grouped matmuls on CUDA); ``dispatch=`` picks another.

    Raises ValueError, saying what was found, for a block this module cannot represent.
    """
    spec = _inspect(block)
    jitter = getattr(block, "jitter_noise", 0.0) or 0.0
    if jitter > 0:
        warnings.warn(
            f"{type(block).__name__} has router jitter noise {jitter} (training only, applied to the experts' input "
            "as well); the converted MoE has none, so only eval-mode outputs agree",
            stacklevel=2,
        )
    options: dict[str, Any] = {}
    if spec.shared_d_ff is not None:
        options.update(num_shared_experts=1, shared_d_ff=spec.shared_d_ff, shared_gate=spec.shared_gate)
    with torch.device(spec.device):
        moe = MoE(
            spec.d_model,
            spec.d_ff,
            spec.num_experts,
            spec.top_k,
            router="topk",
            router_options={"renormalize": spec.renormalize, "load_balance_coef": 0.0},
            activation="swiglu",
            dispatch=dispatch,
            **options,
        )
    moe.to(dtype=spec.dtype)
    _copy(block, moe, to_block=False)
    moe.train(block.training)
    return moe


def to_hf(moe: MoE, block: nn.Module) -> nn.Module:
    """Write ``moe``'s weights into the Hugging Face MoE ``block`` in place and return the block.

    The MoE must have the block's shapes and conventions: a softmax top-k router with the block's
    renormalisation, SwiGLU experts, and a shared expert (gated or not) exactly where the block has one.
    Raises ValueError otherwise. A capacity factor (dropping) has no counterpart in the dropless block: warning.
    """
    if not isinstance(moe, MoE):
        raise ValueError(f"to_hf needs a sparseroute MoE; got {type(moe).__name__}")
    spec = _inspect(block)
    cfg = moe.config
    problems = []
    if type(moe.router) is not TopKRouter:
        problems.append(f"router {cfg.router!r} ({type(moe.router).__name__}); the block needs 'topk' (softmax top-k)")
    if cfg.activation != "swiglu":
        problems.append(f"activation {cfg.activation!r}; the block needs 'swiglu'")
    got = (cfg.num_experts, moe.d_model, cfg.d_ff, cfg.top_k)
    want = (spec.num_experts, spec.d_model, spec.d_ff, spec.top_k)
    if got != want:
        problems.append(f"(num_experts, d_model, d_ff, top_k) = {got}; the block has {want}")
    if not problems and type(moe.router) is TopKRouter and spec.top_k < spec.num_experts:
        if moe.router.renormalize() != spec.renormalize:
            problems.append(
                f"renormalize={moe.router.renormalize()} but the block's gate "
                f"{'always renormalises' if spec.renormalize else 'does not renormalise'} the top-k weights"
                + (" (set block.gate.norm_topk_prob)" if hasattr(block.gate, "norm_topk_prob") else "")
            )
    got_shared = None if moe.shared is None else (moe.shared.mlp.d_ff, moe.shared.gate is not None)
    want_shared = None if spec.shared_d_ff is None else (spec.shared_d_ff, spec.shared_gate)
    if got_shared != want_shared:
        problems.append(f"shared expert (d_ff, gated) = {got_shared}; the block has {want_shared}")
    elif moe.shared is not None and moe.shared.mlp.activation != "swiglu":
        problems.append(f"shared expert activation {moe.shared.mlp.activation!r}; the block needs 'swiglu'")
    if problems:
        raise ValueError(f"cannot write this MoE into {type(block).__name__}: " + "; ".join(problems))
    if cfg.capacity_factor is not None:
        warnings.warn(
            f"the MoE drops tokens (capacity_factor={cfg.capacity_factor}); the Hugging Face block is dropless",
            stacklevel=2,
        )
    _copy(block, moe, to_block=True)
    return block


def _copy(block: nn.Module, moe: MoE, *, to_block: bool) -> None:
    """Copy weights one way; shapes were validated by the callers."""
    ex = block.experts
    pairs: list[tuple[Tensor, Tensor]] = [  # (HF tensor, MoE tensor in the HF layout)
        (ex.gate_up_proj, moe.experts.w_in.transpose(1, 2)),
        (ex.down_proj, moe.experts.w_out.transpose(1, 2)),
        (block.gate.weight, moe.router.weight),
    ]
    if moe.shared is not None:
        se, Fs = block.shared_expert, moe.shared.mlp.d_ff
        w_in = moe.shared.mlp.w_in[0]  # [D, 2Fs]
        pairs += [
            (se.gate_proj.weight, w_in[:, :Fs].T),
            (se.up_proj.weight, w_in[:, Fs:].T),
            (se.down_proj.weight, moe.shared.mlp.w_out[0].T),
        ]
        if moe.shared.gate is not None:
            pairs.append((block.shared_expert_gate.weight, moe.shared.gate.weight))
    with torch.no_grad():
        for hf_t, ours in pairs:
            if tuple(hf_t.shape) != tuple(ours.shape):  # defensive: callers validated
                raise ValueError(f"shape mismatch: block {tuple(hf_t.shape)} vs MoE {tuple(ours.shape)}")
            if to_block:
                hf_t.copy_(ours)
            else:
                ours.copy_(hf_t)  # writes through the transposed / sliced views into the MoE's parameters
