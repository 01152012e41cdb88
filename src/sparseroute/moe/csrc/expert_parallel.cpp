// Expert-parallel SwiGLU expert MLP for CPUs: the experts are split into as many parts as there
// are intra-op threads, and each thread runs whole experts of its part with single-threaded ATen
// ops inside one at::parallel_for region (ATen and MKL do not nest parallelism). Small
// per-expert matmuls then run without a fork/join per op. Python: sparseroute.moe.cpu_kernels.
//
// Legend: T tokens, D model dim, E experts, F expert hidden, S routed rows sorted by expert,
// P parts. The rows of expert e are [offset[e], offset[e] + counts[e]) of the S rows; tok_S[s]
// is the token of row s and w_S[s] its routing weight.
//
// Determinism: the parts are a fixed function of the counts and of P (greedy, largest expert
// first, ties to the lowest index), each part adds into its own [T, D] buffer in expert order,
// and the buffers are added in part order, so a result depends only on the inputs and P.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

using at::Tensor;

std::vector<std::vector<int64_t>> make_parts(const std::vector<int64_t>& counts, int64_t parts) {
  std::vector<int64_t> order(counts.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  std::vector<std::vector<int64_t>> out(parts);
  std::vector<int64_t> load(parts, 0);
  for (int64_t e : order) {
    if (counts[e] == 0) continue;
    int64_t p = std::min_element(load.begin(), load.end()) - load.begin();
    out[p].push_back(e);
    load[p] += counts[e];
  }
  for (auto& part : out) std::sort(part.begin(), part.end());
  return out;
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

int64_t nonempty(const std::vector<int64_t>& counts) {
  return std::count_if(counts.begin(), counts.end(), [](int64_t c) { return c > 0; });
}

// Run fn(part_index, experts_of_part) for every part, one part per thread. Grad mode is
// thread-local, so each worker dispatches below autograd itself (the caller is an autograd
// Function that does its own backward).
template <class Fn>
void for_each_part(const std::vector<std::vector<int64_t>>& parts, const Fn& fn) {
  const int64_t P = static_cast<int64_t>(parts.size());
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t p = begin; p < end; ++p) fn(p, parts[p]);
  });
}

// Sum of the per-part [T, D] buffers, in part order, into the first one.
Tensor add_parts(std::vector<Tensor>& bufs) {
  for (size_t p = 1; p < bufs.size(); ++p) bufs[0].add_(bufs[p]);
  return bufs[0];
}

}  // namespace

// Returns {out_TD, h_S2F (pre-activations), a_SF (weighted activations), s_SF (silu(gate))}.
std::vector<Tensor> swiglu_forward(const Tensor& x_TD, const Tensor& w_S, const Tensor& w_in,
                                   const Tensor& w_out, const Tensor& tok_S, std::vector<int64_t> counts,
                                   int64_t threads) {
  const int64_t S = tok_S.size(0), D = x_TD.size(1), F = w_out.size(1);
  const auto off = offsets_of(counts);
  const int64_t most = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
  Tensor h = x_TD.new_empty({S, 2 * F});
  Tensor a = x_TD.new_empty({S, F});
  Tensor s = x_TD.new_empty({S, F});
  const int64_t P = std::max<int64_t>(1, std::min(threads, nonempty(counts)));
  const auto parts = make_parts(counts, P);
  std::vector<Tensor> outs(P);
  for (auto& o : outs) o = at::zeros_like(x_TD);
  for_each_part(parts, [&](int64_t p, const std::vector<int64_t>& experts) {
    Tensor x_buf = x_TD.new_empty({most, D}), y_buf = x_TD.new_empty({most, D});
    for (int64_t e : experts) {
      const int64_t n = counts[e], start = off[e];
      Tensor t = tok_S.narrow(0, start, n);
      Tensor x_e = x_buf.narrow(0, 0, n), y_e = y_buf.narrow(0, 0, n);
      Tensor h_e = h.narrow(0, start, n), a_e = a.narrow(0, start, n), s_e = s.narrow(0, start, n);
      at::index_select_out(x_e, x_TD, 0, t);
      at::mm_out(h_e, x_e, w_in.select(0, e));
      at::silu_out(s_e, h_e.narrow(1, 0, F));
      at::mul_out(a_e, s_e, h_e.narrow(1, F, F));
      a_e.mul_(w_S.narrow(0, start, n).unsqueeze(1));
      at::mm_out(y_e, a_e, w_out.select(0, e));
      outs[p].index_add_(0, t, y_e);
    }
  });
  return {add_parts(outs), h, a, s};
}

// Gradients {x, w_S, w_in, w_out}; an undefined tensor where ``needs`` is false.
std::vector<Tensor> swiglu_backward(const Tensor& g_TD, const Tensor& x_TD, const Tensor& w_S,
                                    const Tensor& w_in, const Tensor& w_out, const Tensor& tok_S,
                                    std::vector<int64_t> counts, const Tensor& h, const Tensor& a,
                                    const Tensor& s, std::vector<bool> needs, int64_t threads) {
  const int64_t D = x_TD.size(1), F = w_out.size(1), E = w_in.size(0);
  const bool need_x = needs[0], need_w = needs[1], need_in = needs[2], need_out = needs[3];
  const auto off = offsets_of(counts);
  const int64_t most = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
  const int64_t P = std::max<int64_t>(1, std::min(threads, nonempty(counts)));
  const auto parts = make_parts(counts, P);
  Tensor gw = need_w ? at::zeros_like(w_S) : Tensor();
  Tensor g_in = need_in ? at::empty_like(w_in) : Tensor();
  Tensor g_out = need_out ? at::empty_like(w_out) : Tensor();
  for (int64_t e = 0; e < E; ++e) {  // experts without rows get zero weight gradients
    if (counts[e] != 0) continue;
    if (need_in) g_in.select(0, e).zero_();
    if (need_out) g_out.select(0, e).zero_();
  }
  std::vector<Tensor> gxs;
  if (need_x) {
    gxs.resize(P);
    for (auto& b : gxs) b = at::zeros_like(x_TD);
  }
  const bool need_hidden = need_x || need_w || need_in;
  for_each_part(parts, [&](int64_t p, const std::vector<int64_t>& experts) {
    Tensor g_buf = x_TD.new_empty({most, D}), xd_buf = x_TD.new_empty({most, D});
    Tensor ga_buf = a.new_empty({most, F}), scratch = a.new_empty({most, F});
    Tensor gh_buf = h.new_empty({most, 2 * F});
    for (int64_t e : experts) {
      const int64_t n = counts[e], start = off[e];
      Tensor t = tok_S.narrow(0, start, n);
      Tensor ge = g_buf.narrow(0, 0, n);
      at::index_select_out(ge, g_TD, 0, t);
      if (need_out) {
        Tensor g_out_e = g_out.select(0, e);
        at::mm_out(g_out_e, a.narrow(0, start, n).t(), ge);
      }
      if (!need_hidden) continue;
      Tensor ga = ga_buf.narrow(0, 0, n), gh = gh_buf.narrow(0, 0, n), sc = scratch.narrow(0, 0, n);
      at::mm_out(ga, ge, w_out.select(0, e).t());  // dL/d(weighted activation)
      Tensor h_e = h.narrow(0, start, n), s_e = s.narrow(0, start, n);
      Tensor gate = h_e.narrow(1, 0, F), up = h_e.narrow(1, F, F);
      Tensor w_e = w_S.narrow(0, start, n).unsqueeze(1);
      Tensor g_up = gh.narrow(1, F, F);
      at::mul_out(g_up, ga, s_e);  // g·silu, scaled by w below
      if (need_w) {  // dL/dw = <g, silu·up>
        Tensor gw_e = gw.narrow(0, start, n);
        at::sum_out(gw_e, at::mul_out(sc, g_up, up), {1});
      }
      ga.mul_(w_e).mul_(up);
      Tensor g_gate = gh.narrow(1, 0, F);
      at::silu_backward_out(g_gate, ga, gate);
      g_up.mul_(w_e);
      Tensor xd = xd_buf.narrow(0, 0, n);
      if (need_in) {
        at::index_select_out(xd, x_TD, 0, t);
        Tensor g_in_e = g_in.select(0, e);
        at::mm_out(g_in_e, xd.t(), gh);
      }
      if (need_x) {
        at::mm_out(xd, gh, w_in.select(0, e).t());
        gxs[p].index_add_(0, t, xd);
      }
    }
  });
  Tensor gx = need_x ? add_parts(gxs) : Tensor();
  return {gx, gw, g_in, g_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("swiglu_forward", &swiglu_forward, "expert-parallel SwiGLU expert MLP, forward");
  m.def("swiglu_backward", &swiglu_backward, "expert-parallel SwiGLU expert MLP, backward");
}
