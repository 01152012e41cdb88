"""The CUDA paths (marked ``gpu``; skipped where no CUDA device is present).

Every case of test_moe_equivalence runs on the device through the executors that take CUDA
tensors ("grouped", "loop" and "auto", which picks "grouped" there) against the "reference"
executor on the same device; the fp32 layer on the device agrees with the CPU's; the grouped
executor really calls ``F.grouped_mm`` there; a small language model gives the CPU's logits,
losses and gradients there; and a small MoE language model trains on the device.
``benchmarks/cuda_checks.sh`` runs these with the benchmarks on ``cuda``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from test_moe_equivalence import CASES, Case, _build, _run, check_matches_reference, grouped_mm_calls

DEVICE = "cuda"
CUDA_EXECUTORS = ("grouped", "loop", "auto")

pytestmark = pytest.mark.gpu


def check_device_agrees_with_cpu(device: str) -> None:
    """The fp32 layer on ``device`` gives the CPU's routing, output and gradients (a topk router
    in eval mode, so no randomness; the logits are far from ties at this size)."""
    case = Case("cpu-vs-device", E=8, k=2, shape=(4, 16), D=64, F=32)
    moe, x, ids, g = _build(case)
    y_cpu, g_cpu, r_cpu = _run(moe, x, ids, g, "auto")
    y, grads, r = _run(moe.to(device), x.to(device), ids, g.to(device), "auto")
    assert_close(r.indices.cpu(), r_cpu.indices, rtol=0, atol=0)
    assert_close(r.weights.cpu(), r_cpu.weights, atol=1e-5, rtol=1e-5)
    assert_close(y.cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    for name in g_cpu:
        assert_close(grads[name].cpu(), g_cpu[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


def check_lm_agrees_with_cpu(device: str, router: str | None) -> None:
    """A small language model (dense, or MoE with ``router``) on ``device`` gives the CPU's
    logits, auxiliary losses and parameter gradients in fp32 (eval mode: no routing noise)."""
    from sparseroute.models import LMConfig, TransformerLM
    from sparseroute.moe import MoEConfig

    moe = None if router is None else MoEConfig(num_experts=4, top_k=2, router=router)
    cfg = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, moe=moe)
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))

    def run(m: TransformerLM, x: torch.Tensor):
        m.zero_grad(set_to_none=True)
        out = m(x)
        loss = out.logits.float().square().mean() + sum(out.aux_losses.values())
        loss.backward()
        grads = {n: p.grad.detach().cpu() for n, p in m.named_parameters() if p.grad is not None}
        return out.logits.detach().cpu(), {k: float(v.detach()) for k, v in out.aux_losses.items()}, grads

    logits_cpu, aux_cpu, grads_cpu = run(model, ids)
    logits, aux, grads = run(model.to(device), ids.to(device))
    assert_close(logits, logits_cpu, atol=1e-4, rtol=1e-4)
    assert aux.keys() == aux_cpu.keys()
    for k in aux:
        assert abs(aux[k] - aux_cpu[k]) <= 1e-4 * max(1.0, abs(aux_cpu[k])), (k, aux[k], aux_cpu[k])
    assert grads.keys() == grads_cpu.keys() and grads
    for n in grads:
        assert_close(grads[n], grads_cpu[n], atol=1e-4, rtol=1e-3, msg=lambda m, n=n: f"grad {n}: {m}")


def check_training_learns(tmp_path, device: str) -> None:
    """A small MoE language model trains on ``device``: the loss falls and ends finite."""
    args = ["train", "--depth", "2", "--seq-len", "64", "--batch-size", "8", "--max-bytes", "400k",
            "--eval-tokens", "4096", "--router", "topk", "--tokens", "100k", "--lr", "3e-3",
            "--device", device, "--out", str(tmp_path / "run"), "--quiet"]
    env = dict(os.environ, SPARSEROUTE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "sparseroute", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5, (metrics[0]["loss"], metrics[-1]["loss"])
    assert final["val_loss"] == final["val_loss"] and final["val_loss"] < metrics[0]["loss"]


@pytest.mark.parametrize("dispatch", CUDA_EXECUTORS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_reference(case: Case, dispatch: str) -> None:
    check_matches_reference(case, dispatch, DEVICE)


def test_cuda_agrees_with_cpu() -> None:
    check_device_agrees_with_cpu(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_grouped_calls_grouped_mm(monkeypatch, dtype: torch.dtype) -> None:
    assert grouped_mm_calls(monkeypatch, 48, 64, 32, 8, dtype, DEVICE) == 2  # up and down projection


@pytest.mark.parametrize("router", [None, "topk", "sigmoid"])
def test_cuda_lm_agrees_with_cpu(router) -> None:
    check_lm_agrees_with_cpu(DEVICE, router)


def test_cuda_training_learns(tmp_path) -> None:
    """A small MoE language model trains on the device: the loss falls and ends finite."""
    check_training_learns(tmp_path, DEVICE)
