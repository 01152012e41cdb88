// Row products for float32 on CPUs with AVX-512: C[r, :] = A_r @ B for r < n, where A_r is row r
// of a dense matrix A, or row idx[r] of it (the expert kernel's gather of x's rows fused into the
// product: each block's rows are read straight from x, the next block's asked for ahead). B is
// [K, N] with rows ldb apart and unit column stride; C's rows are ldc apart; N a multiple of 16.
//
// A tile keeps kRows x 64 outputs in 24 of the 32 vector registers over the whole sum; each step
// reads one row of B (4 vectors) and broadcasts one value of each of the tile's rows. The tile's
// rows (kRows x K values) stay in L1 and B's 64 columns (K x 64) in L2. Each output is summed
// over k in order, one fused multiply-add per term, so a result does not depend on n, on the
// block a row falls in, or on the thread. On the 2-core AMD EPYC (Zen 5) of docs/RESULTS.md this
// runs the fine-grained experts' forward products at ~262 GFLOP/s a core, where oneDNN's matmul
// runs 253 on the same rows gathered first (and 228-241 inside the kernel, run N).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SPARSEROUTE_ROW_GEMM 1
#define SPARSEROUTE_AVX512 __attribute__((target("avx512f")))
#else
#define SPARSEROUTE_ROW_GEMM 0
#endif

namespace sparseroute {

#if SPARSEROUTE_ROW_GEMM
namespace row_gemm_detail {

constexpr int kRows = 6;

template <int MR, int NV>
SPARSEROUTE_AVX512 inline void tile(int64_t K, const float* const* a, const float* B, int64_t ldb, float* C,
                                    int64_t ldc) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  const float* r[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) r[i] = a[i];
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(r[i][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(x, b[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
}

template <int NV>
SPARSEROUTE_AVX512 inline void tile_rows(int mr, int64_t K, const float* const* a, const float* B, int64_t ldb,
                                         float* C, int64_t ldc) {
  switch (mr) {
    case 6: tile<6, NV>(K, a, B, ldb, C, ldc); break;
    case 5: tile<5, NV>(K, a, B, ldb, C, ldc); break;
    case 4: tile<4, NV>(K, a, B, ldb, C, ldc); break;
    case 3: tile<3, NV>(K, a, B, ldb, C, ldc); break;
    case 2: tile<2, NV>(K, a, B, ldb, C, ldc); break;
    default: tile<1, NV>(K, a, B, ldb, C, ldc); break;
  }
}

SPARSEROUTE_AVX512 inline void run(int64_t n, int64_t K, int64_t N, const float* A, int64_t lda, const int64_t* idx,
                                   const float* B, int64_t ldb, float* C, int64_t ldc) {
  const float* rows[kRows];
  for (int64_t r0 = 0; r0 < n; r0 += kRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kRows, n - r0));
    for (int i = 0; i < mr; ++i) rows[i] = A + (idx != nullptr ? idx[r0 + i] : r0 + i) * lda;
    if (idx != nullptr)  // the next block's rows, scattered over A: ask for them now
      for (int64_t r = r0 + kRows; r < std::min(n, r0 + 2 * kRows); ++r)
        for (int64_t q = 0; q < K; q += 16) _mm_prefetch(reinterpret_cast<const char*>(A + idx[r] * lda + q), _MM_HINT_T1);
    float* Cr = C + r0 * ldc;
    int64_t j0 = 0;
    for (; j0 + 64 <= N; j0 += 64) tile_rows<4>(mr, K, rows, B + j0, ldb, Cr + j0, ldc);
    switch ((N - j0) / 16) {
      case 3: tile_rows<3>(mr, K, rows, B + j0, ldb, Cr + j0, ldc); break;
      case 2: tile_rows<2>(mr, K, rows, B + j0, ldb, Cr + j0, ldc); break;
      case 1: tile_rows<1>(mr, K, rows, B + j0, ldb, Cr + j0, ldc); break;
      default: break;
    }
  }
}

}  // namespace row_gemm_detail
#endif

// Whether row_gemm runs here for N columns: AVX-512F (asked once) and N a multiple of 16.
inline bool row_gemm_runs(int64_t N) {
#if SPARSEROUTE_ROW_GEMM
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && N % 16 == 0;
#else
  (void)N;
  return false;
#endif
}

// C = rows @ B as above; only where row_gemm_runs(N).
inline void row_gemm(int64_t n, int64_t K, int64_t N, const float* A, int64_t lda, const int64_t* idx, const float* B,
                     int64_t ldb, float* C, int64_t ldc) {
#if SPARSEROUTE_ROW_GEMM
  row_gemm_detail::run(n, K, N, A, lda, idx, B, ldb, C, ldc);
#else
  (void)n, (void)K, (void)N, (void)A, (void)lda, (void)idx, (void)B, (void)ldb, (void)C, (void)ldc;
#endif
}

}  // namespace sparseroute
