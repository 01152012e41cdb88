"""The compiled expert-parallel executor ("parallel"): it builds ahead of use (load() never
builds), its codes come from one definition (sparseroute.kernels.codes), each of its six products
runs where the caller's backends list says and an impossible request is refused with the reason,
it is deterministic for a thread count, and the test hooks live in the test module only (its
gradcheck is in test_dispatch_gradcheck.py)."""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import sparseroute
from sparseroute.kernels import codes, plan
from sparseroute.kernels import extension as cpu_kernels
from sparseroute.moe import MoE

DISABLED = os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1"
needs_kernels = pytest.mark.skipif(DISABLED, reason="compiled kernels disabled by SPARSEROUTE_NO_EXTENSIONS=1")

#: the names bound in the test module only
HOOKS = ("_set_stealing", "_steals", "_set_fail_stolen", "_set_owner_delay_us", "_row_gemm", "_row_gemm_tn", "_transpose",
         "_bf16_round_trip")
#: the capability queries, in both modules
QUERIES = ("onednn_usable", "onednn_usable_for", "row_gemm_runs")


def backends(spec="aten"):
    """The kernel's backends list: one backend name for all six products, or a name per product."""
    return codes.backend_codes(spec)


@pytest.fixture
def kernels():
    """The shipped module (built by the session fixture in conftest.py)."""
    if DISABLED:
        pytest.skip("compiled kernels disabled by SPARSEROUTE_NO_EXTENSIONS=1")
    module = cpu_kernels.load()
    assert module is not None, cpu_kernels.unavailable_reason()
    return module


def _needs_own(kernels):
    if not kernels.row_gemm_runs(16):
        pytest.skip("the kernel's own row products need AVX-512")


def _needs_onednn(kernels, dtype=torch.float32):
    if not kernels.onednn_usable_for(torch.empty(0, dtype=dtype)):
        pytest.skip(f"oneDNN's {dtype} matmul does not run here")


# -- building and loading --------------------------------------------------------------------


def test_kernel_builds():
    """The kernels must build wherever the test suite runs (a compiler and ninja are part of the
    dev install; the session fixture builds them); only an explicit SPARSEROUTE_NO_EXTENSIONS=1
    turns them off."""
    module = cpu_kernels.load()
    if DISABLED:
        assert module is None and "SPARSEROUTE_NO_EXTENSIONS" in cpu_kernels.unavailable_reason()
    else:
        assert module is not None, cpu_kernels.unavailable_reason()
        assert cpu_kernels.unavailable_reason() is None
        assert Path(module.__file__).parent == cpu_kernels.build_dir()


@needs_kernels
def test_the_test_hooks_are_in_the_test_module_only(kernels, testing_kernels):
    """The shipped module has none of the test hooks; the test module, built from the same
    sources with SPARSEROUTE_TESTING=1, has all of them; both have the capability queries."""
    assert kernels is not testing_kernels
    assert not kernels.TESTING and testing_kernels.TESTING
    assert testing_kernels.__name__ == cpu_kernels.module_name(testing=True) == cpu_kernels.module_name() + "_testing"
    assert [name for name in dir(kernels) if name in HOOKS or name.startswith("_") and not name.startswith("__")] == []
    assert [name for name in HOOKS if not hasattr(testing_kernels, name)] == []
    for module in (kernels, testing_kernels):
        assert all(callable(getattr(module, name)) for name in QUERIES)
    assert cpu_kernels.load() is testing_kernels  # the fixture's stand-in for the MoE layer's calls
    # the L2 rule is the plan's alone (sparseroute.kernels.plan.own_fits), not the kernel's
    assert not any(hasattr(module, name) for module in (kernels, testing_kernels) for name in ("row_gemm_fits", "l2_cache_bytes"))
    assert plan.own_fits(64, 64) and not plan.own_fits(1 << 20, 1 << 10)


def test_load_does_not_build(tmp_path, monkeypatch):
    """Under a fresh cache root load() returns None, says the kernels are not built and how to
    build them, and has not so much as made the build folder."""
    monkeypatch.delenv("SPARSEROUTE_NO_EXTENSIONS", raising=False)
    monkeypatch.setenv("SPARSEROUTE_KERNELS_CACHE", str(tmp_path / "kernels"))
    for testing in (False, True):
        assert cpu_kernels.load(testing=testing) is None
        reason = cpu_kernels.unavailable_reason(testing=testing)
        assert "not built" in reason
        assert cpu_kernels.build_dir(testing=testing).parent == tmp_path / "kernels"
    assert "`sparseroute kernels build`" in cpu_kernels.unavailable_reason()
    assert not (tmp_path / "kernels").exists()
    assert cpu_kernels.workspace_state() is None  # acts on a built module only
    cpu_kernels.set_workspace_limits(8, 1 << 20)  # nothing to act on: does nothing


def test_disabled_kernels_neither_load_nor_build(monkeypatch):
    monkeypatch.setenv("SPARSEROUTE_NO_EXTENSIONS", "1")
    assert cpu_kernels.load() is None and cpu_kernels.load(testing=True) is None
    assert "SPARSEROUTE_NO_EXTENSIONS=1" in cpu_kernels.unavailable_reason()
    with pytest.raises(cpu_kernels.KernelBuildError, match="SPARSEROUTE_NO_EXTENSIONS=1"):
        cpu_kernels.build()
    assert cpu_kernels.workspace_state() is None


@pytest.mark.skipif(os.name != "posix", reason="a shell script stands in for the compiler")
def test_a_failed_build_raises_its_first_error_with_the_log(tmp_path, monkeypatch):
    """A compiler that fails: build() raises KernelBuildError with the compiler's first error and
    the log's path, after the progress line; load() then returns None and says the build failed."""
    compiler = tmp_path / "cxx"
    compiler.write_text('#!/bin/sh\ncase "$1" in --version|-v|-dumpversion) echo "g++ (GCC) 13.3.0"; exit 0;; esac\n'
                        'echo "broken.cpp:1:2: error: this compiler always fails" >&2\nexit 1\n')
    compiler.chmod(0o755)
    monkeypatch.delenv("SPARSEROUTE_NO_EXTENSIONS", raising=False)
    monkeypatch.setenv("SPARSEROUTE_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    log = cpu_kernels.build_dir() / "build.log"
    with pytest.raises(cpu_kernels.KernelBuildError, match="error: this compiler always fails") as failure:
        cpu_kernels.build()
    assert str(log) in str(failure.value) and "FAILED" in log.read_text()
    assert cpu_kernels.load() is None
    reason = cpu_kernels.unavailable_reason()
    assert "failed" in reason and "this compiler always fails" in reason and str(log) in reason
    assert not (cpu_kernels.build_dir() / "built.json").exists()


def test_the_build_folder_follows_the_sources_and_the_flags(tmp_path, monkeypatch):
    """<module>-<sparseroute version>-torch<torch version>-<16 hex>: another flag, another code,
    an edited header or source gives another folder; the same inputs the same one. (No build.)"""
    name, flags = cpu_kernels.module_name(), cpu_kernels.build_flags()
    base = cpu_kernels._folder_name(name, flags)
    assert re.fullmatch(rf"{name}-{re.escape(sparseroute.__version__)}-torch{re.escape(torch.__version__)}-[0-9a-f]{{16}}", base)
    assert cpu_kernels._folder_name(name, list(flags)) == base
    assert cpu_kernels._folder_name(name, [*flags, "-DSPARSEROUTE_SOMETHING=1"]) != base
    assert cpu_kernels._folder_name(name, [f if f != "-O3" else "-O2" for f in flags]) != base
    assert cpu_kernels._folder_name(name, flags, ldflags=["-fopenmp", "-lm"]) != base
    assert all(flag in flags for flag in codes.compile_definitions())  # a changed code is a changed flag
    monkeypatch.setattr(codes, "BACKENDS", ("onednn", "aten", "own"))
    assert cpu_kernels._folder_name(name, cpu_kernels.build_flags()) != base
    monkeypatch.undo()
    testing_flags = cpu_kernels.build_flags(testing=True)
    assert testing_flags == [*flags, "-DSPARSEROUTE_TESTING=1"]
    testing_name = cpu_kernels._folder_name(cpu_kernels.module_name(testing=True), testing_flags)
    assert testing_name.startswith(f"{name}_testing-") and testing_name.split("-")[-1] != base.split("-")[-1]
    csrc = tmp_path / "csrc"
    shutil.copytree(cpu_kernels._CSRC, csrc)
    assert cpu_kernels._folder_name(name, flags, csrc=csrc) == base
    for file in ("row_gemm.h", "mlp_forward.cpp"):
        (csrc / file).write_text((csrc / file).read_text() + "\n// edited\n")
        assert cpu_kernels._folder_name(name, flags, csrc=csrc) != base
    monkeypatch.setenv("SPARSEROUTE_KERNELS_CACHE", str(tmp_path / "root"))
    assert cpu_kernels.build_dir() == tmp_path / "root" / base
    assert cpu_kernels.cache_root() == tmp_path / "root"
    monkeypatch.setenv("SPARSEROUTE_CACHE", str(tmp_path / "data"))  # the data cache: not the kernels'
    assert cpu_kernels.cache_root() == tmp_path / "root"
    monkeypatch.delenv("SPARSEROUTE_KERNELS_CACHE")
    assert cpu_kernels.cache_root() == Path.home() / ".cache" / "sparseroute" / "kernels"


@needs_kernels
def test_a_killed_builds_lock_does_not_hang_the_next_build(tmp_path, monkeypatch):
    """torch's builder waits for as long as a `lock` file exists in the build folder, and a build
    killed midway leaves one behind. build() removes it under its own lock (one that dies with its
    holder) before compiling, so the build finishes; then load() imports what it built, in a
    fresh process and in this one, without building. One real build, in a fresh cache root, in a
    child process (a hang would time out there, not block pytest): under a minute here, so not
    marked slow."""
    monkeypatch.setenv("SPARSEROUTE_KERNELS_CACHE", str(tmp_path))
    assert cpu_kernels.load() is None
    folder = cpu_kernels.build_dir()
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what torch's FileBaton leaves when its build is killed

    def child(code):
        run = subprocess.run([sys.executable, "-c", "from sparseroute.kernels import extension\n" + code],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run

    built = child("print(extension.build().__file__)")
    assert re.search(r"sparseroute: building the CPU kernels \(about a minute\)… done in \d+ s", built.stderr), built.stderr
    assert Path(built.stdout.strip()).parent == folder
    assert not (folder / "lock").exists() and (folder / "built.json").exists()
    log = (folder / "build.log").stat().st_mtime_ns
    loaded = child("m = extension.load(); print(m.__file__, extension.unavailable_reason())")
    assert loaded.stdout.split() == [built.stdout.strip(), "None"] and "building" not in loaded.stderr
    # in this process: a module of this name is loaded already (pybind11 then hands out that one),
    # so what counts is that load() finds the build and build() does not compile again
    assert cpu_kernels.load() is not None and cpu_kernels.unavailable_reason() is None
    assert cpu_kernels.build() is cpu_kernels.load()
    assert (folder / "build.log").stat().st_mtime_ns == log


# -- codes --------------------------------------------------------------------------------------


def test_codes_have_one_definition():
    assert codes.ACTIVATIONS == ("swiglu", "gelu", "silu", "relu")
    assert codes.BACKENDS == ("aten", "onednn", "own")
    assert codes.PRODUCTS == ("up", "down", "grad_act", "grad_x", "grad_w_in", "grad_w_out")
    assert [codes.activation_code(a) for a in codes.ACTIVATIONS] == [0, 1, 2, 3]
    assert codes.backend_code("own") == 2 and codes.product_code("grad_w_out") == 5
    defs = codes.compile_definitions()
    assert "-DSPARSEROUTE_ACT_SWIGLU=0" in defs and "-DSPARSEROUTE_BACKEND_ONEDNN=1" in defs
    assert "-DSPARSEROUTE_PRODUCT_GRAD_X=3" in defs and defs[-1] == "-DSPARSEROUTE_NUM_PRODUCTS=6"
    assert len(defs) == 4 + 3 + 6 + 1
    assert backends("own") == [2] * 6
    assert backends(["aten", "onednn", "own", "aten", "onednn", "own"]) == [0, 1, 2, 0, 1, 2]
    assert backends(dict(zip(codes.PRODUCTS, ["own"] * 5 + ["aten"]))) == [2] * 5 + [0]
    with pytest.raises(ValueError, match=r"unknown backend 'mkl'; known: \['aten', 'onednn', 'own'\]"):
        backends("mkl")
    with pytest.raises(ValueError, match="one backend per product"):
        backends(["aten"] * 5)
    with pytest.raises(ValueError, match="name every product"):
        backends({"up": "own"})
    with pytest.raises(ValueError, match="unknown activation"):
        codes.activation_code("tanh")
    assert codes.expert_matrix("up", 96, 64, 128) == (96, 128) and codes.expert_matrix("grad_act", 96, 64, 128) == (96, 64)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_the_cpp_codes_come_from_the_definitions_only(tmp_path):
    """codes.h refuses to compile without the definitions, and takes its codes from them."""
    cxx = os.environ.get("CXX", "c++")
    src = tmp_path / "probe.cpp"
    src.write_text('#include "codes.h"\nstatic_assert(sparseroute::kOwn == 2 && sparseroute::kGradWOut == 5, "codes");\n')

    def compile_(*flags):
        return subprocess.run([cxx, "-std=c++17", "-fsyntax-only", f"-I{cpu_kernels._CSRC}", *flags, str(src)],
                              capture_output=True, text=True, timeout=60)

    assert compile_(*codes.compile_definitions()).returncode == 0
    missing = compile_(*[d for d in codes.compile_definitions() if "GRAD_X" not in d])
    assert missing.returncode != 0 and "product codes are missing" in missing.stderr
    assert "activation codes are missing" in compile_().stderr
    swapped = [d.replace("OWN=2", "OWN=1").replace("ONEDNN=1", "ONEDNN=2") for d in codes.compile_definitions()]
    assert compile_(*swapped).returncode != 0  # the static_assert: the C++ follows the definitions


# -- the kernel's checks -------------------------------------------------------------------------


def test_kernel_rejects_inconsistent_layouts(kernels):
    """Counts that do not cover the sorted rows, or name the wrong number of experts, unknown
    activation or backend codes, tokens out of range and badly laid-out inputs are refused with a
    message, not read out of bounds."""
    x, w_S, tok_S = torch.randn(4, 3), torch.rand(4), torch.arange(4)
    w_in, w_out = torch.randn(2, 3, 10), torch.randn(2, 5, 3)
    aten = backends("aten")
    with pytest.raises(RuntimeError, match="counts sum to 3 rows, tok_S has 4"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [1, 2], 0, 2, aten)
    with pytest.raises(RuntimeError, match="3 counts for 2 experts"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [1, 2, 1], 0, 2, aten)
    with pytest.raises(RuntimeError, match="unknown backend code 3 for product 'grad_x'"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 0, 2, [0, 0, 0, 3, 0, 0])
    with pytest.raises(RuntimeError, match=r"backends must have 6 codes, one per product \(up, down, grad_act, grad_x, "
                                           r"grad_w_in, grad_w_out\), got 1"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 0, 2, [0])
    with pytest.raises(TypeError):  # the old single backend code
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 0, 2, 0)
    with pytest.raises(RuntimeError, match="unknown activation code 7"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 7, 2, aten)
    with pytest.raises(RuntimeError, match="10 columns for F = 5"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], codes.activation_code("gelu"), 2, aten)  # [E, D, F]
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.mlp_forward(x, w_S, torch.randn(2, 4, 10), w_out, tok_S, [2, 2], 0, 2, aten)
    for bad_w in (w_S[:3], torch.rand(8)[::2]):  # a weight short, or strided
        with pytest.raises(RuntimeError, match=r"w_S must be a contiguous \[4\] tensor"):
            kernels.mlp_forward(x, bad_w, w_in, w_out, tok_S, [2, 2], 0, 2, aten)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        kernels.mlp_forward(x, w_S.double(), w_in, w_out, tok_S, [2, 2], 0, 2, aten)
    # the row loops index x and the gradient with the tokens unchecked: the plan checks them once
    w_in = torch.randn(2, 3, 5)
    for bad in (torch.tensor([0, 1, 2, 4]), torch.tensor([0, -1, 2, 3])):
        with pytest.raises(RuntimeError, match=f"token {bad[bad.ne(torch.arange(4))].item()} out of range for 4 tokens"):
            kernels.mlp_forward(x, w_S, w_in, w_out, bad, [2, 2], 1, 2, aten)
    with pytest.raises(RuntimeError, match="tok_S must be a contiguous 1-D int64"):
        kernels.mlp_forward(x, w_S, w_in, w_out, tok_S.int(), [2, 2], 1, 2, aten)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        kernels.mlp_forward(torch.randn(3, 4).t(), w_S, w_in, w_out, tok_S, [2, 2], 1, 2, aten)
    out, h, a, s = kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [2, 2], 1, 2, aten)
    with pytest.raises(RuntimeError, match="output gradient must be a contiguous tensor of x's shape"):
        kernels.mlp_backward(torch.randn(4, 2), x, w_S, w_in, w_out, tok_S, [2, 2], h, a, s, 1, [True] * 4, 2, aten)
    with pytest.raises(RuntimeError, match="needs must have 4 flags"):
        kernels.mlp_backward(torch.randn(4, 3), x, w_S, w_in, w_out, tok_S, [2, 2], h, a, s, 1, [True] * 3, 2, aten)


def _fine_grained(act="swiglu", dtype=torch.float32, T=256, D=96, F=64, E=16, k=4, seed=0):
    """Inputs of the kernel at a fine-grained shape: T tokens routed to k of E experts each (a
    few slots unused), sorted by expert."""
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if act == "swiglu" else F
    x = torch.randn(T, D, generator=g).to(dtype)
    w_in = (torch.randn(E, D, H, generator=g) / D**0.5).to(dtype)
    w_out = (torch.randn(E, F, D, generator=g) / F**0.5).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    idx[::7, -1] = -1
    order = torch.argsort(torch.where(idx.reshape(-1) < 0, E, idx.reshape(-1)), stable=True)
    counts = torch.bincount(idx.reshape(-1)[idx.reshape(-1) >= 0], minlength=E).tolist()
    order = order[: sum(counts)]
    tok = order // k
    w_S = torch.rand(tok.numel(), generator=g).to(dtype)
    grad = torch.randn(T, D, generator=g).to(dtype)
    return dict(x=x, w_S=w_S, w_in=w_in, w_out=w_out, tok=tok, counts=counts, act=codes.activation_code(act), g=grad)


def _run(kernels, inp, bk, threads=2, needs=(True, True, True, True)):
    out, h, a, s = kernels.mlp_forward(inp["x"], inp["w_S"], inp["w_in"], inp["w_out"], inp["tok"], inp["counts"], inp["act"],
                                       threads, bk)
    grads = kernels.mlp_backward(inp["g"], inp["x"], inp["w_S"], inp["w_in"], inp["w_out"], inp["tok"], inp["counts"], h, a, s,
                                 inp["act"], list(needs), threads, bk)
    return [out, *grads], h


_IMPOSSIBLE = [
    # (why, the inputs' change, backends, the message)
    ("own in bfloat16", dict(dtype=torch.bfloat16), ["own", "aten", "aten", "aten", "aten", "aten"],
     r"product 'up' cannot run on 'own': the kernel's own loops take float32, the inputs are BFloat16"),
    ("own with 40 columns", dict(D=40), ["aten", "own", "aten", "aten", "aten", "aten"],
     r"product 'down' cannot run on 'own': the kernel's own loops need a multiple of 16 columns, this product has 40"),
    ("own with 24 columns", dict(F=24), ["aten", "aten", "own", "aten", "aten", "aten"],
     r"product 'grad_act' cannot run on 'own': .* this product has 24"),
    ("own for the sums over rows, H 2F = 40", dict(F=20), ["aten", "aten", "aten", "aten", "own", "aten"],
     r"product 'grad_w_in' cannot run on 'own': .* this product has 40"),
    ("onednn below its smallest D", dict(D=3), ["aten", "aten", "aten", "onednn", "aten", "aten"],
     r"product 'grad_x' cannot run on 'onednn': it takes D and F of at least 4, here D = 3 and F = 64"),
    ("onednn below its smallest F", dict(F=2), ["aten", "aten", "aten", "aten", "aten", "onednn"],
     r"product 'grad_w_out' cannot run on 'onednn': it takes D and F of at least 4, here D = 96 and F = 2"),
    ("onednn in float64", dict(dtype=torch.float64), ["onednn"] + ["aten"] * 5,
     r"product 'up' cannot run on 'onednn': oneDNN's matmul does not run here for Double"),
]


@pytest.mark.parametrize("why, change, names, message", _IMPOSSIBLE, ids=[c[0] for c in _IMPOSSIBLE])
def test_impossible_backends_are_refused_with_the_reason(kernels, why, change, names, message):
    """The kernel decides nothing: asked for a backend that cannot run a product, the forward and
    the backward raise, naming the product and why, instead of running it elsewhere."""
    if "'own'" in message and "float32" not in message:
        _needs_own(kernels)
    inp = _fine_grained(T=40, E=4, k=2, **change)
    args = (inp["x"], inp["w_S"], inp["w_in"], inp["w_out"], inp["tok"], inp["counts"], inp["act"], 2)
    with pytest.raises(RuntimeError, match=message):
        kernels.mlp_forward(*args, backends(names))
    saved = kernels.mlp_forward(*args, backends("aten"))[1:]
    with pytest.raises(RuntimeError, match=message):
        kernels.mlp_backward(inp["g"], *args[:6], *saved, inp["act"], [True] * 4, 2, backends(names))


def test_own_needs_contiguous_weights(kernels):
    _needs_own(kernels)
    inp = _fine_grained(T=40, E=4, k=2)
    w_in = inp["w_in"].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(RuntimeError, match="product 'grad_x' cannot run on 'own': .* contiguous w_in and w_out"):
        kernels.mlp_forward(inp["x"], inp["w_S"], w_in, inp["w_out"], inp["tok"], inp["counts"], inp["act"], 2,
                            backends(["aten", "aten", "aten", "own", "aten", "aten"]))
    # ATen and oneDNN take them as they are
    out = kernels.mlp_forward(inp["x"], inp["w_S"], w_in, inp["w_out"], inp["tok"], inp["counts"], inp["act"], 2,
                              backends("aten"))[0]
    assert torch.equal(out, kernels.mlp_forward(inp["x"], inp["w_S"], inp["w_in"], inp["w_out"], inp["tok"], inp["counts"],
                                                inp["act"], 2, backends("aten"))[0])


def test_the_backward_must_take_the_forwards_backends(kernels):
    """With a product on oneDNN the saved activations hold each piece's rows padded to 32; a
    backward whose backends list pads differently would misread them, and is refused."""
    _needs_onednn(kernels)
    inp = _fine_grained(T=40, E=4, k=2, act="gelu")
    args = (inp["x"], inp["w_S"], inp["w_in"], inp["w_out"], inp["tok"], inp["counts"], inp["act"], 2)
    _, h, a, s = kernels.mlp_forward(*args, backends("aten"))
    assert h.shape[0] == len(inp["tok"])
    with pytest.raises(RuntimeError, match="the backward must use the forward's backends"):
        kernels.mlp_backward(inp["g"], *args[:6], h, a, s, inp["act"], [True] * 4, 2,
                             backends(["aten"] * 5 + ["onednn"]))
    _, h, a, s = kernels.mlp_forward(*args, backends(["aten"] * 5 + ["onednn"]))
    assert h.shape[0] > len(inp["tok"]) and h.shape[0] % 32 == 0  # pieces padded to 32 rows
    with pytest.raises(RuntimeError, match="the backward must use the forward's backends"):
        kernels.mlp_backward(inp["g"], *args[:6], h, a, s, inp["act"], [True] * 4, 2, backends("aten"))


# -- the backends agree ------------------------------------------------------------------------


@pytest.mark.parametrize("act", codes.ACTIVATIONS)
def test_every_backend_gives_the_same_results_at_the_fine_grained_shape(kernels, act):
    """E 16, F 64, D 96, k 4, float32: every product on the kernel's own loops, on oneDNN, on
    torch's matmul, or mixed, gives the outputs and every gradient within 1e-5 of each other.
    The forward's output is the same to the bit on the own loops and on oneDNN: both sum each
    output over k in order, one fused multiply-add per term (row_gemm.h), and the padding rows
    oneDNN's products get add nothing. Only oneDNN pads the saved activations."""
    _needs_own(kernels)
    _needs_onednn(kernels)
    inp = _fine_grained(act)
    S = len(inp["tok"])
    results = {}
    for name in ("own", "onednn", "aten", ("own", "onednn", "aten", "own", "onednn", "aten")):
        results[name], h = _run(kernels, inp, backends(name))
        assert (h.shape[0] > S) == (name != "own" and name != "aten"), name
    ref = results["aten"]
    for name, got in results.items():
        for a, b in zip(got, ref):
            assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert torch.equal(results["own"][0], results["onednn"][0])
    again, _ = _run(kernels, inp, backends("own"))
    assert all(torch.equal(a, b) for a, b in zip(again, results["own"]))  # reproducible
    # and in double precision, every backend agrees with a plain per-expert loop
    ref_out = _reference_forward(inp)
    for name in ("own", "onednn", "aten"):
        assert_close(results[name][0].double(), ref_out, rtol=1e-4, atol=1e-4)


def _reference_forward(inp):
    """The expert MLP as a plain loop over the rows, in double."""
    x, w_in, w_out = inp["x"].double(), inp["w_in"].double(), inp["w_out"].double()
    out = torch.zeros_like(x)
    act = codes.ACTIVATIONS[inp["act"]]
    start = 0
    for e, n in enumerate(inp["counts"]):
        rows = slice(start, start + n)
        start += n
        t = inp["tok"][rows]
        h = x[t] @ w_in[e]
        if act == "swiglu":
            gate, up = h.chunk(2, dim=1)
            a = torch.nn.functional.silu(gate) * up
        else:
            a = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu, "relu": torch.relu}[act](h)
        out.index_add_(0, t, (a * inp["w_S"][rows].double().unsqueeze(1)) @ w_out[e])
    return out


def test_bfloat16_runs_on_onednn_and_aten(kernels):
    """bfloat16 runs on oneDNN (where its bfloat16 matmul runs) and on ATen, within bfloat16's
    precision of the float32 result."""
    _needs_onednn(kernels, torch.bfloat16)
    inp = _fine_grained("swiglu", dtype=torch.bfloat16, T=64)
    ref = _reference_forward(inp)
    for name in ("onednn", "aten"):
        got, _ = _run(kernels, inp, backends(name))
        assert got[0].dtype == torch.bfloat16
        assert_close(got[0].double(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))


# -- work sharing ------------------------------------------------------------------------------


@pytest.fixture
def stealing(testing_kernels):
    """The test module's work-sharing switches, restored afterwards."""
    yield testing_kernels
    testing_kernels._set_owner_delay_us(0)
    testing_kernels._set_fail_stolen(False)
    testing_kernels._set_stealing(True)


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("act, bk", [("swiglu", "aten"), ("gelu", "own"), ("swiglu", "onednn")])
def test_stolen_pieces_give_the_same_results_to_the_bit_in_the_kernel(threads, stealing, act, bk):
    """Called directly: with part 0's thread held back before each of its pieces, the other
    thread takes pieces of part 0; the outputs and every gradient equal those of a run where
    nobody steals."""
    if bk == "own":
        _needs_own(stealing)
    if bk == "onednn":
        _needs_onednn(stealing)
    inp = _fine_grained(act, T=300)
    stealing._set_stealing(False)
    before = stealing._steals()
    alone, _ = _run(stealing, inp, backends(bk))
    assert stealing._steals() == before
    stealing._set_stealing(True)
    stealing._set_owner_delay_us(500_000)
    shared, _ = _run(stealing, inp, backends(bk))
    assert stealing._steals() >= before + 2  # in the forward and in the backward
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_an_error_in_a_stolen_piece_reaches_the_caller_of_the_kernel(threads, stealing):
    inp = _fine_grained(T=300)
    stealing._set_owner_delay_us(500_000)
    stealing._set_fail_stolen(True)
    with pytest.raises(RuntimeError, match="stolen piece failed"):
        _run(stealing, inp, backends("aten"))
    stealing._set_fail_stolen(False)
    stealing._set_owner_delay_us(0)
    first, _ = _run(stealing, inp, backends("aten"))
    again, _ = _run(stealing, inp, backends("aten"))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# -- through the MoE layer (sparseroute.moe.dispatch calls the kernel) --------------------------


def _train_step(moe, x, g, dispatch):
    moe.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_()
    y, r = moe(xr, dispatch=dispatch)
    torch.autograd.backward([y, sum(r.losses.values())], [g, None])
    return [y.detach(), xr.grad] + [p.grad.clone() for p in moe.parameters()]


@needs_kernels
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_deterministic_for_a_thread_count_and_close_across_counts(threads):
    torch.manual_seed(0)
    moe = MoE(32, 24, 6, 2)
    x, g = torch.randn(200, 32), torch.randn(200, 32)
    first = _train_step(moe, x, g, "parallel")
    again = _train_step(moe, x, g, "parallel")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    torch.set_num_threads(1)
    single = _train_step(moe, x, g, "parallel")
    ref = _train_step(moe, x, g, "reference")
    for a, b, r in zip(first, single, ref):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_stolen_pieces_give_the_same_results_to_the_bit(threads, stealing, activation):
    """Through the MoE layer (whose kernel calls reach the test module, see the testing_kernels
    fixture): with part 0's thread held back, the other thread takes pieces of part 0; the outputs
    and every gradient equal those of a run where nobody steals."""
    torch.manual_seed(0)
    moe = MoE(32, 24, 16, 2, activation=activation)
    x, g = torch.randn(300, 32), torch.randn(300, 32)
    stealing._set_stealing(False)
    before = stealing._steals()
    alone = _train_step(moe, x, g, "parallel")
    assert stealing._steals() == before
    stealing._set_stealing(True)
    stealing._set_owner_delay_us(500_000)
    shared = _train_step(moe, x, g, "parallel")
    assert stealing._steals() >= before + 2  # in the forward and in the backward
    for a, b in zip(alone, shared):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_an_error_in_a_stolen_piece_reaches_the_caller(threads, stealing):
    """The owner of a stolen piece that raised stops waiting for it: the call raises instead of
    hanging, and the next call works."""
    torch.manual_seed(0)
    moe = MoE(32, 24, 16, 2)
    x, g = torch.randn(300, 32), torch.randn(300, 32)
    stealing._set_owner_delay_us(500_000)
    stealing._set_fail_stolen(True)
    with pytest.raises(RuntimeError, match="stolen piece failed"):
        _train_step(moe, x, g, "parallel")
    stealing._set_fail_stolen(False)
    stealing._set_owner_delay_us(0)
    for a, b in zip(_train_step(moe, x, g, "parallel"), _train_step(moe, x, g, "reference")):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_refuses_activations_and_devices_it_lacks(monkeypatch):
    """Every activation sparseroute has runs in the kernel; one it lacked (here: GELU, removed
    from its table) would be refused with the reason, and auto would take the Python loop."""
    from sparseroute.moe import dispatch

    monkeypatch.setattr(dispatch, "KERNEL_ACTIVATIONS", {"swiglu": 0})
    moe = MoE(8, 8, 4, 2, activation="gelu")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="these use 'gelu'"):
        moe(x, dispatch="parallel")
    y_auto, _ = moe(x, dispatch="auto")
    assert torch.equal(y_auto, moe(x, dispatch="fused")[0])
    assert "CPU only" in dispatch._parallel_refusal(MoE(8, 8, 4, 2).experts, torch.device("meta"))


@needs_kernels
def test_dispatch_modes_see_every_op():
    """Under a Python dispatch mode (here torch's FLOP counter) the compiled kernel is an op the
    mode sees (a custom op with a FLOP formula): auto, parallel and the Python loop count the same
    products."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    moe = MoE(16, 8, 4, 2)
    x = torch.randn(10, 16)
    counts = {}
    for dispatch in ("auto", "parallel", "fused"):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            moe(x, dispatch=dispatch)
        counts[dispatch] = counter.get_total_flops()
    assert counts["auto"] == counts["parallel"] == counts["fused"] > 2 * 10 * 16 * 4  # more than the router's matmul


def test_without_the_kernel_parallel_raises_and_auto_warns_once(tmp_path, monkeypatch):
    """Kernels not built (a fresh cache root): an explicit "parallel" raises with load()'s reason,
    and auto warns once with it and runs the Python loop; nothing is built on the way."""
    monkeypatch.delenv("SPARSEROUTE_NO_EXTENSIONS", raising=False)
    monkeypatch.setenv("SPARSEROUTE_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr("sparseroute.moe.dispatch._warned_unavailable", False)
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, 2)
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="compiled kernel is unavailable .*not built"):
        moe(x, dispatch="parallel")
    with pytest.warns(UserWarning, match="not built"):
        y, _ = moe(x, dispatch="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        y2, _ = moe(x, dispatch="auto")
    assert_close(y, moe(x, dispatch="fused")[0], rtol=0, atol=0)
    assert torch.equal(y, y2)
    assert not (tmp_path / "kernels").exists()


@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (37, 3, 5), (500, 8, 64)])
def test_counting_sort_equals_the_argsort(kernels, T, K, E):
    """The kernel's one-pass counting sort gives exactly the stable argsort's order, tokens and
    counts, unused (-1) slots included."""
    from sparseroute.moe.dispatch import sort_by_expert
    from sparseroute.routing import Routing

    gen = torch.Generator().manual_seed(T + K + E)
    indices = torch.randint(-1, E, (T, K), generator=gen)
    routing = Routing(indices, torch.rand(T, K, generator=gen), E)
    order, tok, counts = sort_by_expert(routing)
    k_order, k_tok, k_counts = kernels.sort_by_expert(indices, E)
    assert torch.equal(k_order, order) and torch.equal(k_tok, tok)
    assert k_counts == counts.tolist()
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.sort_by_expert(torch.full((2, 1), E), E)


# -- the SwiGLU pass, the own loops, the conversions ----------------------------------------------


def _swiglu_activations(kernels, gate: torch.Tensor, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's weighted SwiGLU activations a of one row with this gate, up = 1 and routing
    weight 1, as the backward recomputes them: w_out's gradient for an output gradient of 1 is
    a^T · 1 = a (one row, on ATen: no padding rows). Also the forward's saved a and s."""
    F = gate.numel()
    w_in = torch.cat([gate, torch.ones(F)]).reshape(1, 1, 2 * F)
    x, w_S, tok_S, w_out = torch.ones(1, 1), torch.ones(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, F, 1)
    aten = backends("aten")
    _, h, a, s = kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [1], 0, 1, aten)
    g_out = kernels.mlp_backward(torch.ones(1, 1), x, w_S, w_in, w_out, tok_S, [1], h, a, s, 0, needs, 1, aten)[3]
    return g_out[0, :, 0], a, s


def test_kernel_swiglu_sigmoid_matches_torch(kernels):
    """The SwiGLU pass computes sigmoid(gate) itself (a vectorisable exp): with up = 1 and routing
    weight 1 the weighted activation is gate * sigmoid(gate), within 3 ulp of torch's where that
    is not vanishingly small, about 0 below, NaN kept. Neither it nor the sigmoid is kept for the
    backward, which recomputes the activations: alone (only w_out's gradient asked for) or in
    the pass that computes dL/dh, to the same bits."""
    gate = torch.cat([torch.linspace(-100, 100, 40001), torch.tensor([0.0, -0.0, float("inf"), 1e-30])])
    a, saved_a, s = _swiglu_activations(kernels, gate, [False, False, False, True])
    assert saved_a.numel() == 0 and s.numel() == 0
    fused, _, _ = _swiglu_activations(kernels, gate, [True, True, True, True])
    assert torch.equal(a.view(torch.int32), fused.view(torch.int32))
    ref = gate * torch.sigmoid(gate)
    big = (gate.abs() > 1e-20) & gate.isfinite() & (gate > -80)
    ulps = (a.view(torch.int32) - ref.view(torch.int32)).abs()
    assert int(ulps[big].max()) <= 3
    assert float(a[gate <= -80].abs().max()) < 1e-30
    assert float(a[gate == float("inf")]) == float("inf") and float(a[gate == 0].abs().max()) == 0.0
    for needs in ([False, False, False, True], [True, True, True, True]):
        assert _swiglu_activations(kernels, torch.tensor([float("nan")]), needs)[0].isnan().all()


def test_kernel_row_products_equal_torch_for_every_tail(testing_kernels):
    """The kernel's own float32 row products (backend 'own', on AVX-512): rows gathered by index
    (repeats included) or dense, row counts that leave every remainder of the 6-row blocks,
    column counts that leave every remainder of the 64-column tiles, B's rows taken from a wider
    matrix. Each output is a sum in k order, so a row's result does not depend on where it falls:
    the same rows in reverse order give the same bits."""
    kernels = testing_kernels
    _needs_own(kernels)
    assert not kernels.row_gemm_runs(40) and not kernels.row_gemm_runs(8)
    gen = torch.Generator().manual_seed(0)
    for n, K, N, wide in [(1, 1, 16, 16), (5, 3, 32, 48), (6, 24, 48, 48), (7, 128, 64, 80), (13, 40, 80, 80),
                          (64, 512, 256, 256), (23, 128, 112, 128)]:
        A = torch.randn(50, K, generator=gen)
        B = torch.randn(K, wide, generator=gen)
        idx = torch.randint(0, 50, (n,), generator=gen)
        idx[: n // 2] = idx[0]  # repeated rows
        got = kernels._row_gemm(A, idx, B, N)
        want = (A.double()[idx] @ B.double()[:, :N]).float()
        assert_close(got, want, rtol=1e-5, atol=1e-5 * K**0.5)
        rev = kernels._row_gemm(A, idx.flip(0).contiguous(), B, N)
        assert torch.equal(rev.flip(0).view(torch.int32), got.view(torch.int32))
        dense = kernels._row_gemm(A[:n].contiguous(), torch.empty(0, dtype=torch.long), B, N)
        assert_close(dense, (A.double()[:n] @ B.double()[:, :N]).float(), rtol=1e-5, atol=1e-5 * K**0.5)
    assert kernels._row_gemm(torch.empty(0, 8), torch.empty(0, dtype=torch.long), torch.randn(8, 16), 16).shape == (0, 16)


def test_kernel_sums_over_rows_equal_torch_for_every_tail(testing_kernels):
    """The kernel's own weight-gradient products, A[ia]^T B[ib]: rows of A or B read by index
    (repeats included) or in order, row counts around the 128-row chunks, output rows that leave
    every remainder of the 6-row tiles, columns every remainder of the 64-column tiles; no rows
    give zeros."""
    kernels = testing_kernels
    _needs_own(kernels)
    gen = torch.Generator().manual_seed(1)
    none = torch.empty(0, dtype=torch.long)
    for n, M, N in [(1, 1, 16), (5, 7, 32), (127, 13, 48), (128, 6, 64), (129, 24, 80), (300, 512, 256), (257, 128, 112)]:
        A, B = torch.randn(n + 9, M, generator=gen), torch.randn(n + 4, N, generator=gen)
        ia, ib = torch.randint(0, n + 9, (n,), generator=gen), torch.randint(0, n + 4, (n,), generator=gen)
        ia[: n // 3] = ia[0]
        for a_idx, b_idx in [(ia, ib), (ia, none), (none, ib)]:
            a_rows = A[a_idx] if a_idx.numel() else A[:n]
            b_rows = B[b_idx] if b_idx.numel() else B[:n]
            got = kernels._row_gemm_tn(A if a_idx.numel() else A[:n].contiguous(), a_idx,
                                       B if b_idx.numel() else B[:n].contiguous(), b_idx)
            want = (a_rows.double().t() @ b_rows.double()).float()
            assert_close(got, want, rtol=1e-5, atol=1e-5 * n**0.5)
    zeros = kernels._row_gemm_tn(torch.empty(0, 5), none, torch.empty(0, 32), none)
    assert zeros.shape == (5, 32) and not zeros.any()


def test_kernel_transpose_for_every_edge(testing_kernels):
    """The transpose the backward's own products take the expert weights through (16 x 16 blocks
    in registers, the edges one value at a time) moves every value to its place."""
    kernels = testing_kernels
    _needs_own(kernels)
    for R, C in [(16, 16), (32, 48), (17, 33), (512, 256), (5, 3), (1, 40), (40, 1), (0, 16), (31, 15)]:
        x = torch.randn(R, C)
        assert torch.equal(kernels._transpose(x), x.t().contiguous()), (R, C)


def test_kernel_bf16_conversions_round_as_torch_does(testing_kernels):
    """The elementwise loops convert bfloat16 by integer arithmetic (so that they vectorize): the
    same bits as torch's conversion for every float32 that is not NaN (round to nearest, ties to
    even: halfway cases, overflow to inf, subnormals, -0.0), NaN to NaN, and back exactly."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = (torch.randint(0, 2**15, (4096,), generator=gen, dtype=torch.int32) << 16) | 0x8000  # halfway up
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.3895314e38, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45,
                            1.1754942e-38, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32), -ties.view(torch.float32), special])
    b, back = testing_kernels._bf16_round_trip(x)
    nan = x.isnan()
    assert int(nan.sum()) > 1000  # random bit patterns include many NaNs
    expected = x.to(torch.bfloat16)
    assert torch.equal(b[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert b[nan].isnan().all()
    assert torch.equal(back[~nan].view(torch.int32), b[~nan].float().view(torch.int32))
    assert back[nan].isnan().all()


# -- the buffer pool ---------------------------------------------------------------------------


@pytest.fixture
def workspace(kernels):
    """The buffer pool on with room to spare; its limits restored afterwards."""
    before = cpu_kernels.workspace_state()
    cpu_kernels.set_workspace_limits(64, 1 << 30)
    yield
    cpu_kernels.set_workspace_limits(before["slots"], before["max_bytes"])


def _kernel_forward(kernels, seed=0):
    torch.manual_seed(seed)
    T, D, E, F = 40, 16, 4, 12  # h [80, 24]: no other buffer of its size
    x, w_S = torch.randn(T, D), torch.rand(2 * T)
    w_in, w_out = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    tok_S = torch.arange(2 * T) % T
    return kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [20, 20, 20, 20], 0, 2, backends("aten"))


def test_workspace_reuses_a_buffer_only_once_nothing_uses_it(kernels, workspace):
    """The kernel's buffers come back for a later call only after every tensor on them (the
    returned one, a view of it) is gone; results never depend on the reuse."""
    out, h, _, _ = _kernel_forward(kernels)  # SwiGLU: no saved activations besides h
    first = {t.data_ptr() for t in (out, h)}
    h_first = h.clone()
    out2, h2, _, _ = _kernel_forward(kernels)  # out and h alive: neither of their buffers
    assert first.isdisjoint({t.data_ptr() for t in (out2, h2)})
    assert torch.equal(h2, h_first) and torch.equal(out2, out)
    view, h_ptr = h[3:], h.data_ptr()
    del out, h, out2, h2
    out3, h3, _, _ = _kernel_forward(kernels, seed=1)  # h's buffer is held by the view
    assert h_ptr not in {out3.data_ptr(), h3.data_ptr()}
    assert torch.equal(view, h_first[3:])  # the data under the view is untouched
    del view, out3, h3
    _kernel_forward(kernels)  # settle: everything is free again
    kept = cpu_kernels.workspace_state()
    for seed in range(3):  # nothing held between calls: every buffer is a reused one
        _kernel_forward(kernels, seed)
        assert cpu_kernels.workspace_state() == kept


def _owners(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def test_workspace_buffers_have_one_owner_and_come_back_when_it_dies(kernels, workspace):
    """A pooled buffer's storage is owned by its tensor alone (as a fresh tensor's is), so
    autograd can add into it in place and take it as a .grad without a copy; when the tensor
    dies the block goes back to the pool, and the next call of the same size gets it."""
    cpu_kernels.set_workspace_limits(0, 0)  # an empty pool: no other free block of h's size
    cpu_kernels.set_workspace_limits(64, 1 << 30)
    out, h, _, _ = _kernel_forward(kernels)
    assert _owners(out) == _owners(h) == _owners(torch.empty(3))
    ptr, before = h.data_ptr(), cpu_kernels.workspace_state()
    del h
    after = cpu_kernels.workspace_state()
    assert after["kept"] == before["kept"] + 1 and after["kept_bytes"] > before["kept_bytes"]
    del out
    _, h2, _, _ = _kernel_forward(kernels, seed=1)
    assert h2.data_ptr() == ptr


def test_workspace_buffers_can_grow(kernels, workspace):
    """A pooled buffer resizes like any tensor: the data is kept and the old block comes back."""
    out, _, _, _ = _kernel_forward(kernels)
    first, kept = out.clone(), cpu_kernels.workspace_state()["kept"]
    out.resize_(out.shape[0] * 5, out.shape[1])  # a size no free block has
    assert torch.equal(out[: first.shape[0]], first)
    assert cpu_kernels.workspace_state()["kept"] == kept + 1


def test_workspace_keeps_live_graphs_intact(workspace):
    """Two forwards before one backward (gradient accumulation, two losses), with the cache on
    and off: the same gradients, so a graph's saved activations are never reused under it."""
    torch.manual_seed(0)
    moe = MoE(16, 8, 4, 2)
    x1, x2, g1, g2 = torch.randn(30, 16), torch.randn(30, 16), torch.randn(30, 16), torch.randn(30, 16)

    def grads():
        moe.zero_grad(set_to_none=True)
        for _ in range(2):  # the second round reuses what the first freed
            moe.zero_grad(set_to_none=True)
            y1, _ = moe(x1, dispatch="parallel")
            y2, _ = moe(x2, dispatch="parallel")
            torch.autograd.backward([y1, y2], [g1, g2])
        return [p.grad.clone() for p in moe.parameters()]

    cached = grads()
    cpu_kernels.set_workspace_limits(0, 0)
    assert cpu_kernels.workspace_state()["kept"] == 0
    for a, b in zip(cached, grads()):
        assert torch.equal(a, b)


def test_workspace_limits_are_checked_and_kept(kernels, workspace):
    with pytest.raises(ValueError, match="slots and max_bytes must be >= 0"):
        cpu_kernels.set_workspace_limits(-1, 0)
    cpu_kernels.set_workspace_limits(1, 1 << 20)
    _kernel_forward(kernels)
    state = cpu_kernels.workspace_state()
    assert state["slots"] == 1 and state["max_bytes"] == 1 << 20 and state["kept"] <= 1
    assert state["kept_bytes"] <= 1 << 20


@pytest.mark.parametrize("bk", ["aten", "own", "onednn"])
def test_per_token_sums_in_runs_and_row_by_row_agree(kernels, bk):
    """The per-token sums read each piece's rows in runs of consecutive tokens: as they are when
    the rows are in token order (as the sort leaves them), else after sorting them by token. A
    token's rows are added in piece order either way, so reversing each expert's rows changes no
    bit of the output or of x's gradient (each product's rows are independent of where they
    fall). A token no expert took gets zeros."""
    if bk == "own":
        _needs_own(kernels)
    if bk == "onednn":
        _needs_onednn(kernels)
    torch.manual_seed(3)
    T, D, E, F, n = 700, 512, 4, 16, 300  # blocks of 1 MiB / (512 · 4 B) = 512 tokens: two
    x, g = torch.randn(T, D), torch.randn(T, D)
    w_in, w_out = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    toks = [torch.randperm(T - 1)[:n].sort().values for _ in range(E)]  # token T - 1: no rows
    results = []
    for order in (lambda t: t, lambda t: t.flip(0)):
        tok_S = torch.cat([order(t) for t in toks])
        w_S = torch.cat([order(t.float() / T) for t in toks])
        out, h, a, s = kernels.mlp_forward(x, w_S, w_in, w_out, tok_S, [n] * E, 0, 2, backends(bk))
        gx = kernels.mlp_backward(g, x, w_S, w_in, w_out, tok_S, [n] * E, h, a, s, 0, [True, False, False, False], 2,
                                  backends(bk))[0]
        results.append((out, gx))
    (out, gx), (out_rows, gx_rows) = results
    assert torch.equal(out, out_rows) and torch.equal(gx, gx_rows)
    assert torch.equal(out[-1], torch.zeros(D)) and torch.equal(gx[-1], torch.zeros(D))
    assert out[:-1].abs().sum(dim=1).gt(0).any()
