// The expert MLP's backward (mlp.h).

#include "mlp.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/threshold_backward.h>

#include "activations.h"
#include "codes.h"
#include "products.h"
#include "row_gemm.h"
#include "schedule.h"
#include "workspace.h"

namespace sparseroute {

namespace {

using at::Tensor;

// dL/dh = act'(h) * g for the non-gated activations.
void activation_backward_out(int64_t act, Tensor& gh, const Tensor& g, const Tensor& h) {
  switch (act) {
    case kGELU: at::gelu_backward_out(gh, g, h); break;
    case kSiLU: at::silu_backward_out(gh, g, h); break;
    default: at::threshold_backward_out(gh, g, h, 0); break;
  }
}

// A thread's buffers, taken once per call; a buffer a call does not use has no rows.
struct BackwardScratch {
  Tensor g_rows;        // the piece's rows of g, gathered (for the products that do not read them by token)
  Tensor x_rows;        // the piece's rows of x, gathered (for grad_w_in off the kernel's own loops)
  Tensor grad_act;      // dL/d(weighted activation) of the piece's rows
  Tensor grad_hidden;   // dL/dh of the piece's rows
  Tensor grad_w_out_t;  // an expert's dL/dw_out transposed, g^T a (grad_w_out off the own loops)
  Tensor activations;   // SwiGLU: the piece's weighted activations, recomputed (for grad_w_out)
  Tensor w_out_t;       // an expert's w_out transposed (grad_act on the own loops)
  Tensor w_in_t;        // an expert's w_in transposed (grad_x on the own loops)
};

}  // namespace

std::vector<Tensor> mlp_backward(const Tensor& g_TD, const Tensor& x_TD, const Tensor& w_S, const Tensor& w_in,
                                 const Tensor& w_out, const Tensor& tok_S, const std::vector<int64_t>& counts,
                                 const Tensor& h, const Tensor& a, const Tensor& s, int64_t act,
                                 const std::vector<bool>& needs, int64_t threads, const std::vector<int64_t>& backends) {
  const Plan plan(counts, x_TD, w_S, w_in, w_out, tok_S, act, threads, backends);
  const int64_t D = x_TD.size(1), F = w_out.size(1), E = w_in.size(0), H = w_in.size(2);
  TORCH_CHECK(g_TD.sizes() == x_TD.sizes() && g_TD.scalar_type() == x_TD.scalar_type() && g_TD.is_contiguous(),
              "expert_parallel: the output gradient must be a contiguous tensor of x's shape and dtype");
  TORCH_CHECK(h.size(0) == plan.rows && (act == kSwiGLU || (a.size(0) == plan.rows && s.size(0) == plan.rows)),
              "expert_parallel: the saved activations have ", h.size(0), " rows where this call's plan has ",
              plan.rows, " (the backward must use the forward's backends)");
  TORCH_CHECK(h.dim() == 2 && h.size(1) == H && h.is_contiguous() && h.scalar_type() == x_TD.scalar_type() &&
                  (act == kSwiGLU || (a.size(1) == F && s.size(1) == F && a.is_contiguous() && s.is_contiguous())),
              "expert_parallel: the saved activations are not the forward's (h [rows, H], a and s [rows, F], contiguous)");
  TORCH_CHECK(needs.size() == 4, "expert_parallel: needs must have 4 flags (x, w_S, w_in, w_out), got ", needs.size());
  const int64_t P = plan.size();
  const bool need_x = needs[0], need_w = needs[1], need_in = needs[2], need_out = needs[3];
  Tensor gw = need_w ? at::empty_like(w_S) : Tensor();
  Tensor g_in = need_in ? workspace().take(w_in.sizes(), w_in.options()) : Tensor();
  Tensor g_out = need_out ? workspace().take(w_out.sizes(), w_out.options()) : Tensor();
  for (int64_t e = 0; e < E; ++e) {  // experts without rows get zero weight gradients
    if (counts[e] != 0) continue;
    if (need_in) g_in.select(0, e).zero_();
    if (need_out) g_out.select(0, e).zero_();
  }
  // a part's first piece may continue an expert begun in an earlier part: its weight gradients
  // go to the part's own buffers, added to the expert's after the parallel region
  std::vector<Tensor> rest_in(P), rest_out(P);
  for (int64_t p = 0; p < P; ++p) {
    if (plan.continued(p) < 0) continue;
    if (need_in) rest_in[p] = at::empty_like(w_in.select(0, 0));
    if (need_out) rest_out[p] = at::empty_like(w_out.select(0, 0));
  }
  Tensor gx_rows = need_x ? workspace().take({plan.rows, D}, x_TD.options()) : Tensor();  // each row's dL/dx
  const bool need_hidden = need_x || need_w || need_in;
  // on the kernel's own loops, dL/da = g w_out^T and dL/dx = dL/dh w_in^T run against the
  // expert's weights transposed into a per-thread buffer that stays in cache
  const bool own_da = need_hidden && plan.on(kGradAct) == kOwn, own_dx = need_x && plan.on(kGradX) == kOwn;
  // and the weight gradients x^T dL/dh and a^T g read the rows of x and g by token
  const bool own_din = need_in && plan.on(kGradWIn) == kOwn, own_dout = need_out && plan.on(kGradWOut) == kOwn;
  // the rows of g gathered only for the products that do not read them by token
  const bool gather_g = (need_hidden && !own_da) || (need_out && !own_dout);
  const int64_t* tok = tok_S.const_data_ptr<int64_t>();
  run_parts(
      plan.parts,
      [&] {
        BackwardScratch scratch;
        scratch.g_rows = workspace().take({gather_g ? plan.most : 0, D}, x_TD.options());
        scratch.x_rows = workspace().take({need_in && !own_din ? plan.most : 0, D}, x_TD.options());
        scratch.grad_act = workspace().take({plan.most, F}, h.options());
        scratch.grad_hidden = workspace().take({plan.most, H}, h.options());
        scratch.grad_w_out_t = workspace().take({need_out && !own_dout ? D : 0, F}, w_out.options());
        scratch.activations = workspace().take({act == kSwiGLU && need_out ? plan.most : 0, F}, h.options());
        scratch.w_out_t = workspace().take({own_da ? D : 0, F}, w_out.options());
        scratch.w_in_t = workspace().take({own_dx ? H : 0, D}, w_in.options());
        return scratch;
      },
      [&](BackwardScratch& scratch, const Piece& piece) {
        const int64_t e = piece.expert, n = piece.rows, start = piece.start, np = plan.padded(piece);
        const int64_t* t = tok + start;
        Tensor g_p = scratch.g_rows.narrow(0, 0, gather_g ? np : 0);
        if (gather_g) {
          gather_rows_out(g_p.narrow(0, 0, n), g_TD, t);
          zero_rows_from(g_p, n);
        }
        // the piece's weighted activations: saved, or for SwiGLU recomputed from h (with dL/dh
        // when that is needed, in the same pass)
        const bool recompute = act == kSwiGLU && need_out;
        Tensor a_p = act == kSwiGLU ? scratch.activations.narrow(0, 0, recompute ? np : 0) : a.narrow(0, piece.at, np);
        Tensor ga_p = scratch.grad_act.narrow(0, 0, np), ga = ga_p.narrow(0, 0, n);  // dL/d(weighted activation)
        Tensor gh_p = scratch.grad_hidden.narrow(0, 0, np), gh = gh_p.narrow(0, 0, n);
        if (need_hidden) {
          if (own_da) {  // only the piece's rows of dL/da are read
            float* wt = scratch.w_out_t.mutable_data_ptr<float>();
            transpose_rows(F, D, w_out.const_data_ptr<float>() + e * F * D, D, wt, F);
            row_gemm(n, D, F, g_TD.const_data_ptr<float>(), D, t, wt, F, ga_p.mutable_data_ptr<float>(), F);
          } else {
            product(plan.on(kGradAct), ga_p, g_p, w_out.select(0, e).t());
          }
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "expert_activation_backward", [&] {
            scalar_t* gw_e = need_w ? gw.mutable_data_ptr<scalar_t>() + start : nullptr;
            const scalar_t* w_e = w_S.const_data_ptr<scalar_t>() + start;
            if (act == kSwiGLU) {
              weighted_swiglu_backward<scalar_t>(n, F, ga.const_data_ptr<scalar_t>(),
                                                 h.const_data_ptr<scalar_t>() + piece.at * 2 * F, w_e,
                                                 gh.mutable_data_ptr<scalar_t>(), gw_e,
                                                 recompute ? a_p.mutable_data_ptr<scalar_t>() : nullptr);
            } else {
              scaled_rows_backward<scalar_t>(n, F, ga.mutable_data_ptr<scalar_t>(),
                                             s.const_data_ptr<scalar_t>() + piece.at * F, w_e, gw_e);
            }
          });
        } else if (recompute) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "weighted_swiglu", [&] {
            weighted_swiglu<scalar_t>(n, F, h.const_data_ptr<scalar_t>() + piece.at * 2 * F,
                                      w_S.const_data_ptr<scalar_t>() + start, a_p.mutable_data_ptr<scalar_t>());
          });
        }
        if (own_dout) {  // a^T g over the piece's rows, g's read by token
          Tensor g_out_e = piece.continues ? rest_out[piece.part] : g_out.select(0, e);
          row_gemm_tn(n, F, D, a_p.const_data_ptr<float>(), F, nullptr, g_TD.const_data_ptr<float>(), D, t,
                      g_out_e.mutable_data_ptr<float>(), D);
        } else if (need_out) {  // (g^T a)^T: the padding rows of a and g are zero
          if (recompute) zero_rows_from(a_p, n);
          // computed as g^T a, then transposed: a^T g directly, with the expert's few rows (F)
          // against the many columns (D), ran slower on the libraries' matmuls
          product(plan.on(kGradWOut), scratch.grad_w_out_t, g_p.t(), a_p);
          transpose_out(piece.continues ? rest_out[piece.part] : g_out.select(0, e), scratch.grad_w_out_t);
        }
        if (!need_hidden) return;
        if (act != kSwiGLU) activation_backward_out(act, gh, ga, h.narrow(0, piece.at, n));
        zero_rows_from(gh_p, n);
        if (own_din) {  // x^T dL/dh over the piece's rows, x's read by token
          Tensor g_in_e = piece.continues ? rest_in[piece.part] : g_in.select(0, e);
          row_gemm_tn(n, D, H, x_TD.const_data_ptr<float>(), D, t, gh_p.const_data_ptr<float>(), H, nullptr,
                      g_in_e.mutable_data_ptr<float>(), H);
        } else if (need_in) {  // x^T dL/dh: the padding rows of dL/dh (and of x) are zero
          Tensor g_in_e = piece.continues ? rest_in[piece.part] : g_in.select(0, e);
          Tensor x_p = scratch.x_rows.narrow(0, 0, np);
          gather_rows_out(x_p.narrow(0, 0, n), x_TD, t);
          zero_rows_from(x_p, n);
          product(plan.on(kGradWIn), g_in_e, x_p.t(), gh_p);
        }
        if (own_dx) {  // the padding rows' dL/dx are never read
          float* wt = scratch.w_in_t.mutable_data_ptr<float>();
          transpose_rows(D, H, w_in.const_data_ptr<float>() + e * D * H, H, wt, D);
          row_gemm(n, H, D, gh_p.const_data_ptr<float>(), H, nullptr, wt, D, gx_rows.mutable_data_ptr<float>() + piece.at * D,
                   D);
        } else if (need_x) {
          product(plan.on(kGradX), gx_rows.narrow(0, piece.at, np), gh_p, w_in.select(0, e).t());
        }
      });
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = plan.continued(p);
    if (e < 0) continue;
    if (need_in) g_in.select(0, e).add_(rest_in[p]);
    if (need_out) g_out.select(0, e).add_(rest_out[p]);
  }
  Tensor gx = need_x ? combine(plan, tok_S, gx_rows, x_TD.size(0)) : Tensor();
  return {gx, gw, g_in, g_out};
}

}  // namespace sparseroute
