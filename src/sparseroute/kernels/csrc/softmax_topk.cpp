// Softmax top-k routing decision for CPUs, forward and backward, one row (token) at a time:
// what the softmax routers compute as softmax, then torch.topk, a gather and a renormalisation
// (about ten ATen ops each way, plus transposes), in one pass per row over the E experts.
// Python: sparseroute.moe.routers.base.softmax_topk.
//
// Legend: T tokens, E experts, K chosen experts per token.
//
// Order among equal probabilities: the lower expert index comes first (torch.topk leaves it
// unspecified); NaN counts as larger than any number, as in torch.topk.

#include "softmax_topk.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "vector_math.h"

#include <climits>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace sparseroute {

namespace {

using at::Tensor;

template <typename scalar_t>
inline bool ranks_above(scalar_t a, scalar_t b) {  // a before b in the top-k order
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

constexpr int64_t kRowsPerTask = 256;

// Rows [begin, end) of the forward (see softmax_topk_forward); ``keys`` is scratch for E numbers.
template <typename scalar_t>
SPARSEROUTE_VECTOR_CLONES void softmax_topk_rows(int64_t begin, int64_t end, int64_t E, int64_t K, bool renormalize,
                                                 const scalar_t* lp, scalar_t* pp, int64_t* ip, scalar_t* wp,
                                                 uint64_t* keys) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* x = lp + r * E;
    scalar_t* p = pp + r * E;
    scalar_t top = x[0];
    for (int64_t e = 1; e < E; ++e) top = ranks_above(x[e], top) ? x[e] : top;
    scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t e = 0; e < E; ++e) {
      p[e] = exp_of<scalar_t>(x[e] - top);
      sum += p[e];
    }
    const scalar_t inv = scalar_t(1) / sum;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) p[e] *= inv;
    int64_t* ti = ip + r * K;
    scalar_t* tv = wp + r * K;
    if constexpr (std::is_same_v<scalar_t, float>) {
      // K rounds of a branch-free argmax over keys that order the probabilities as ranks_above
      // does (NaN on top) and break ties towards the lower expert: the probability's bits made
      // monotone as an unsigned number, above the expert's index counted from the end
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) {
        int32_t bits;
        std::memcpy(&bits, &p[e], sizeof bits);
        bits = p[e] != p[e] ? INT32_MAX : bits ^ ((bits >> 31) & INT32_MAX);  // signed order
        const uint32_t order = static_cast<uint32_t>(bits) ^ 0x80000000u;        // unsigned order
        keys[e] = (static_cast<uint64_t>(order) << 32) | static_cast<uint64_t>(E - 1 - e);
      }
      for (int64_t j = 0; j < K; ++j) {
        uint64_t best = 0;
#pragma omp simd reduction(max : best)
        for (int64_t e = 0; e < E; ++e) best = keys[e] > best ? keys[e] : best;
        const int64_t e = E - 1 - static_cast<int64_t>(best & 0xffffffffu);
        ti[j] = e;
        tv[j] = p[e];
        keys[e] = 0;  // below every key in play (their upper halves are never 0)
      }
    } else {
      // insertion into the running top K, kept in order; a later expert passes an earlier one
      // only when strictly above it
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e) {
        if (n == K && !ranks_above(p[e], tv[K - 1])) continue;
        int64_t j = n < K ? n++ : K - 1;
        for (; j > 0 && ranks_above(p[e], tv[j - 1]); --j) {
          tv[j] = tv[j - 1];
          ti[j] = ti[j - 1];
        }
        tv[j] = p[e];
        ti[j] = e;
      }
    }
    if (renormalize) {
      scalar_t z = 0;
      for (int64_t j = 0; j < K; ++j) z += tv[j];
      z = std::max(z, scalar_t(1e-20));
      for (int64_t j = 0; j < K; ++j) tv[j] /= z;
    }
  }
}

}  // namespace

std::vector<Tensor> softmax_topk_forward(const Tensor& logits, int64_t K, bool renormalize) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "softmax_topk: logits must be a [T, E] CPU tensor");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "softmax_topk: logits must be float32 or float64, not ", logits.scalar_type());
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(K >= 1 && K <= E, "softmax_topk: k must be in [1, ", E, "]; got ", K);
  const Tensor l = logits.contiguous();
  Tensor probs = at::empty_like(l), idx = at::empty({T, K}, l.options().dtype(at::kLong)), w = at::empty({T, K}, l.options());
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "softmax_topk_forward", [&] {
    const scalar_t* lp = l.const_data_ptr<scalar_t>();
    scalar_t *pp = probs.mutable_data_ptr<scalar_t>(), *wp = w.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    at::parallel_for(0, T, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> keys(E);
      softmax_topk_rows<scalar_t>(begin, end, E, K, renormalize, lp, pp, ip, wp, keys.data());
    });
  });
  return {probs, idx, w};
}

Tensor softmax_topk_backward(const std::optional<Tensor>& grad_probs, const std::optional<Tensor>& grad_w,
                             const Tensor& probs, const Tensor& idx, const Tensor& w, bool renormalize) {
  const int64_t T = probs.size(0), E = probs.size(1), K = idx.size(1);
  TORCH_CHECK(probs.is_contiguous() && idx.is_contiguous() && w.is_contiguous() && idx.size(0) == T && w.size(0) == T &&
                  w.size(1) == K,
              "softmax_topk_backward: the forward's outputs do not fit together");
  const Tensor gp = grad_probs.has_value() && grad_probs->defined() ? grad_probs->contiguous() : Tensor();
  const Tensor gw = grad_w.has_value() && grad_w->defined() ? grad_w->contiguous() : Tensor();
  TORCH_CHECK(!gp.defined() || gp.sizes() == probs.sizes(), "softmax_topk_backward: grad_probs has the wrong shape");
  TORCH_CHECK(!gw.defined() || gw.sizes() == w.sizes(), "softmax_topk_backward: grad_w has the wrong shape");
  Tensor gl = at::empty_like(probs);
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "softmax_topk_backward", [&] {
    const scalar_t *pp = probs.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gpp = gp.defined() ? gp.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gwp = gw.defined() ? gw.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* glp = gl.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* p = pp + r * E;
        scalar_t* g = glp + r * E;  // first dL/dprobs, then dL/dlogits
        for (int64_t e = 0; e < E; ++e) g[e] = gpp != nullptr ? gpp[r * E + e] : scalar_t(0);
        if (gwp != nullptr) {
          const int64_t* ti = ip + r * K;
          const scalar_t *gwr = gwp + r * K, *wr = wp + r * K;
          if (renormalize) {  // w_j = p_j / z with z = sum of the K chosen p (clamped at 1e-20)
            scalar_t z = 0, gw_dot_w = 0;
            for (int64_t j = 0; j < K; ++j) {
              z += p[ti[j]];
              gw_dot_w += gwr[j] * wr[j];
            }
            const bool clamped = z < scalar_t(1e-20);
            z = std::max(z, scalar_t(1e-20));
            for (int64_t j = 0; j < K; ++j) g[ti[j]] += (gwr[j] - (clamped ? scalar_t(0) : gw_dot_w)) / z;
          } else {
            for (int64_t j = 0; j < K; ++j) g[ti[j]] += gwr[j];
          }
        }
        scalar_t dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += p[e] * g[e];
        for (int64_t e = 0; e < E; ++e) g[e] = p[e] * (g[e] - dot);
      }
    });
  });
  return gl;
}

}  // namespace sparseroute
