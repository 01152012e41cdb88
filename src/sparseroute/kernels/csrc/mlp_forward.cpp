// The expert MLP's forward (mlp.h).

#include "mlp.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>

#include "activations.h"
#include "codes.h"
#include "products.h"
#include "row_gemm.h"
#include "schedule.h"
#include "workspace.h"

namespace sparseroute {

namespace {

using at::Tensor;

// s = act(h) for the non-gated activations.
void activation_out(int64_t act, Tensor& s, const Tensor& h) {
  switch (act) {
    case kGELU: at::gelu_out(s, h); break;
    case kSiLU: at::silu_out(s, h); break;
    default: at::clamp_min_out(s, h, 0); break;
  }
}

// A thread's buffers, taken once per call.
struct ForwardScratch {
  Tensor x_rows;       // the piece's rows of x, gathered (empty where `up` reads them by token)
  Tensor activations;  // SwiGLU: the piece's weighted activations (not saved: the backward recomputes them)
};

}  // namespace

std::vector<Tensor> mlp_forward(const Tensor& x_TD, const Tensor& w_S, const Tensor& w_in, const Tensor& w_out,
                                const Tensor& tok_S, const std::vector<int64_t>& counts, int64_t act, int64_t threads,
                                const std::vector<int64_t>& backends) {
  const Plan plan(counts, x_TD, w_S, w_in, w_out, tok_S, act, threads, backends);
  const int64_t D = x_TD.size(1), F = w_out.size(1), H = w_in.size(2);
  // on the kernel's own loops, x's rows are read by token, in place
  const bool own_up = plan.on(kUp) == kOwn, own_down = plan.on(kDown) == kOwn;
  Tensor h = workspace().take({plan.rows, H}, x_TD.options());
  Tensor a = act == kSwiGLU ? x_TD.new_empty({0, F}) : workspace().take({plan.rows, F}, x_TD.options());
  Tensor s = act == kSwiGLU ? x_TD.new_empty({0, F}) : workspace().take({plan.rows, F}, x_TD.options());
  Tensor y = workspace().take({plan.rows, D}, x_TD.options());  // each row's output
  const int64_t* tok = tok_S.const_data_ptr<int64_t>();
  run_parts(
      plan.parts,
      [&] {
        return ForwardScratch{workspace().take({own_up ? 0 : plan.most, D}, x_TD.options()),
                              workspace().take({act == kSwiGLU ? plan.most : 0, F}, x_TD.options())};
      },
      [&](ForwardScratch& scratch, const Piece& piece) {
        const int64_t e = piece.expert, n = piece.rows, np = plan.padded(piece);
        Tensor h_p = h.narrow(0, piece.at, np);
        Tensor a_p = act == kSwiGLU ? scratch.activations.narrow(0, 0, np) : a.narrow(0, piece.at, np);
        Tensor a_e = a_p.narrow(0, 0, n);
        if (own_up) {
          row_gemm(n, D, H, x_TD.const_data_ptr<float>(), D, tok + piece.start, w_in.const_data_ptr<float>() + e * D * H, H,
                   h_p.mutable_data_ptr<float>(), H);
          zero_rows_from(h_p, n);  // as the padded product leaves them
        } else {
          Tensor x_p = scratch.x_rows.narrow(0, 0, np);
          gather_rows_out(x_p.narrow(0, 0, n), x_TD, tok + piece.start);
          zero_rows_from(x_p, n);
          product(plan.on(kUp), h_p, x_p, w_in.select(0, e));
        }
        if (act == kSwiGLU) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "weighted_swiglu", [&] {
            weighted_swiglu<scalar_t>(n, F, h_p.const_data_ptr<scalar_t>(), w_S.const_data_ptr<scalar_t>() + piece.start,
                                      a_e.mutable_data_ptr<scalar_t>());
          });
        } else {
          Tensor s_p = s.narrow(0, piece.at, np), s_e = s_p.narrow(0, 0, n);
          activation_out(act, s_e, h_p.narrow(0, 0, n));
          at::mul_out(a_e, s_e, w_S.narrow(0, piece.start, n).unsqueeze(1));
          zero_rows_from(s_p, n);  // never read; zero so that the saved tensors are a function of the inputs
        }
        zero_rows_from(a_p, n);  // (the saved a's padding rows enter the backward's padded products)
        if (own_down) {  // the padding rows' outputs are never read
          row_gemm(n, F, D, a_p.const_data_ptr<float>(), F, nullptr, w_out.const_data_ptr<float>() + e * F * D, D,
                   y.mutable_data_ptr<float>() + piece.at * D, D);
        } else {
          product(plan.on(kDown), y.narrow(0, piece.at, np), a_p, w_out.select(0, e));
        }
      });
  return {combine(plan, tok_S, y, x_TD.size(0)), h, a, s};
}

}  // namespace sparseroute
