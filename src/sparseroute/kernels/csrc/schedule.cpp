// The split of the rows, the plan and its checks, the per-token sums (schedule.h).

#include "schedule.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <string>

#include "products.h"
#include "row_gemm.h"
#include "vector_math.h"
#include "workspace.h"

namespace sparseroute {

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

std::vector<std::vector<Piece>> split_rows(const std::vector<int64_t>& counts, int64_t P) {
  const auto off = offsets_of(counts);
  const int64_t S = off.back();
  std::vector<std::vector<Piece>> parts(P);
  size_t e = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t lo = S * p / P, hi = S * (p + 1) / P;
    while (e < counts.size() && off[e + 1] <= lo) ++e;
    for (size_t f = e; f < counts.size() && off[f] < hi; ++f) {
      const int64_t start = std::max(off[f], lo), stop = std::min(off[f + 1], hi);
      if (stop > start) parts[p].push_back({static_cast<int64_t>(f), start, stop - start, start > off[f]});
    }
  }
  return parts;
}

SharingSwitches& sharing_switches() {
  static SharingSwitches switches;  // in this module only (a function of its own, not inline)
  return switches;
}

namespace {

// The width N of product p's per-expert matrix (codes.expert_matrix): the columns the kernel's
// own loops run over.
int64_t own_width(Product p, int64_t D, int64_t F, int64_t H) {
  switch (p) {
    case kUp: return H;         // h = x @ w_in [D, H]
    case kDown: return D;       // y = a @ w_out [F, D]
    case kGradAct: return F;    // dL/da = g @ w_out^T [D, F]
    case kGradX: return D;      // dL/dx = dL/dh @ w_in^T [H, D]
    case kGradWIn: return H;    // dL/dw_in [D, H], a sum over rows
    case kGradWOut: return D;   // dL/dw_out [F, D], a sum over rows
  }
  return -1;
}

std::string product_list() {
  std::string names;
  for (int64_t p = 0; p < kNumProducts; ++p) names += std::string(p ? ", " : "") + product_name(p);
  return names;
}

// Raises, naming the product and why, when `backend` cannot run product p for these inputs.
void check_backend(Product p, int64_t backend, const at::Tensor& x_TD, const at::Tensor& w_in, const at::Tensor& w_out,
                   int64_t D, int64_t F, int64_t H) {
  const char* name = product_name(p);
  TORCH_CHECK(backend_name(backend) != nullptr, "expert_parallel: unknown backend code ", backend, " for product '",
              name, "'");
  if (backend == kOwn) {
    TORCH_CHECK(x_TD.scalar_type() == at::kFloat, "expert_parallel: product '", name,
                "' cannot run on 'own': the kernel's own loops take float32, the inputs are ", x_TD.scalar_type());
    TORCH_CHECK(w_in.is_contiguous() && w_out.is_contiguous(), "expert_parallel: product '", name,
                "' cannot run on 'own': the kernel's own loops need contiguous w_in and w_out");
    TORCH_CHECK(row_gemm_runs(16), "expert_parallel: product '", name,
                "' cannot run on 'own': the kernel's own loops do not run on this CPU (they need AVX-512F)");
    const int64_t N = own_width(p, D, F, H);
    TORCH_CHECK(row_gemm_runs(N), "expert_parallel: product '", name,
                "' cannot run on 'own': the kernel's own loops need a multiple of 16 columns, this product has ", N);
  } else if (backend == kOneDNN) {
    TORCH_CHECK(onednn_matmul_usable_for(x_TD.scalar_type()), "expert_parallel: product '", name,
                "' cannot run on 'onednn': oneDNN's matmul does not run here for ", x_TD.scalar_type(),
                " (this CPU, or a torch without oneDNN)");
    TORCH_CHECK(std::min(D, F) >= kMinDim, "expert_parallel: product '", name, "' cannot run on 'onednn': it takes D and F of at least ",
                kMinDim, ", here D = ", D, " and F = ", F);
  }
}

}  // namespace

Plan::Plan(const std::vector<int64_t>& counts, const at::Tensor& x_TD, const at::Tensor& w_S, const at::Tensor& w_in,
           const at::Tensor& w_out, const at::Tensor& tok_S, int64_t act, int64_t threads,
           const std::vector<int64_t>& backends) {
  TORCH_CHECK(activation_name(act) != nullptr, "expert_parallel: unknown activation code ", act);
  TORCH_CHECK(x_TD.dim() == 2 && x_TD.is_contiguous(), "expert_parallel: x must be a contiguous [T, D] tensor");
  TORCH_CHECK(x_TD.device().is_cpu(), "expert_parallel: CPU tensors only");
  TORCH_CHECK(tok_S.dim() == 1 && tok_S.scalar_type() == at::kLong && tok_S.is_contiguous(),
              "expert_parallel: tok_S must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3, "expert_parallel: w_in must be [E, D, H] and w_out [E, F, D]");
  const int64_t E = w_in.size(0), F = w_out.size(1), H = w_in.size(2), S = tok_S.size(0), T = x_TD.size(0);
  const int64_t D = x_TD.size(1);
  TORCH_CHECK(w_in.size(1) == D && w_out.size(0) == E && w_out.size(2) == D, "expert_parallel: w_in ", w_in.sizes(),
              " and w_out ", w_out.sizes(), " do not fit [E, D, H] and [E, F, D] with D = ", D);
  TORCH_CHECK(w_S.dim() == 1 && w_S.size(0) == S && w_S.is_contiguous(), "expert_parallel: w_S must be a contiguous [",
              S, "] tensor (one routing weight per row of tok_S)");
  TORCH_CHECK(w_S.scalar_type() == x_TD.scalar_type() && w_in.scalar_type() == x_TD.scalar_type() &&
                  w_out.scalar_type() == x_TD.scalar_type(),
              "expert_parallel: w_S, w_in and w_out must have x's dtype (", x_TD.scalar_type(), ")");
  const int64_t* tok = tok_S.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < S; ++r)  // the row loops index x with these unchecked
    TORCH_CHECK(tok[r] >= 0 && tok[r] < T, "expert_parallel: token ", tok[r], " out of range for ", T, " tokens");
  TORCH_CHECK(H == (act == kSwiGLU ? 2 * F : F), "expert_parallel: w_in has ", H, " columns for F = ", F);
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, "expert_parallel: ", counts.size(), " counts for ", E,
              " experts");
  for (int64_t c : counts) TORCH_CHECK(c >= 0, "expert_parallel: negative count ", c);
  const int64_t total = offsets_of(counts).back();
  TORCH_CHECK(total == S, "expert_parallel: the counts sum to ", total, " rows, tok_S has ", S);
  TORCH_CHECK(static_cast<int64_t>(backends.size()) == kNumProducts, "expert_parallel: backends must have ",
              kNumProducts, " codes, one per product (", product_list(), "), got ", backends.size());
  for (int64_t p = 0; p < kNumProducts; ++p) {
    check_backend(static_cast<Product>(p), backends[p], x_TD, w_in, w_out, D, F, H);
    backend[p] = static_cast<Backend>(backends[p]);
    pad = pad || backend[p] == kOneDNN;
  }
  parts = split_rows(counts, std::max<int64_t>(1, std::min(threads, S)));
  for (size_t p = 0; p < parts.size(); ++p)  // the pieces in row order
    for (auto& piece : parts[p]) {
      piece.part = static_cast<int64_t>(p);
      piece.at = rows;
      rows += padded(piece);
      most = std::max(most, padded(piece));
    }
}

namespace {

// acc[d] += y[d] for D values, in the accumulation type.
template <typename acc_t, typename scalar_t>
SPARSEROUTE_VECTOR_CLONES void add_into(acc_t* acc, const scalar_t* y, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += load_as<acc_t>(y, d);
}

// out[d] = sum[d] rounded to scalar_t, for D values.
template <typename scalar_t, typename acc_t>
SPARSEROUTE_VECTOR_CLONES void store_rounded(scalar_t* out, const acc_t* sum, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) store_as(out, d, sum[d]);
}

// out[t] = the sum of the rows of token t, in row order: the rows of Y [plan rows, D], where
// sorted row s of a piece is row piece.at + (s - piece.start). Summed in the accumulation type,
// rounded once; a token without rows gets zeros. Each piece's rows are taken in token order (as
// the sort by expert leaves them; a piece that is not is sorted stably by token here, which
// keeps each token's rows in row order). Then the rows of a block of consecutive tokens are one
// run in each piece, and the sums read Y run by run, which the hardware prefetcher follows,
// rather than token by token, hopping between all the experts' rows. In parallel over the
// blocks; a block's sums build up in a per-thread buffer of about kCombineBytes, from -0.0,
// which adds exactly.
constexpr int64_t kCombineBytes = int64_t{1} << 20;

template <typename scalar_t>
void combine_runs(const std::vector<int64_t>& offsets, const std::vector<int64_t>& keys,
                  const std::vector<int64_t>& rows, const std::vector<uint8_t>& has_rows, int64_t D, const scalar_t* Y,
                  scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = static_cast<int64_t>(has_rows.size()), spans = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t B = std::clamp<int64_t>(kCombineBytes / (std::max<int64_t>(D, 1) * static_cast<int64_t>(sizeof(acc_t))), 16, 1024);
  at::parallel_for(0, (T + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> acc(B * D);
    std::vector<int64_t> next(spans);  // per piece: its first row not summed yet
    for (int64_t i = 0; i < spans; ++i)
      next[i] = std::lower_bound(keys.begin() + offsets[i], keys.begin() + offsets[i + 1], b0 * B) - keys.begin();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * B, t1 = std::min(T, t0 + B);
      std::fill(acc.begin(), acc.begin() + (t1 - t0) * D, acc_t(-0.0));
      for (int64_t i = 0; i < spans; ++i) {
        int64_t q = next[i];
        for (; q < offsets[i + 1] && keys[q] < t1; ++q) add_into(acc.data() + (keys[q] - t0) * D, Y + rows[q] * D, D);
        next[i] = q;
      }
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* o = out + t * D;
        const acc_t* sum = acc.data() + (t - t0) * D;
        if (has_rows[t]) {
          store_rounded(o, sum, D);
        } else {
          std::fill(o, o + D, scalar_t(0));
        }
      }
    }
  });
}

}  // namespace

at::Tensor combine(const Plan& plan, const at::Tensor& tok_S, const at::Tensor& Y, int64_t T) {
  const int64_t* tok = tok_S.const_data_ptr<int64_t>();
  const int64_t S = tok_S.size(0), D = Y.size(1);
  // per piece, in row order: its rows' tokens (keys) and rows of Y, by token
  std::vector<int64_t> offsets{0}, keys(S), rows(S);
  std::vector<uint8_t> has_rows(T, 0);
  for (const auto& part : plan.parts)
    for (const auto& piece : part) {
      const int64_t o = offsets.back();
      bool in_order = true;
      for (int64_t r = 0; r < piece.rows; ++r) {
        keys[o + r] = tok[piece.start + r];
        rows[o + r] = piece.at + r;
        has_rows[keys[o + r]] = 1;
        in_order = in_order && (r == 0 || keys[o + r - 1] <= keys[o + r]);
      }
      if (!in_order) {
        std::vector<int64_t> idx(piece.rows);
        for (int64_t r = 0; r < piece.rows; ++r) idx[r] = r;
        std::stable_sort(idx.begin(), idx.end(), [&](int64_t i, int64_t j) { return keys[o + i] < keys[o + j]; });
        std::vector<int64_t> k(piece.rows), y(piece.rows);
        for (int64_t r = 0; r < piece.rows; ++r) {
          k[r] = keys[o + idx[r]];
          y[r] = rows[o + idx[r]];
        }
        std::copy(k.begin(), k.end(), keys.begin() + o);
        std::copy(y.begin(), y.end(), rows.begin() + o);
      }
      offsets.push_back(o + piece.rows);
    }
  at::Tensor out = workspace().take({T, D}, Y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Y.scalar_type(), "combine_runs", [&] {
    combine_runs<scalar_t>(offsets, keys, rows, has_rows, D, Y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> sort_by_expert(const at::Tensor& indices_TK, int64_t E) {
  TORCH_CHECK(indices_TK.dim() == 2 && indices_TK.scalar_type() == at::kLong && indices_TK.device().is_cpu(),
              "sort_by_expert: indices must be a [T, K] int64 CPU tensor");
  const at::Tensor idx_t = indices_TK.contiguous();
  const int64_t n = idx_t.numel(), K = std::max<int64_t>(1, idx_t.size(1));
  const int64_t* idx = idx_t.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(E, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = idx[i];
    TORCH_CHECK(e < E, "sort_by_expert: expert index ", e, " out of range for ", E, " experts");
    if (e >= 0) ++counts[e];
  }
  std::vector<int64_t> next = offsets_of(counts);
  const int64_t S = next.back();
  at::Tensor order = at::empty({S}, idx_t.options()), tok = at::empty({S}, idx_t.options());
  int64_t *order_p = order.mutable_data_ptr<int64_t>(), *tok_p = tok.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = idx[i];
    if (e < 0) continue;
    const int64_t s = next[e]++;
    order_p[s] = i;
    tok_p[s] = i / K;
  }
  return {order, tok, counts};
}

}  // namespace sparseroute
