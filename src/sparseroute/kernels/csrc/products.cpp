// A product on ATen or oneDNN, the gathers, the transpose (products.h).

#include "products.h"

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <exception>

#if AT_MKLDNN_ENABLED()
namespace at::native {
// oneDNN's matmul primitive as torch's CPU addmm calls it for reduced-precision float32 math
// (ATen/native/mkldnn/Matmul.cpp; libtorch_cpu exports it, torch does not install its header):
// result = alpha * mat1 @ mat2, plus beta * result when beta != 0. Each operand dense or the
// transpose of a dense matrix (other strides are copied first); the product is written into
// `result`. float32 needs a CPU with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT. Declared only
// where torch was built with oneDNN, the only builds that have it.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native
#endif

namespace sparseroute {

namespace {

#if AT_MKLDNN_ENABLED()
void onednn_matmul(const at::Tensor& out, const at::Tensor& A, const at::Tensor& B) {
  at::native::mkldnn_matmul(A, B, out, 0.f, 1.f);
}
#else
[[noreturn]] void onednn_matmul(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "sparseroute: this torch build has no oneDNN");
}
#endif

// The rows the gathers read are scattered over a [T, D] matrix that the experts' products keep
// pushing out of the caches, and the hardware prefetcher cannot guess the next one: the loop
// asks for the row kPrefetchAhead rows ahead.
constexpr int64_t kPrefetchAhead = 4;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// dst[r] = src[tok[r]] for n rows of D values.
template <typename scalar_t>
void gather_rows(int64_t n, int64_t D, const int64_t* tok, const scalar_t* src, scalar_t* dst) {
  const size_t bytes = static_cast<size_t>(D) * sizeof(scalar_t);
  for (int64_t r = 0; r < n; ++r) {
    if (r + kPrefetchAhead < n) prefetch_row(src + tok[r + kPrefetchAhead] * D, D);
    std::memcpy(dst + r * D, src + tok[r] * D, bytes);
  }
}

// dst [C, R] = src [R, C]^T, both contiguous, in 16 x 16 blocks (each read and written row of a
// block stays in L1).
template <typename scalar_t>
void transpose_block(int64_t R, int64_t C, const scalar_t* src, scalar_t* dst) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < R; r0 += kB)
    for (int64_t c0 = 0; c0 < C; c0 += kB) {
      const int64_t r1 = std::min(R, r0 + kB), c1 = std::min(C, c0 + kB);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * R + r] = src[r * C + c];
    }
}

}  // namespace

bool onednn_matmul_usable_for(at::ScalarType dtype) {
#if AT_MKLDNN_ENABLED()
  auto probe = [](at::ScalarType t) {
    try {
      const auto opts = at::TensorOptions().dtype(t);
      const at::Tensor a = at::ones({kMinDim, kMinDim}, opts), out = at::empty({kMinDim, kMinDim}, opts);
      at::native::mkldnn_matmul(a, a, out, 0.f, 1.f);
      return out.eq(kMinDim).all().item<bool>();
    } catch (const std::exception&) {
      return false;
    }
  };
  static const bool f32 = probe(at::kFloat), bf16 = probe(at::kBFloat16);
  return dtype == at::kFloat ? f32 : dtype == at::kBFloat16 ? bf16 : false;
#else
  (void)dtype;
  return false;
#endif
}

void product(Backend backend, const at::Tensor& out, const at::Tensor& A, const at::Tensor& B) {
  switch (backend) {
    case kOneDNN: onednn_matmul(out, A, B); break;
    case kAten: {
      at::Tensor o = out;  // mm_out takes a mutable reference; the tensor is a handle
      at::mm_out(o, A, B);
      break;
    }
    default: TORCH_CHECK(false, "expert_parallel: no product on backend ", backend_name(backend), " here");
  }
}

void onednn_mm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "onednn_mm: shapes ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes(), " do not fit");
  for (const at::Tensor* t : {&a, &b, static_cast<const at::Tensor*>(&out)})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "onednn_mm: float32 CPU tensors only");
  TORCH_CHECK(out.is_contiguous(), "onednn_mm: the output must be contiguous");
  TORCH_CHECK(AT_MKLDNN_ENABLED(), "onednn_mm: this torch build has no oneDNN");
  TORCH_CHECK(onednn_matmul_usable(), "onednn_mm: oneDNN's float32 matmul does not run on this CPU");
  onednn_matmul(out, a, b);
}

void gather_rows_out(const at::Tensor& dst, const at::Tensor& src, const int64_t* tok) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_rows", [&] {
    gather_rows<scalar_t>(dst.size(0), src.size(1), tok, src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>());
  });
}

void transpose_out(const at::Tensor& dst, const at::Tensor& src) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "transpose_block", [&] {
    transpose_block<scalar_t>(src.size(0), src.size(1), src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace sparseroute
