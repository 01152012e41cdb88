"""The integer codes the compiled CPU kernels take, defined once, here.

The C++ sources (``csrc/codes.h``) take every code from the preprocessor macros that
:func:`compile_definitions` gives, and refuse to compile without them, so the Python callers and
the kernels cannot disagree about a number. Pure Python: this module imports nothing from
sparseroute, and nothing from torch.

- :data:`ACTIVATIONS`: the experts' activations the kernel runs; a name's code is its index.
- :data:`BACKENDS`: where one matrix product runs: ``aten`` (torch's matmul), ``onednn``
  (oneDNN's matmul primitive) or ``own`` (the kernel's own float32 row products, ``row_gemm.h``).
- :data:`PRODUCTS`: the six per-expert matrix products of the expert MLP, in the order of the
  ``backends`` list that ``mlp_forward`` and ``mlp_backward`` take (one backend code per product):

  ==========  ===================  ==============================================
  up          x @ w_in             the forward's up projection (h)
  down        a @ w_out            the forward's down projection (a: weighted activations)
  grad_act    g @ w_out^T          dL/da from the output gradient g
  grad_x      dL/dh @ w_in^T       dL/dx
  grad_w_in   x^T dL/dh            w_in's gradient (a sum over the expert's rows)
  grad_w_out  a^T g                w_out's gradient (a sum over the expert's rows)
  ==========  ===================  ==============================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "PRODUCTS",
    "activation_code",
    "backend_code",
    "product_code",
    "backend_codes",
    "expert_matrix",
    "compile_definitions",
]

ACTIVATIONS = ("swiglu", "gelu", "silu", "relu")
BACKENDS = ("aten", "onednn", "own")
PRODUCTS = ("up", "down", "grad_act", "grad_x", "grad_w_in", "grad_w_out")


def _code(name: str, table: tuple[str, ...], what: str) -> int:
    try:
        return table.index(name)
    except ValueError:
        raise ValueError(f"unknown {what} {name!r}; known: {list(table)}") from None


def activation_code(name: str) -> int:
    """The kernel's code for activation ``name`` (one of :data:`ACTIVATIONS`)."""
    return _code(name, ACTIVATIONS, "activation")


def backend_code(name: str) -> int:
    """The kernel's code for backend ``name`` (one of :data:`BACKENDS`)."""
    return _code(name, BACKENDS, "backend")


def product_code(name: str) -> int:
    """The position of product ``name`` (one of :data:`PRODUCTS`) in a ``backends`` list."""
    return _code(name, PRODUCTS, "product")


def backend_codes(backends: str | Sequence[str] | Mapping[str, str]) -> list[int]:
    """The ``backends`` list the kernel takes: one backend name for all six products, a sequence
    of six names in :data:`PRODUCTS` order, or a mapping from every product's name to a name."""
    if isinstance(backends, str):
        return [backend_code(backends)] * len(PRODUCTS)
    if isinstance(backends, Mapping):
        if set(backends) != set(PRODUCTS):
            raise ValueError(f"backends: name every product {list(PRODUCTS)} once; got {sorted(backends)}")
        return [backend_code(backends[p]) for p in PRODUCTS]
    names = list(backends)
    if len(names) != len(PRODUCTS):
        raise ValueError(f"backends: one backend per product {list(PRODUCTS)}; got {len(names)}")
    return [backend_code(n) for n in names]


def expert_matrix(product: str, D: int, F: int, H: int) -> tuple[int, int]:
    """(K, N): the per-expert matrix a product reads (the weights) or writes (a weight gradient),
    K rows of N columns. N is the width the kernel's own loops run over (they need it a multiple
    of 16), and K x N floats is what they keep in L2 (:func:`sparseroute.kernels.plan.own_fits`).
    D model dim, F expert hidden, H the up projection's width (2F for SwiGLU, else F)."""
    dims = {
        "up": (D, H),  # w_in [D, H]
        "down": (F, D),  # w_out [F, D]
        "grad_act": (D, F),  # w_out^T [D, F]
        "grad_x": (H, D),  # w_in^T [H, D]
        "grad_w_in": (D, H),  # dL/dw_in [D, H]
        "grad_w_out": (F, D),  # dL/dw_out [F, D]
    }
    product_code(product)
    return dims[product]


def compile_definitions() -> list[str]:
    """The preprocessor definitions that give the C++ sources every code: ``-DSPARSEROUTE_ACT_<NAME>``,
    ``-DSPARSEROUTE_BACKEND_<NAME>``, ``-DSPARSEROUTE_PRODUCT_<NAME>`` and
    ``-DSPARSEROUTE_NUM_PRODUCTS``."""
    flags = [f"-DSPARSEROUTE_ACT_{name.upper()}={i}" for i, name in enumerate(ACTIVATIONS)]
    flags += [f"-DSPARSEROUTE_BACKEND_{name.upper()}={i}" for i, name in enumerate(BACKENDS)]
    flags += [f"-DSPARSEROUTE_PRODUCT_{name.upper()}={i}" for i, name in enumerate(PRODUCTS)]
    flags.append(f"-DSPARSEROUTE_NUM_PRODUCTS={len(PRODUCTS)}")
    return flags
