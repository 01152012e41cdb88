import os
import warnings

import pytest
import torch

# the expert kernel's products placed by the rule, without timing candidate plans (fast, and the
# same on every run); tests/test_ops.py covers the tuning
os.environ.setdefault("SPARSEROUTE_KERNEL_PLAN", "rule")


@pytest.fixture
def threads(request):
    """Run the test with torch's intra-op thread count set to the parametrized value (indirect),
    restored afterwards even when the test changes it."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Build the compiled CPU kernels once, before the first test (``extension.load()`` never
    builds, so a fresh clone would otherwise run without them), unless
    SPARSEROUTE_NO_EXTENSIONS=1. A failed build does not stop the session: the tests that need
    the kernels fail with its reason (test_expert_parallel.py::test_kernel_builds first)."""
    if os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1":
        return
    from sparseroute.kernels import extension

    try:
        extension.build()
    except extension.KernelBuildError as exc:
        warnings.warn(f"the compiled kernels did not build: {exc}", stacklevel=1)


@pytest.fixture
def testing_kernels(monkeypatch):
    """The test module of the compiled kernels (the shipped sources with the test hooks, built on
    first use), and ``extension.load()`` returning it for this test, so that calls through the
    MoE layer reach its switches too."""
    if os.environ.get("SPARSEROUTE_NO_EXTENSIONS") == "1":
        pytest.skip("compiled kernels disabled by SPARSEROUTE_NO_EXTENSIONS=1")
    from sparseroute.kernels import extension

    module = extension.build(testing=True)
    monkeypatch.setattr(extension, "load", lambda *, testing=False: module)
    return module
