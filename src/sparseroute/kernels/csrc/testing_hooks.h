// Test hooks: the kernel's own loops and conversions, one at a time, for the tests to compare
// with torch. Compiled into the test module only (SPARSEROUTE_TESTING=1, see
// sparseroute.kernels.extension.load(testing=True)); the shipped module has none of them.
#pragma once

#ifndef SPARSEROUTE_TESTING
#define SPARSEROUTE_TESTING 0
#endif

#if SPARSEROUTE_TESTING
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace sparseroute::testing {

// C = A[idx] @ B[:, :N] (idx empty: A @ B) by the kernel's own row products; A, B contiguous
// float32, B's rows taken `ldb` apart from a wider matrix when ldb > N.
at::Tensor row_gemm(const at::Tensor& A, const at::Tensor& idx, const at::Tensor& B, int64_t N);

// A[ia]^T B[ib] (an empty index: the rows in order) by the kernel's own sums over rows.
at::Tensor row_gemm_tn(const at::Tensor& A, const at::Tensor& ia, const at::Tensor& B, const at::Tensor& ib);

// x^T by the kernel's own transpose (float32, where its row products run).
at::Tensor transpose(const at::Tensor& x);

// x (float32) rounded to bfloat16 by the kernels' conversion, and that widened back.
std::tuple<at::Tensor, at::Tensor> bf16_round_trip(const at::Tensor& x);

}  // namespace sparseroute::testing
#endif
