// Block-sparse causal attention on the CPU, forward and backward (sparseroute.attention's
// executor; the selection contract is sparseroute.attention.selection's).
//
// Legend: B batch, H query heads, Hkv kv-heads (G = H / Hkv query heads share a kv-head and its
// selection), S sequence, D head dim, bs block size, N = ceil(S / bs) blocks, K slots, c the
// selected blocks of one query block, L = the keys they hold (c·bs, less when the last block of
// the sequence is among them).
//
// idx [B, Hkv, N, K] must be normalised (sparseroute.attention.selection.normalize_block_indices):
// the readable blocks (j <= n) ascending, then -1s. So a query block's own block, when selected,
// is its last one, and only there does causality mask anything.
//
// Forward, one task per (b, kv-head, query block): the selected K and V blocks are copied into
// two [L, D] buffers (once for the G heads), then per head one product for the scores
// [rows, L], the masked softmax row by row, one product for the output; the output and the
// per-row log-sum-exp are kept (+inf for a row that reads nothing, whose output is 0).
// Backward, one task per (b, kv-head), query blocks in order: the probabilities are recomputed
// from the log-sum-exp (no [S, S] or [S, L] tensor is ever kept), and the gradients of the
// gathered keys and values are summed in [L, D] buffers, then added into dK and dV; a task owns
// its kv-head's dK and dV, so no two threads write the same rows. Products call the BLAS that
// torch links (its Fortran sgemm_/dgemm_, which torch exports), as row-major views of
// column-major calls; where this torch has none, at::mm_out on views of the same memory.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "vector_math.h"

// The Fortran BLAS in torch's library (weak: absent, the products fall back to at::mm_out).
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace sparseroute {
namespace {

template <typename T>
at::Tensor view_of(const T* p, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
  // the stored matrix is [rows, cols] with leading dimension ld; transposed: its transpose
  auto opts = at::TensorOptions().dtype(std::is_same_v<T, float> ? at::kFloat : at::kDouble);
  at::Tensor t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  return transposed ? t.t() : t;
}

// Row-major C[M, N] = alpha op(A) op(B) + beta C, op(A) [M, Kd], op(B) [Kd, N]; A, B, C with
// leading dimensions lda, ldb, ldc; ta / tb: A (B) is stored transposed.
template <typename T>
inline void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t Kd, T alpha, const T* A, int64_t lda, const T* Bm,
               int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  // row-major C = column-major C^T = op(B)^T op(A)^T: B first, then A
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(Kd);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const char t1 = tb ? 'T' : 'N', t2 = ta ? 'T' : 'N';
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&t1, &t2, &m, &n, &k, &alpha, Bm, &la, A, &lb, &beta, C, &lc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&t1, &t2, &m, &n, &k, &alpha, Bm, &la, A, &lb, &beta, C, &lc);
      return;
    }
  }
  at::Tensor c = view_of(C, M, N, ldc, false);
  at::Tensor prod = at::mm(view_of(A, ta ? Kd : M, ta ? M : Kd, lda, ta), view_of(Bm, tb ? N : Kd, tb ? Kd : N, ldb, tb));
  if (beta == T(0))
    c.copy_(prod.mul_(alpha));
  else
    c.mul_(beta).add_(prod, alpha);
}

struct Shape {
  int64_t B, H, Hkv, G, S, D, bs, N, K;
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& idx, int64_t bs) {
  Shape s{};
  s.B = q.size(0);
  s.H = q.size(1);
  s.S = q.size(2);
  s.D = q.size(3);
  s.Hkv = k.size(1);
  s.G = s.H / s.Hkv;
  s.bs = bs;
  s.N = idx.size(2);
  s.K = idx.size(3);
  return s;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                  const c10::optional<at::Tensor>& key_bias, int64_t bs) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "block_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "block_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "block_attention: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "block_attention: float32 or float64 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && idx.is_contiguous(),
              "block_attention: contiguous inputs only");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 4, "block_attention: idx must be int64 [B, Hkv, N, K]");
  TORCH_CHECK(bs >= 1 && idx.size(2) == (q.size(2) + bs - 1) / bs, "block_attention: idx has the wrong N");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "block_attention: H must be a multiple of Hkv");
  if (key_bias.has_value()) {
    TORCH_CHECK(key_bias->scalar_type() == q.scalar_type() && key_bias->is_contiguous() && key_bias->dim() == 3 &&
                    key_bias->size(0) == q.size(0) && key_bias->size(1) == k.size(1) && key_bias->size(2) == q.size(2),
                "block_attention: key_bias must be a contiguous [B, Hkv, S] tensor of q's dtype");
  }
}

// The selected blocks of one query block: how many (c), their first key position, their length,
// and L (their keys in total).
struct Selection {
  std::vector<int64_t> start, len;
  int64_t L = 0;
  bool own = false;  // the last selected block is the query block's own (causal inside)
};

inline void select(const int64_t* row, const Shape& s, int64_t n, Selection& sel) {
  sel.start.clear();
  sel.len.clear();
  sel.L = 0;
  for (int64_t i = 0; i < s.K; ++i) {
    const int64_t j = row[i];
    if (j < 0) break;  // normalised: -1s come last
    const int64_t st = j * s.bs;
    const int64_t ln = std::min(s.bs, s.S - st);
    sel.start.push_back(st);
    sel.len.push_back(ln);
    sel.L += ln;
  }
  sel.own = !sel.start.empty() && sel.start.back() == n * s.bs;
}

// Copy the selected blocks of one kv-head (rows of D values) into dst [L, D].
template <typename T>
inline void gather(const T* src, const Selection& sel, int64_t D, T* dst) {
  int64_t off = 0;
  for (size_t i = 0; i < sel.start.size(); ++i) {
    std::memcpy(dst + off * D, src + sel.start[i] * D, sizeof(T) * sel.len[i] * D);
    off += sel.len[i];
  }
}

template <typename T>
inline void scatter_add(const T* src, const Selection& sel, int64_t D, T* dst) {
  int64_t off = 0;
  for (size_t i = 0; i < sel.start.size(); ++i) {
    T* d = dst + sel.start[i] * D;
    const T* x = src + off * D;
    const int64_t n = sel.len[i] * D;
    for (int64_t e = 0; e < n; ++e) d[e] += x[e];
    off += sel.len[i];
  }
}

// Scores of `rows` queries against the L gathered keys, masked: scale·q kᵀ + bias, -inf after the
// query inside its own block. q0: the position of the first query row.
template <typename T>
inline void scores(const T* q, int64_t rows, const T* kc, const Selection& sel, const T* bias_c, T scale, int64_t D,
                   int64_t q0, T* sc) {
  const int64_t L = sel.L;
  mm<T>(false, true, rows, L, D, scale, q, D, kc, D, T(0), sc, L);
  if (bias_c != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      T* row = sc + r * L;
      for (int64_t c = 0; c < L; ++c) row[c] += bias_c[c];
    }
  }
  if (sel.own) {
    const int64_t own_len = sel.len.back();
    const int64_t own_off = L - own_len;
    const int64_t own_start = sel.start.back();
    const T neg_inf = -std::numeric_limits<T>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t first_masked = q0 + r - own_start + 1;  // keys of the own block after the query
      T* row = sc + r * L + own_off;
      for (int64_t c = std::max<int64_t>(first_masked, 0); c < own_len; ++c) row[c] = neg_inf;
    }
  }
}

template <typename T>
SPARSEROUTE_VECTOR_CLONES void exp_shift(T* x, int64_t n, T shift) {
  for (int64_t i = 0; i < n; ++i) x[i] = exp_of<T>(x[i] - shift);
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                  const c10::optional<at::Tensor>& key_bias, const Shape& s, T scale, at::Tensor& out,
                  at::Tensor& lse) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const T* bp = key_bias.has_value() ? key_bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const int64_t D = s.D;
  const int64_t tasks = s.B * s.Hkv * s.N;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    Selection sel;
    std::vector<T> kc, vc, bc, sc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t % s.N;
      const int64_t bh = t / s.N;  // b * Hkv + hkv
      const int64_t b = bh / s.Hkv, hkv = bh % s.Hkv;
      select(ip + t * s.K, s, n, sel);
      const int64_t q0 = n * s.bs;
      const int64_t rows = std::min(s.bs, s.S - q0);
      if (sel.L == 0) {
        for (int64_t g = 0; g < s.G; ++g) {
          const int64_t h = hkv * s.G + g;
          std::fill(op + ((b * s.H + h) * s.S + q0) * D, op + ((b * s.H + h) * s.S + q0 + rows) * D, T(0));
          std::fill(lp + (b * s.H + h) * s.S + q0, lp + (b * s.H + h) * s.S + q0 + rows,
                    std::numeric_limits<T>::infinity());
        }
        continue;
      }
      kc.resize(sel.L * D);
      vc.resize(sel.L * D);
      sc.resize(rows * sel.L);
      gather(kp + bh * s.S * D, sel, D, kc.data());
      gather(vp + bh * s.S * D, sel, D, vc.data());
      const T* bias_c = nullptr;
      if (bp != nullptr) {
        bc.resize(sel.L);
        gather(bp + bh * s.S, sel, 1, bc.data());
        bias_c = bc.data();
      }
      for (int64_t g = 0; g < s.G; ++g) {
        const int64_t h = hkv * s.G + g;
        const T* qh = qp + ((b * s.H + h) * s.S + q0) * D;
        T* oh = op + ((b * s.H + h) * s.S + q0) * D;
        T* lh = lp + (b * s.H + h) * s.S + q0;
        scores(qh, rows, kc.data(), sel, bias_c, scale, D, q0, sc.data());
        for (int64_t r = 0; r < rows; ++r) {
          T* row = sc.data() + r * sel.L;
          T m = -std::numeric_limits<T>::infinity();
          for (int64_t c = 0; c < sel.L; ++c) m = std::max(m, row[c]);
          if (!std::isfinite(m)) {  // reads nothing (only a -inf bias can do that here)
            std::fill(row, row + sel.L, T(0));
            lh[r] = std::numeric_limits<T>::infinity();
            continue;
          }
          exp_shift(row, sel.L, m);
          T l = 0;
          for (int64_t c = 0; c < sel.L; ++c) l += row[c];
          const T inv = T(1) / l;
          for (int64_t c = 0; c < sel.L; ++c) row[c] *= inv;
          lh[r] = m + std::log(l);
        }
        mm<T>(false, false, rows, D, sel.L, T(1), sc.data(), sel.L, vc.data(), D, T(0), oh, D);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& idx, const c10::optional<at::Tensor>& key_bias, const at::Tensor& out,
                   const at::Tensor& lse, const Shape& s, T scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                   c10::optional<at::Tensor>& dbias) {
  const T* gp = grad.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const T* bp = key_bias.has_value() ? key_bias->data_ptr<T>() : nullptr;
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  T* dbp = dbias.has_value() ? dbias->data_ptr<T>() : nullptr;
  const int64_t D = s.D;
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t t0, int64_t t1) {
    Selection sel;
    std::vector<T> kc, vc, dkc, dvc, bc, dbc, p, dp, delta;
    for (int64_t bh = t0; bh < t1; ++bh) {
      const int64_t b = bh / s.Hkv, hkv = bh % s.Hkv;
      for (int64_t n = 0; n < s.N; ++n) {
        select(ip + (bh * s.N + n) * s.K, s, n, sel);
        const int64_t q0 = n * s.bs;
        const int64_t rows = std::min(s.bs, s.S - q0);
        if (sel.L == 0) {
          for (int64_t g = 0; g < s.G; ++g) {
            T* dqh = dqp + ((b * s.H + hkv * s.G + g) * s.S + q0) * D;
            std::fill(dqh, dqh + rows * D, T(0));
          }
          continue;
        }
        const int64_t L = sel.L;
        kc.resize(L * D);
        vc.resize(L * D);
        dkc.assign(L * D, T(0));
        dvc.assign(L * D, T(0));
        p.resize(rows * L);
        dp.resize(rows * L);
        delta.resize(rows);
        gather(kp + bh * s.S * D, sel, D, kc.data());
        gather(vp + bh * s.S * D, sel, D, vc.data());
        const T* bias_c = nullptr;
        if (bp != nullptr) {
          bc.resize(L);
          gather(bp + bh * s.S, sel, 1, bc.data());
          bias_c = bc.data();
          dbc.assign(L, T(0));
        }
        for (int64_t g = 0; g < s.G; ++g) {
          const int64_t h = hkv * s.G + g;
          const int64_t base = (b * s.H + h) * s.S + q0;
          const T* qh = qp + base * D;
          const T* gh = gp + base * D;
          const T* oh = op + base * D;
          const T* lh = lp + base;
          T* dqh = dqp + base * D;
          scores(qh, rows, kc.data(), sel, bias_c, scale, D, q0, p.data());
          for (int64_t r = 0; r < rows; ++r) {
            T* row = p.data() + r * L;
            if (std::isinf(lh[r]) && lh[r] > 0) {
              std::fill(row, row + L, T(0));
            } else {
              exp_shift(row, L, lh[r]);
            }
            T d = 0;
            for (int64_t e = 0; e < D; ++e) d += gh[r * D + e] * oh[r * D + e];
            delta[r] = d;
          }
          // dV += Pᵀ dO ; dP = dO Vᵀ
          mm<T>(true, false, L, D, rows, T(1), p.data(), L, gh, D, T(1), dvc.data(), D);
          mm<T>(false, true, rows, L, D, T(1), gh, D, vc.data(), D, T(0), dp.data(), L);
          // dS = P ∘ (dP - delta), in dp
          for (int64_t r = 0; r < rows; ++r) {
            T* ds = dp.data() + r * L;
            const T* pr = p.data() + r * L;
            const T dr = delta[r];
            for (int64_t c = 0; c < L; ++c) ds[c] = pr[c] * (ds[c] - dr);
          }
          if (dbp != nullptr) {
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < L; ++c) dbc[c] += dp[r * L + c];
          }
          // dQ = scale dS K ; dK += scale dSᵀ Q
          mm<T>(false, false, rows, D, L, scale, dp.data(), L, kc.data(), D, T(0), dqh, D);
          mm<T>(true, false, L, D, rows, scale, dp.data(), L, qh, D, T(1), dkc.data(), D);
        }
        scatter_add(dkc.data(), sel, D, dkp + bh * s.S * D);
        scatter_add(dvc.data(), sel, D, dvp + bh * s.S * D);
        if (dbp != nullptr) scatter_add(dbc.data(), sel, 1, dbp + bh * s.S);
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> block_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& idx, const c10::optional<at::Tensor>& key_bias,
                                                int64_t block_size, double scale) {
  check_inputs(q, k, v, idx, key_bias, block_size);
  const Shape s = shape_of(q, k, idx, block_size);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({s.B, s.H, s.S}, q.options());
  if (q.scalar_type() == at::kFloat)
    forward_impl<float>(q, k, v, idx, key_bias, s, static_cast<float>(scale), out, lse);
  else
    forward_impl<double>(q, k, v, idx, key_bias, s, scale, out, lse);
  return {out, lse};
}

std::vector<c10::optional<at::Tensor>> block_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
    const c10::optional<at::Tensor>& key_bias, const at::Tensor& out, const at::Tensor& lse, int64_t block_size,
    double scale) {
  check_inputs(q, k, v, idx, key_bias, block_size);
  TORCH_CHECK(grad.is_contiguous() && out.is_contiguous() && lse.is_contiguous() && grad.sizes() == q.sizes() &&
                  grad.scalar_type() == q.scalar_type(),
              "block_attention_backward: grad, out, lse must be contiguous and match q");
  const Shape s = shape_of(q, k, idx, block_size);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::zeros_like(k);
  at::Tensor dv = at::zeros_like(v);
  c10::optional<at::Tensor> dbias;
  if (key_bias.has_value()) dbias = at::zeros_like(*key_bias);
  if (q.scalar_type() == at::kFloat)
    backward_impl<float>(grad, q, k, v, idx, key_bias, out, lse, s, static_cast<float>(scale), dq, dk, dv, dbias);
  else
    backward_impl<double>(grad, q, k, v, idx, key_bias, out, lse, s, scale, dq, dk, dv, dbias);
  return {dq, dk, dv, dbias};
}

}  // namespace sparseroute
