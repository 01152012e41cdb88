// The expert kernel's building blocks around one product: a product on ATen or oneDNN, the row
// gathers that feed them, a transpose, and what oneDNN can take here.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "codes.h"

namespace sparseroute {

// oneDNN's matmul takes a call whose D or F is below kMinDim only at a loss (its per-call set-up
// costs more than the product); the kernel refuses such a request (sparseroute.kernels.gemm.MIN_DIM).
constexpr int64_t kMinDim = 4;

// Whether oneDNN's matmul runs on this CPU for `dtype` (float32 or bfloat16; asked once per
// dtype, with a small product). float32 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, bfloat16
// what torch's mkldnn_bf16_device_check asks for; elsewhere the matmul raises. False where
// this torch has no oneDNN.
bool onednn_matmul_usable_for(at::ScalarType dtype);
inline bool onednn_matmul_usable() { return onednn_matmul_usable_for(at::kFloat); }

// out = A @ B on torch's matmul (kAten) or oneDNN's (kOneDNN). On oneDNN the products call its
// matmul directly: it takes transposed operands as they are (the weight gradients' x^T and g^T
// need no copy) and writes into the kernel's buffers. kOwn is not a backend of this function
// (the callers run their own loops, row_gemm.h).
void product(Backend backend, const at::Tensor& out, const at::Tensor& A, const at::Tensor& B);

// out = a @ b on oneDNN's matmul, for sparseroute.kernels.gemm: float32 CPU matrices, `out` dense.
void onednn_mm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);

// dst [n, D] = src[tok] (rows of a [T, D] matrix), both contiguous: index_select over rows,
// without its per-call dispatch and checks (the plan checked the tokens once).
void gather_rows_out(const at::Tensor& dst, const at::Tensor& src, const int64_t* tok);

// dst [C, R] = src [R, C]^T, both contiguous.
void transpose_out(const at::Tensor& dst, const at::Tensor& src);

// Rows [n, end) of a [rows, cols] tensor set to zero.
inline void zero_rows_from(const at::Tensor& t, int64_t n) {
  if (t.size(0) > n) t.narrow(0, n, t.size(0) - n).zero_();
}

}  // namespace sparseroute
