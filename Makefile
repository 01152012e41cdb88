# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv when missing, installing torch==2.13.0 first (a CPU build), then the project,
# and builds the compiled CPU kernels once (not inside the first forward).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SR     := $(VENV)/bin/sparseroute

# the tests that compare executors, products and routers with their references, and a lab smoke
# run: run again on the fallbacks (no compiled kernels; torch's own matmul) so that they cannot rot
FALLBACK_TESTS := tests/test_moe_equivalence.py tests/test_dispatch_gradcheck.py tests/test_gemm.py \
	tests/test_ops.py tests/test_router_kernels.py tests/test_errors.py tests/test_hf.py \
	tests/models/test_lm_forward.py tests/lab/test_sweep.py::test_uninterrupted_sweep \
	tests/lab/test_sweep.py::test_jobs_give_the_same_results tests/attention/test_attention_executor.py

.PHONY: demo test test-fallbacks kernels bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

kernels: $(STAMP)
	$(SR) kernels build --testing

demo: $(STAMP)
	$(SR) kernels build
	$(SR) compare --preset quick

test: kernels
	$(PY) -m pytest -q

test-fallbacks: $(STAMP)
	SPARSEROUTE_NO_EXTENSIONS=1 $(PY) -m pytest -q $(FALLBACK_TESTS)
	SPARSEROUTE_GEMM=aten $(PY) -m pytest -q $(FALLBACK_TESTS)

bench: $(STAMP)
	$(SR) kernels build
	$(PY) benchmarks/moe_layer.py

clean-venv:
	rm -rf $(VENV)
