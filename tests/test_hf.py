"""from_hf / to_hf against tiny randomly initialised Hugging Face MoE blocks (no hub downloads)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

from sparseroute.kernels import ops  # noqa: E402
from sparseroute.moe import MoE  # noqa: E402
from sparseroute.integrations.hf import from_hf, to_hf  # noqa: E402

D, FF, E, K = 32, 16, 6, 2
IMPLS = ["eager", "batched_mm", "grouped_mm"]


def _make(kind: str, impl: str = "eager", seed: int = 0) -> nn.Module:
    common = dict(hidden_size=D, num_experts_per_tok=K, hidden_act="silu")
    if kind == "mixtral":
        cfg = MixtralConfig(intermediate_size=FF, num_local_experts=E, router_jitter_noise=0.0, **common)
        cls = MixtralSparseMoeBlock
    elif kind == "qwen2":
        cfg = Qwen2MoeConfig(
            moe_intermediate_size=FF, shared_expert_intermediate_size=24, num_experts=E, norm_topk_prob=False, **common
        )
        cls = Qwen2MoeSparseMoeBlock
    elif kind.startswith("qwen3"):
        cfg = Qwen3MoeConfig(moe_intermediate_size=FF, num_experts=E, norm_topk_prob=kind.endswith("norm"), **common)
        cls = Qwen3MoeSparseMoeBlock
    elif kind == "olmoe":
        cfg, cls = OlmoeConfig(intermediate_size=FF, num_experts=E, norm_topk_prob=False, **common), OlmoeSparseMoeBlock
    else:
        raise AssertionError(kind)
    cfg._experts_implementation = impl
    block = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():  # experts start as torch.empty, routers as zeros
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return block.eval()


def _x(seed: int = 1, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def _out(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = block(x)
    assert isinstance(y, torch.Tensor), type(y)  # all four return a plain tensor in transformers 5
    return y


KINDS = ["mixtral", "qwen2", "qwen3", "qwen3_norm", "olmoe"]
RENORM = {"mixtral": True, "qwen2": False, "qwen3": False, "qwen3_norm": True, "olmoe": False}


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches(kind):
    block = _make(kind)
    moe = from_hf(block)
    assert moe.config.router_options["renormalize"] is RENORM[kind]
    assert (moe.shared is not None) == (kind == "qwen2")
    x = _x()
    with torch.no_grad():
        for impl in IMPLS:  # the HF experts' forward is picked per call from config._experts_implementation
            block.experts.config._experts_implementation = impl
            y_hf = _out(block, x)
            assert y_hf.abs().mean() > 1e-2  # not a trivially zero output
            for dispatch in (None, "grouped", "loop", "fused") + (("parallel",) if ops.available() else ()):
                y, routing = moe(x, dispatch=dispatch)
                torch.testing.assert_close(y, y_hf, msg=lambda m: f"{impl=} {dispatch=}: {m}")
                assert routing.losses == {}
            # the same routing decisions as the block's own gate, exactly
            _, _, hf_idx = block.gate(x.reshape(-1, x.shape[-1]))
            assert torch.equal(routing.indices.sort(dim=1).values, hf_idx.long().sort(dim=1).values)
    # the converted MoE runs on the same executor as MoE(...) (the fast CPU path), unless told otherwise
    assert moe.config.dispatch == "auto"
    assert from_hf(block, dispatch="loop").config.dispatch == "loop"


def test_shared_expert_mapping():
    block = _make("qwen2")
    moe = from_hf(block)
    assert moe.config.shared_d_ff == 24 and moe.config.shared_gate
    x = _x().reshape(-1, D)
    with torch.no_grad():
        ref = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        torch.testing.assert_close(moe.shared(x), ref)


def test_renormalize_matters():
    """Guard against a vacuous comparison: the wrong convention must change the output."""
    block = _make("qwen3")
    moe = from_hf(block)
    wrong = MoE(D, FF, E, K, router_options={"renormalize": True, "load_balance_coef": 0.0})
    wrong.load_state_dict(moe.state_dict())
    x = _x()
    with torch.no_grad():
        assert not torch.allclose(wrong(x)[0], _out(block, x), atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind):
    block = _make(kind, "grouped_mm")
    moe = from_hf(block)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x = _x(seed=3)
    with torch.no_grad():
        before = _out(block, x)
        assert not torch.allclose(moe(x)[0], before, atol=1e-3)
        assert to_hf(moe, block) is block
        torch.testing.assert_close(_out(block, x), moe(x)[0])
        # and back again: a fresh conversion reproduces the modified weights exactly
        again = from_hf(block)
    for (n, a), (_, b) in zip(moe.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_of_input(kind):
    block = _make(kind, "grouped_mm")
    moe = from_hf(block)
    x1, x2 = _x(requires_grad=True), _x(requires_grad=True)
    cot = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(5))
    (_out(block, x1) * cot).sum().backward()
    (moe(x2)[0] * cot).sum().backward()
    assert x1.grad.abs().sum() > 0
    torch.testing.assert_close(x2.grad, x1.grad)
    # weight gradients line up with the mapping too
    torch.testing.assert_close(moe.experts.w_in.grad, block.experts.gate_up_proj.grad.transpose(1, 2))
    torch.testing.assert_close(moe.router.weight.grad, block.gate.weight.grad)


def test_dtype_and_device_follow_block():
    block = _make("olmoe").to(torch.float64)
    moe = from_hf(block, dispatch="loop")  # grouped_mm has no float64 kernel
    assert moe.experts.w_in.dtype == torch.float64 and moe.router.weight.dtype == torch.float64
    x = _x().double()
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], _out(block, x))


def test_missing_experts_raises():
    block = _make("qwen3")
    del block.experts
    with pytest.raises(ValueError, match="experts"):
        from_hf(block)


def test_unsupported_blocks_raise():
    block = _make("mixtral")
    block.experts.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="SiLU"):
        from_hf(block)

    block = _make("qwen2")
    block.shared_expert.up_proj = nn.Linear(D, 24, bias=True)
    with pytest.raises(ValueError, match="bias"):
        from_hf(block)

    block = _make("olmoe")
    block.experts.down_proj_bias = nn.Parameter(torch.zeros(E, D))
    with pytest.raises(ValueError, match="down_proj_bias"):
        from_hf(block)

    class SigmoidGate(nn.Module):  # right attributes, wrong function
        def __init__(self, gate):
            super().__init__()
            self.weight, self.top_k, self.norm_topk_prob = gate.weight, gate.top_k, False

        def forward(self, x):
            logits = x @ self.weight.T
            s, i = torch.sigmoid(logits).topk(self.top_k, dim=-1)
            return logits, s, i

    block = _make("qwen3")
    block.gate = SigmoidGate(block.gate)
    with pytest.raises(ValueError, match="softmax"):
        from_hf(block)

    with pytest.raises(ValueError, match="nn.Module"):
        from_hf(object())


def test_to_hf_mismatch_raises():
    block = _make("qwen3")
    with pytest.raises(ValueError, match="num_experts"):
        to_hf(MoE(D, FF, E + 2, K, router_options={"renormalize": False}), block)
    with pytest.raises(ValueError, match="d_ff"):
        to_hf(MoE(D, FF * 2, E, K, router_options={"renormalize": False}), block)
    with pytest.raises(ValueError, match="renormalize"):
        to_hf(MoE(D, FF, E, K, router_options={"renormalize": True}), block)
    with pytest.raises(ValueError, match="shared expert"):
        to_hf(MoE(D, FF, E, K, router_options={"renormalize": False}, shared_d_ff=8), block)
    with pytest.raises(ValueError, match="shared expert"):  # block has a gated one, MoE an ungated one
        to_hf(MoE(D, FF, E, K, router_options={"renormalize": False}, shared_d_ff=24), _make("qwen2"))
    with pytest.raises(ValueError, match="router"):
        to_hf(MoE(D, FF, E, K, router="sigmoid"), block)
    before = block.experts.gate_up_proj.detach().clone()
    with pytest.raises(ValueError):
        to_hf(MoE(D, FF, E + 2, K, router_options={"renormalize": False}), block)
    assert torch.equal(block.experts.gate_up_proj, before)  # nothing written on failure


def test_mixtral_jitter_warns():
    block = _make("mixtral")
    block.jitter_noise = 0.1
    with pytest.warns(UserWarning, match="jitter"):
        from_hf(block)
