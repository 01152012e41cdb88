// The expert-parallel expert MLP for CPUs (SwiGLU, GELU, SiLU or ReLU experts), forward and
// backward: the routed rows, sorted by expert, split over the intra-op threads (schedule.h), each
// thread running its pieces expert by expert with single-threaded products inside one
// at::parallel_for region (ATen and oneDNN do not nest parallelism). Small per-expert products
// then run without a fork/join per op, and the threads get equal numbers of rows however skewed
// the expert loads are. Each of the six products runs where the caller's `backends` list says
// (codes.h: torch's matmul, oneDNN's, or the kernel's own row products, row_gemm.h, which read
// the routed rows in place). Python: sparseroute.kernels.extension; the codes:
// sparseroute.kernels.codes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace sparseroute {

// Returns {out_TD, h_SH (pre-activations: [gate | up] for SwiGLU, H = 2F; else H = F), a_SF
// (weighted activations; empty for SwiGLU, whose backward recomputes them from h in the pass
// that computes dL/dh: the forward then writes them only to a per-thread scratch, and saves a
// third less), s_SF (act(h) for the non-gated activations; empty for SwiGLU)}. Where a product
// runs on oneDNN the saved activations have each piece's padding rows too (schedule.h,
// kRowBlock), so more than S rows; only mlp_backward, with the same counts, threads and
// backends, reads them.
std::vector<at::Tensor> mlp_forward(const at::Tensor& x_TD, const at::Tensor& w_S, const at::Tensor& w_in,
                                    const at::Tensor& w_out, const at::Tensor& tok_S, const std::vector<int64_t>& counts,
                                    int64_t act, int64_t threads, const std::vector<int64_t>& backends);

// Gradients {x, w_S, w_in, w_out}; an undefined tensor where ``needs`` (four flags, in that
// order) is false.
std::vector<at::Tensor> mlp_backward(const at::Tensor& g_TD, const at::Tensor& x_TD, const at::Tensor& w_S,
                                     const at::Tensor& w_in, const at::Tensor& w_out, const at::Tensor& tok_S,
                                     const std::vector<int64_t>& counts, const at::Tensor& h, const at::Tensor& a,
                                     const at::Tensor& s, int64_t act, const std::vector<bool>& needs, int64_t threads,
                                     const std::vector<int64_t>& backends);

}  // namespace sparseroute
