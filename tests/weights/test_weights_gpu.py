"""2:4 semi-structured weights on a CUDA device (skipped where none is present): the converted
layers compute what the dense masked product computes, and the packed file round-trips there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseroute.weights import SparseLinear, sparsify
from sparseroute.weights.export import load_packed, save_packed, to_semi_structured

pytestmark = pytest.mark.gpu


def _sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not _sm80(), reason="2:4 kernels need compute capability 8.0+")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_semi_structured_matches_the_dense_masked_product(dtype, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256, bias=bias), nn.GELU(), nn.Linear(256, 128, bias=bias))
    model = model.to("cuda", dtype)
    sparsify(model, "2:4", filter=(nn.Linear,))
    x = torch.randn(4, 64, 512, device="cuda", dtype=dtype)  # 3-D input: [B, S, D]
    with torch.no_grad():
        ref = model(x).float()
        h = F.gelu(F.linear(x, model[0].masked_weight(), model[0].bias))
        manual = F.linear(h, model[2].masked_weight(), model[2].bias).float()
        assert torch.equal(ref, manual)
        names = to_semi_structured(model)
        assert names == ["0", "2"] and not any(isinstance(m, SparseLinear) for m in model)
        out = model(x).float()
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert torch.allclose(out, ref, rtol=tol, atol=tol), float((out - ref).abs().max())


@pytest.mark.skipif(not _sm80(), reason="2:4 kernels need compute capability 8.0+")
def test_semi_structured_refuses_fp32_and_changes_nothing():
    model = nn.Sequential(nn.Linear(128, 64)).cuda()
    sparsify(model, "2:4")
    with pytest.raises(ValueError, match="float16"):
        to_semi_structured(model)
    assert isinstance(model[0], SparseLinear)


def test_packed_round_trip_from_cuda(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64)).to("cuda", torch.bfloat16)
    sparsify(model, "2:4")
    save_packed(model, tmp_path / "p.safetensors")
    sd = load_packed(tmp_path / "p.safetensors", device="cuda")
    assert sd["0.weight"].device.type == "cuda"
    assert torch.equal(sd["0.weight"], model[0].masked_weight())
    assert torch.equal(sd["0.mask"], model[0].mask)
