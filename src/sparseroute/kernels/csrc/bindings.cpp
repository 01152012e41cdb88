// The Python module: sparseroute.kernels.extension builds it twice from the same sources, as the
// shipped module and as the test module (SPARSEROUTE_TESTING=1, with the test hooks and the
// switches of the work sharing). The capability queries say what can run here; which backend
// runs each product is the caller's choice (the backends list of mlp_forward and mlp_backward).

// torch/python.h (the tensor casters) rather than torch/extension.h, which adds the whole C++
// frontend (autograd, nn, optim) to compile for nothing
#include <pybind11/stl.h>
#include <torch/python.h>

#include "block_attention.h"
#include "mlp.h"
#include "products.h"
#include "row_gemm.h"
#include "schedule.h"
#include "softmax_topk.h"
#include "testing_hooks.h"
#include "workspace.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace sparseroute;

  m.def("mlp_forward", &mlp_forward,
        "expert-parallel expert MLP, forward: {out, h, a, s}; backends: one backend code per product "
        "(sparseroute.kernels.codes)",
        py::arg("x_TD"), py::arg("w_S"), py::arg("w_in"), py::arg("w_out"), py::arg("tok_S"), py::arg("counts"),
        py::arg("act"), py::arg("threads"), py::arg("backends"));
  m.def("mlp_backward", &mlp_backward,
        "expert-parallel expert MLP, backward: {dx, dw_S, dw_in, dw_out} (None where needs is false); the "
        "forward's backends",
        py::arg("g_TD"), py::arg("x_TD"), py::arg("w_S"), py::arg("w_in"), py::arg("w_out"), py::arg("tok_S"),
        py::arg("counts"), py::arg("h"), py::arg("a"), py::arg("s"), py::arg("act"), py::arg("needs"), py::arg("threads"),
        py::arg("backends"));
  m.def("sort_by_expert", &sort_by_expert, "routed pairs stably sorted by expert (counting sort): {order, tok, counts}",
        py::arg("indices_TK"), py::arg("E"));
  m.def("softmax_topk_forward", &softmax_topk_forward, "softmax over experts, then the top k (forward)",
        py::arg("logits"), py::arg("k"), py::arg("renormalize"));
  m.def("softmax_topk_backward", &softmax_topk_backward, "softmax over experts, then the top k (backward)",
        py::arg("grad_probs"), py::arg("grad_w"), py::arg("probs"), py::arg("idx"), py::arg("w"), py::arg("renormalize"));
  m.def("block_attention_forward", &block_attention_forward,
        "block-sparse causal attention, forward: {out, lse}", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("idx"),
        py::arg("key_bias"), py::arg("block_size"), py::arg("scale"));
  m.def("block_attention_backward", &block_attention_backward,
        "block-sparse causal attention, backward: {dq, dk, dv, dkey_bias}", py::arg("grad"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("idx"), py::arg("key_bias"), py::arg("out"), py::arg("lse"), py::arg("block_size"),
        py::arg("scale"));
  m.def("onednn_mm", &onednn_mm, "out = a @ b on oneDNN's matmul (float32 CPU matrices, each dense or transposed)",
        py::arg("a"), py::arg("b"), py::arg("out"));

  // capability queries
  m.def("onednn_usable", &onednn_matmul_usable, "whether oneDNN's float32 matmul runs here (this CPU, this torch)");
  m.def("onednn_usable_for", [](const at::Tensor& like) { return onednn_matmul_usable_for(like.scalar_type()); },
        "whether oneDNN's matmul runs here for tensors like this one (float32, bfloat16)", py::arg("like"));
  m.def("row_gemm_runs", &row_gemm_runs,
        "whether the kernel's own row products (backend 'own') run here for N columns (AVX-512F, N a multiple of 16)",
        py::arg("N"));

  // the buffer pool
  m.def("set_workspace_limits", [](int64_t slots, int64_t max_bytes) { workspace().set_limits(slots, max_bytes); },
        "keep at most `slots` free buffers and `max_bytes` free bytes (slots = 0: none)", py::arg("slots"),
        py::arg("max_bytes"));
  m.def("workspace_state", []() { return workspace().state(); }, "{slots, max_bytes, free buffers kept, their bytes}");

  m.attr("TESTING") = py::bool_(kTesting);

#if SPARSEROUTE_TESTING
  m.def("_set_stealing", [](bool on) { sharing_switches().stealing.store(on); },
        "tests: let threads take pieces from slower threads' parts (default on)");
  m.def("_steals", []() { return sharing_switches().steals.load(); }, "tests: pieces stolen since load");
  m.def("_set_fail_stolen", [](bool on) { sharing_switches().fail_stolen.store(on); }, "tests: a stolen piece raises");
  m.def("_set_owner_delay_us", [](int64_t us) { sharing_switches().owner_delay_us.store(us); },
        "tests: part 0's thread waits up to this long before each of its pieces, until one is stolen");
  m.def("_row_gemm", &testing::row_gemm, "tests: A[idx] @ B[:, :N] by the kernel's own row products");
  m.def("_row_gemm_tn", &testing::row_gemm_tn, "tests: A[ia]^T B[ib] by the kernel's own sums over rows");
  m.def("_transpose", &testing::transpose, "tests: x^T by the kernel's own transpose");
  m.def("_bf16_round_trip", &testing::bf16_round_trip, "tests: float32 -> bfloat16 -> float32 by the kernels' conversions");
#endif
}
