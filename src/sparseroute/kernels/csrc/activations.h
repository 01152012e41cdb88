// The expert kernel's elementwise passes over a piece's rows: the weighted SwiGLU and its
// backward, and the routing-weight step of the non-gated activations' backward. Templates with
// internal linkage (each including file gets its own copies: they are compiled per target by
// SPARSEROUTE_VECTOR_CLONES).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "vector_math.h"

namespace sparseroute {
namespace {

// The SwiGLU of n rows of h = [gate | up] (row stride 2F), each row scaled by its routing weight:
// a = gate * sigmoid(gate) * up * w, in one pass. The sigmoid is not kept: the backward
// recomputes it from the gate it reads anyway, which costs less than writing and reading it.
template <typename scalar_t>
SPARSEROUTE_VECTOR_CLONES void weighted_swiglu(int64_t n, int64_t F, const scalar_t* h, const scalar_t* w, scalar_t* a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t *gate = h + r * 2 * F, *up = gate + F;
    scalar_t* out = a + r * F;
    const acc_t wr = static_cast<acc_t>(w[r]);
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const acc_t x = load_as<acc_t>(gate, f);
      store_as(out, f, x * sigmoid_of<acc_t>(x) * load_as<acc_t>(up, f) * wr);
    }
  }
}

// Its backward, in one pass: from ga = dL/da, gh = [dL/dgate | dL/dup] (row stride 2F) and, when
// gw is not null, gw[r] = dL/dw[r] = sum_f ga * silu(gate) * up. silu'(x) = s (1 + x (1 - s)).
// With kActivations it also writes the weighted activations a (as weighted_swiglu does, from the
// same sigmoid), which the forward does not save.
template <typename scalar_t, bool kActivations>
SPARSEROUTE_VECTOR_CLONES void weighted_swiglu_backward_rows(int64_t n, int64_t F, const scalar_t* ga, const scalar_t* h,
                                                             const scalar_t* w, scalar_t* gh, scalar_t* gw, scalar_t* a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t *gate = h + r * 2 * F, *up = gate + F, *g = ga + r * F;
    scalar_t *g_gate = gh + r * 2 * F, *g_up = g_gate + F, *out = kActivations ? a + r * F : nullptr;
    const acc_t wr = static_cast<acc_t>(w[r]);
    acc_t dw = 0;
#pragma omp simd reduction(+ : dw)
    for (int64_t f = 0; f < F; ++f) {
      const acc_t x = load_as<acc_t>(gate, f), s = sigmoid_of<acc_t>(x);
      const acc_t u = load_as<acc_t>(up, f), gr = load_as<acc_t>(g, f);
      const acc_t g_silu = gr * x * s;  // ga * silu(gate)
      dw += g_silu * u;
      store_as(g_up, f, g_silu * wr);
      store_as(g_gate, f, gr * wr * u * s * (acc_t(1) + x * (acc_t(1) - s)));
      if constexpr (kActivations) store_as(out, f, x * s * u * wr);
    }
    if (gw != nullptr) gw[r] = static_cast<scalar_t>(dw);
  }
}

// a may be null (then only dL/dh and dL/dw).
template <typename scalar_t>
void weighted_swiglu_backward(int64_t n, int64_t F, const scalar_t* ga, const scalar_t* h, const scalar_t* w,
                              scalar_t* gh, scalar_t* gw, scalar_t* a) {
  if (a != nullptr) {
    weighted_swiglu_backward_rows<scalar_t, true>(n, F, ga, h, w, gh, gw, a);
  } else {
    weighted_swiglu_backward_rows<scalar_t, false>(n, F, ga, h, w, gh, gw, a);
  }
}

// For a = s * w (non-gated): gw[r] = <ga[r], s[r]> when gw is not null, then ga[r] *= w[r]
// (dL/ds), in one pass.
template <typename scalar_t>
SPARSEROUTE_VECTOR_CLONES void scaled_rows_backward(int64_t n, int64_t F, scalar_t* ga, const scalar_t* s, const scalar_t* w,
                                                    scalar_t* gw) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < n; ++r) {
    scalar_t* g = ga + r * F;
    const scalar_t* sr = s + r * F;
    const acc_t wr = static_cast<acc_t>(w[r]);
    acc_t dw = 0;
#pragma omp simd reduction(+ : dw)
    for (int64_t f = 0; f < F; ++f) {
      const acc_t gf = load_as<acc_t>(g, f);
      dw += gf * load_as<acc_t>(sr, f);
      store_as(g, f, gf * wr);
    }
    if (gw != nullptr) gw[r] = static_cast<scalar_t>(dw);
  }
}

}  // namespace
}  // namespace sparseroute
