"""sparseroute on a torch built without oneDNN: it imports, resolves every product to ATen, and
trains an MoE layer and an LM step. Simulated in a fresh process where torch reports no oneDNN
and has no oneDNN linear op."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json
    import torch
    torch.backends.mkldnn.is_available = lambda: False   # as in a torch built without oneDNN
    torch.ops.mkldnn.__dict__.pop("_linear_pointwise", None)
    import sparseroute.moe
    from sparseroute.kernels import backend, gemm, ops, plan
    from sparseroute.models import TransformerLM, preset
    from sparseroute.moe import MoE, MoEConfig
    torch.manual_seed(0)
    out = {"resolved": backend.resolved_backend(), "uses_onednn": gemm.uses_onednn(torch.empty(0))}
    try:
        backend.set_backend("onednn")
        out["onednn_refused"] = False
    except ValueError as e:
        out["onednn_refused"] = "no oneDNN" in str(e)
    moe = MoE(32, 16, 8, 2)
    x = torch.randn(40, 32, requires_grad=True)
    y, r = moe(x)
    (y.square().mean() + sum(r.losses.values())).backward()
    ref, _ = moe(x.detach(), dispatch="reference")
    out["moe_close"] = bool(torch.allclose(y.detach(), ref, rtol=1e-4, atol=1e-5))
    out["grad_finite"] = bool(torch.isfinite(x.grad).all())
    if ops.available():
        p = plan.expert_plan(torch.float32, 32, 16, 8, 2, "swiglu", torch.get_num_threads())
        out["plan"] = sorted(set(p.backends))
    lm = TransformerLM(preset("tiny", moe=MoEConfig(num_experts=4, top_k=2)))
    ids = torch.randint(0, 256, (2, 16))
    lm(ids).logits.float().mean().backward()
    out["lm_ok"] = True
    print(json.dumps(out))
""")


def test_sparseroute_runs_on_aten_without_onednn():
    env = dict(os.environ)
    env.pop("SPARSEROUTE_GEMM", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["resolved"] == "aten" and out["uses_onednn"] is False
    assert out["onednn_refused"] is True
    assert out["moe_close"] and out["grad_finite"] and out["lm_ok"]
    if "plan" in out:  # the compiled kernels' products too: on ATen only
        assert out["plan"] == ["aten"]
