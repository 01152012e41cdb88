// The test hooks (testing_hooks.h); empty in the shipped module.

#include "testing_hooks.h"

#if SPARSEROUTE_TESTING

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "row_gemm.h"
#include "vector_math.h"

namespace sparseroute::testing {

namespace {

// Every index in [0, rows).
void check_rows(const at::Tensor& idx, int64_t rows, const char* what) {
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r) TORCH_CHECK(p[r] >= 0 && p[r] < rows, what, ": index out of range");
}

}  // namespace

at::Tensor row_gemm(const at::Tensor& A, const at::Tensor& idx, const at::Tensor& B, int64_t N) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat &&
                  A.is_contiguous() && B.is_contiguous() && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "_row_gemm: contiguous float32 A and B, int64 idx");
  TORCH_CHECK(A.size(1) == B.size(0) && N <= B.size(1), "_row_gemm: shapes do not fit");
  TORCH_CHECK(row_gemm_runs(N), "_row_gemm: does not run here for ", N, " columns");
  const bool gather = idx.numel() > 0;
  const int64_t n = gather ? idx.numel() : A.size(0);
  check_rows(idx, A.size(0), "_row_gemm");
  at::Tensor C = at::empty({n, N}, A.options());
  sparseroute::row_gemm(n, A.size(1), N, A.const_data_ptr<float>(), A.size(1), gather ? idx.const_data_ptr<int64_t>() : nullptr,
                        B.const_data_ptr<float>(), B.size(1), C.mutable_data_ptr<float>(), N);
  return C;
}

at::Tensor row_gemm_tn(const at::Tensor& A, const at::Tensor& ia, const at::Tensor& B, const at::Tensor& ib) {
  for (const at::Tensor* t : {&A, &B})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous(), "_row_gemm_tn: contiguous float32 A, B");
  for (const at::Tensor* t : {&ia, &ib})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "_row_gemm_tn: int64 indices");
  const int64_t n = ia.numel() > 0 ? ia.numel() : A.size(0);
  TORCH_CHECK((ib.numel() > 0 ? ib.numel() : B.size(0)) == n, "_row_gemm_tn: as many rows of B as of A");
  TORCH_CHECK(row_gemm_runs(B.size(1)), "_row_gemm_tn: does not run here for ", B.size(1), " columns");
  check_rows(ia, A.size(0), "_row_gemm_tn");
  check_rows(ib, B.size(0), "_row_gemm_tn");
  at::Tensor C = at::empty({A.size(1), B.size(1)}, A.options());
  sparseroute::row_gemm_tn(n, A.size(1), B.size(1), A.const_data_ptr<float>(), A.size(1),
                           ia.numel() > 0 ? ia.const_data_ptr<int64_t>() : nullptr, B.const_data_ptr<float>(), B.size(1),
                           ib.numel() > 0 ? ib.const_data_ptr<int64_t>() : nullptr, C.mutable_data_ptr<float>(), B.size(1));
  return C;
}

at::Tensor transpose(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "_transpose: a contiguous float32 matrix");
  TORCH_CHECK(row_gemm_runs(16), "_transpose: does not run here");
  at::Tensor out = at::empty({x.size(1), x.size(0)}, x.options());
  transpose_rows(x.size(0), x.size(1), x.const_data_ptr<float>(), x.size(1), out.mutable_data_ptr<float>(), x.size(0));
  return out;
}

std::tuple<at::Tensor, at::Tensor> bf16_round_trip(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "_bf16_round_trip: a contiguous float32 tensor");
  at::Tensor b = at::empty(x.sizes(), x.options().dtype(at::kBFloat16)), w = at::empty_like(x);
  const float* src = x.const_data_ptr<float>();
  auto* mid = b.mutable_data_ptr<c10::BFloat16>();
  float* back = w.mutable_data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) store_as(mid, i, src[i]);
  for (int64_t i = 0; i < x.numel(); ++i) back[i] = load_as<float>(mid, i);
  return {b, w};
}

}  // namespace sparseroute::testing

#endif  // SPARSEROUTE_TESTING
