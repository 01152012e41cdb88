// Row products for float32 on CPUs with AVX-512: C[r, :] = A_r @ B for r < n, where A_r is row r
// of a dense matrix A, or row idx[r] of it (the expert kernel's gather of x's rows fused into the
// product: each block's rows are read straight from x, the next block's asked for ahead). B is
// [K, N] with rows ldb apart and unit column stride; C's rows are ldc apart; N a multiple of 16.
//
// A tile keeps kRows x 64 outputs in 24 of the 32 vector registers over the whole sum; each step
// reads one row of B (4 vectors) and broadcasts one value of each of the tile's rows. The tile's
// rows (kRows x K values) stay in L1 and B's 64 columns (K x 64) in L2. Each output is summed
// over k in order, one fused multiply-add per term, so a result does not depend on n, on the
// block a row falls in, or on the thread. Where the per-expert matrix fits in L2 (the rule of
// sparseroute.kernels.plan), this keeps up with the libraries' matmuls on the same rows, and it
// needs no gathered copy of them.
//
// These loops are a capability, not a decision: the caller says which products run on them
// (sparseroute.kernels.codes, the kernel's backends list); row_gemm_runs says where they can.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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

// A tile: C[0:MR, 0:16 NV] (rows ldc apart) = a sum over k < K, starting from zero (first) or
// from C's values: C[i, :] = sum over k of a[i][k] * B[k, 0:16 NV], where a[i] are the tile's
// rows (each read in order over k) and B's rows are ldb apart.
template <int MR, int NV>
SPARSEROUTE_AVX512 inline void tile(int64_t K, const float* const* a, const float* B, int64_t ldb, float* C,
                                    int64_t ldc, bool first) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(C + i * ldc + 16 * v);
  const float* r[MR];  // the tile's rows, in registers over the loop
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) r[i] = a[i];
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bk + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(r[i][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(x, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
}

// The tile of mr rows (1..kRows) and nv vectors of columns (1..4).
template <int NV>
SPARSEROUTE_AVX512 inline void tile_rows(int mr, int64_t K, const float* const* a, const float* B, int64_t ldb, float* C,
                                         int64_t ldc, bool first) {
  switch (mr) {
    case 6: tile<6, NV>(K, a, B, ldb, C, ldc, first); break;
    case 5: tile<5, NV>(K, a, B, ldb, C, ldc, first); break;
    case 4: tile<4, NV>(K, a, B, ldb, C, ldc, first); break;
    case 3: tile<3, NV>(K, a, B, ldb, C, ldc, first); break;
    case 2: tile<2, NV>(K, a, B, ldb, C, ldc, first); break;
    default: tile<1, NV>(K, a, B, ldb, C, ldc, first); break;
  }
}

SPARSEROUTE_AVX512 inline void tile_any(int mr, int nv, int64_t K, const float* const* a, const float* B, int64_t ldb,
                                        float* C, int64_t ldc, bool first) {
  switch (nv) {
    case 4: tile_rows<4>(mr, K, a, B, ldb, C, ldc, first); break;
    case 3: tile_rows<3>(mr, K, a, B, ldb, C, ldc, first); break;
    case 2: tile_rows<2>(mr, K, a, B, ldb, C, ldc, first); break;
    default: tile_rows<1>(mr, K, a, B, ldb, C, ldc, first); break;
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
    for (int64_t j0 = 0; j0 < N; j0 += 64)
      tile_any(mr, static_cast<int>(std::min<int64_t>(64, N - j0) / 16), K, rows, B + j0, ldb, C + r0 * ldc + j0, ldc,
               true);
  }
}

// Sums over rows: C [M, N] (rows ldc apart) = sum over r < n of A_r[0:M]^T B_r[0:N], the weight
// gradients' form, with A_r, B_r rows of A and B (or the rows ia[r], ib[r] of them: gathers fused).
// The rows go in chunks of kChunk. Each chunk's rows of A are first transposed into a per-thread
// buffer (M rows of kChunk values) and B's rows, where they are gathered, copied in order into
// another, so that a chunk is the row form above, A^T (M x kc) times B (kc x N): the tiles read
// every row in order instead of six values from every row in turn. A tile's outputs start from
// C's values after the first chunk, so each output is still one fused multiply-add chain in r
// order, whatever the chunking.
constexpr int64_t kChunk = 128;

SPARSEROUTE_AVX512 inline void transpose_rows_of(int64_t R, int64_t C, const float* const* src, float* dst, int64_t ldd);

SPARSEROUTE_AVX512 inline void run_tn(int64_t n, int64_t M, int64_t N, const float* A, int64_t lda, const int64_t* ia,
                                      const float* B, int64_t ldb, const int64_t* ib, float* C, int64_t ldc) {
  if (n == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    return;
  }
  thread_local std::vector<float> at;  // the chunk's A transposed: M rows of kc values
  thread_local std::vector<float> bg;  // the chunk's rows of B, where they are gathered
  thread_local std::vector<const float*> rows;
  if (static_cast<int64_t>(at.size()) < M * kChunk) at.resize(M * kChunk);
  if (ib != nullptr && static_cast<int64_t>(bg.size()) < N * kChunk) bg.resize(N * kChunk);
  if (static_cast<int64_t>(rows.size()) < M + kRows) rows.resize(M + kRows);
  const float* ap[kChunk];
  for (int64_t r0 = 0; r0 < n; r0 += kChunk) {
    const int64_t kc = std::min(kChunk, n - r0);
    for (int64_t k = 0; k < kc; ++k) ap[k] = A + (ia != nullptr ? ia[r0 + k] : r0 + k) * lda;
    transpose_rows_of(kc, M, ap, at.data(), kc);
    for (int64_t m = 0; m < M; ++m) rows[m] = at.data() + m * kc;
    // the chunk's rows of B: in place, or (scattered) copied in order first, the next ones asked
    // for ahead: each is read once per block of C's columns
    const float* Bc = B + r0 * ldb;
    int64_t ldbc = ldb;
    if (ib != nullptr) {
      for (int64_t k = 0; k < kc; ++k) {
        if (k + 4 < kc) {
          const char* next = reinterpret_cast<const char*>(B + ib[r0 + k + 4] * ldb);
          for (int64_t q = 0; q < N * 4; q += 64) _mm_prefetch(next + q, _MM_HINT_T0);
        }
        std::copy(B + ib[r0 + k] * ldb, B + ib[r0 + k] * ldb + N, bg.data() + k * N);
      }
      Bc = bg.data();
      ldbc = N;
    }
    for (int64_t j0 = 0; j0 < N; j0 += 64) {  // a block of C's columns: its rows stay in L2, B's in L1
      const int nv = static_cast<int>(std::min<int64_t>(64, N - j0) / 16);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kRows, M - m0));
        tile_any(mr, nv, kc, rows.data() + m0, Bc + j0, ldbc, C + m0 * ldc + j0, ldc, r0 == 0);
      }
    }
  }
}

// dst [C, R] (rows ldd apart) = the [R, C] matrix whose row r starts at src[r], transposed, in
// 16 x 16 blocks transposed in registers (three rounds of shuffles), the edges one value at a time.
SPARSEROUTE_AVX512 inline void transpose_rows_of(int64_t R, int64_t C, const float* const* src, float* dst, int64_t ldd) {
  const int64_t R16 = R / 16 * 16, C16 = C / 16 * 16;
  for (int64_t r0 = 0; r0 < R16; r0 += 16)
    for (int64_t c0 = 0; c0 < C16; c0 += 16) {
      __m512 r[16], t[16], u[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src[r0 + i] + c0);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {  // within 128-bit lanes: rows 2i, 2i+1 interleaved
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {  // u[4g + c], lane l: column 4l + c of rows 4g..4g+3
        const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
        u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
      }
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {  // the 4 x 4 lanes of u[c], u[4 + c], u[8 + c], u[12 + c]
        const __m512 s0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), s1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
        const __m512 s2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44), s3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
        _mm512_storeu_ps(dst + (c0 + c) * ldd + r0, _mm512_shuffle_f32x4(s0, s2, 0x88));
        _mm512_storeu_ps(dst + (c0 + 4 + c) * ldd + r0, _mm512_shuffle_f32x4(s0, s2, 0xDD));
        _mm512_storeu_ps(dst + (c0 + 8 + c) * ldd + r0, _mm512_shuffle_f32x4(s1, s3, 0x88));
        _mm512_storeu_ps(dst + (c0 + 12 + c) * ldd + r0, _mm512_shuffle_f32x4(s1, s3, 0xDD));
      }
    }
  for (int64_t r = 0; r < R; ++r)  // the edges
    for (int64_t c = (r < R16 ? C16 : 0); c < C; ++c) dst[c * ldd + r] = src[r][c];
}

// dst [C, R] (rows ldd apart) = src [R, C]^T (rows lds apart).
SPARSEROUTE_AVX512 inline void transpose(int64_t R, int64_t C, const float* src, int64_t lds, float* dst, int64_t ldd) {
  constexpr int64_t kBlock = 256;  // rows at a time: their pointers on the stack
  const float* rows[kBlock];
  for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
    const int64_t nr = std::min(kBlock, R - r0);
    for (int64_t r = 0; r < nr; ++r) rows[r] = src + (r0 + r) * lds;
    transpose_rows_of(nr, C, rows, dst + r0, ldd);
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

// C [M, N] = sum over r < n of A_r[0:M]^T B_r[0:N] (rows of A and B, or rows ia[r] and ib[r] of
// them where those are not null), as above; only where row_gemm_runs(N). n = 0 gives zeros.
inline void row_gemm_tn(int64_t n, int64_t M, int64_t N, const float* A, int64_t lda, const int64_t* ia, const float* B,
                        int64_t ldb, const int64_t* ib, float* C, int64_t ldc) {
#if SPARSEROUTE_ROW_GEMM
  row_gemm_detail::run_tn(n, M, N, A, lda, ia, B, ldb, ib, C, ldc);
#else
  (void)n, (void)M, (void)N, (void)A, (void)lda, (void)ia, (void)B, (void)ldb, (void)ib, (void)C, (void)ldc;
#endif
}

// dst [C, R] = src [R, C]^T (rows ldd and lds apart); only where row_gemm_runs (any N).
inline void transpose_rows(int64_t R, int64_t C, const float* src, int64_t lds, float* dst, int64_t ldd) {
#if SPARSEROUTE_ROW_GEMM
  row_gemm_detail::transpose(R, C, src, lds, dst, ldd);
#else
  (void)R, (void)C, (void)src, (void)lds, (void)dst, (void)ldd;
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
