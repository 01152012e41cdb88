// Expert-parallel expert MLP for CPUs (SwiGLU, GELU, SiLU or ReLU experts): the routed rows,
// sorted by expert, are split into as many equal parts as there are intra-op threads, and each
// thread runs its part expert by expert with single-threaded matmuls (and its own row gather
// loops; in float32 on AVX-512, small experts' products on its own loops, which read the routed
// rows in place: row_gemm.h) inside one at::parallel_for region (ATen and oneDNN do not nest
// parallelism). Small per-expert matmuls then run without a fork/join per op, and the threads
// get equal numbers of rows however skewed the expert loads are; a thread that finishes early
// takes unstarted pieces of another's part (see Sharing). Each row's output goes to its own row
// of a [rows, D] buffer; after the region, each token's output is the sum of its rows (combine),
// in parallel over the tokens. Python: sparseroute.kernels.extension.
//
// Legend: T tokens, D model dim, E experts, F expert hidden, S routed rows sorted by expert,
// P parts. The rows of expert e are [offset[e], offset[e] + counts[e]) of the S rows; tok_S[s]
// is the token of row s and w_S[s] its routing weight. A piece is the rows of one expert that
// fall into one part; an expert cut by a part boundary has a piece in each of those parts.
//
// Determinism: the pieces are a fixed function of the counts and of P; a token's rows are summed
// in row order; the weight gradient of a cut expert is its first piece's, plus the later pieces'
// in part order. A result thus depends only on the inputs and P, not on which thread ran which
// piece.

#include <torch/extension.h>
#include <c10/core/impl/alloc_cpu.h>
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "row_gemm.h"
#include "vector_math.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
using sparseroute::load_as;
using sparseroute::sigmoid_of;
using sparseroute::store_as;

struct Piece {
  int64_t expert, start, rows;
  bool continues;  // not the expert's first rows: its weight gradient is a partial sum to add
  int64_t at = 0;    // its first row in the saved activations (start, or with padding rows before it)
  int64_t part = 0;  // the part it is in
};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) off[e + 1] = off[e] + counts[e];
  return off;
}

// The pieces of each of P parts of rows [p*S/P, (p+1)*S/P), in row order.
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

// The SwiGLU of n rows of h = [gate | up] (row stride 2F), each row scaled by its routing weight:
// a = gate * sigmoid(gate) * up * w, in one pass. The sigmoid is not kept: the backward
// recomputes it from the gate it reads anyway, which costs less than writing and reading it.
template <typename scalar_t>
SPARSEROUTE_VECTOR_CLONES void weighted_swiglu(int64_t n, int64_t F, const scalar_t* h, const scalar_t* w, scalar_t* a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t *gate = h + r * 2 * F, *up = gate + F;
    scalar_t* out = a + r * F;
    const acc_t wr = static_cast<acc_t>(w[r]);
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const acc_t x = load_as<acc_t>(gate, f);
      store_as(out, f, x * sigmoid_of<acc_t>(x) * load_as<acc_t>(up, f) * wr);
    }
  }
}

// Its backward, in one pass: from ga = dL/da, gh = [dL/dgate | dL/dup] (row stride 2F) and, when
// gw is not null, gw[r] = dL/dw[r] = sum_f ga * silu(gate) * up. silu'(x) = s (1 + x (1 - s)).
// With kActivations it also writes the weighted activations a (as weighted_swiglu does, from the
// same sigmoid), which the forward does not save.
template <typename scalar_t, bool kActivations>
SPARSEROUTE_VECTOR_CLONES void weighted_swiglu_backward_rows(int64_t n, int64_t F, const scalar_t* ga, const scalar_t* h,
                                                             const scalar_t* w, scalar_t* gh, scalar_t* gw, scalar_t* a) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t *gate = h + r * 2 * F, *up = gate + F, *g = ga + r * F;
    scalar_t *g_gate = gh + r * 2 * F, *g_up = g_gate + F, *out = kActivations ? a + r * F : nullptr;
    const acc_t wr = static_cast<acc_t>(w[r]);
    acc_t dw = 0;
#pragma omp simd reduction(+ : dw)
    for (int64_t f = 0; f < F; ++f) {
      const acc_t x = load_as<acc_t>(gate, f), s = sigmoid_of<acc_t>(x);
      const acc_t u = load_as<acc_t>(up, f), gr = load_as<acc_t>(g, f);
      const acc_t g_silu = gr * x * s;  // ga * silu(gate)
      dw += g_silu * u;
      store_as(g_up, f, g_silu * wr);
      store_as(g_gate, f, gr * wr * u * s * (acc_t(1) + x * (acc_t(1) - s)));
      if constexpr (kActivations) store_as(out, f, x * s * u * wr);
    }
    if (gw != nullptr) gw[r] = static_cast<scalar_t>(dw);
  }
}

// a may be null (then only dL/dh and dL/dw).
template <typename scalar_t>
void weighted_swiglu_backward(int64_t n, int64_t F, const scalar_t* ga, const scalar_t* h, const scalar_t* w,
                              scalar_t* gh, scalar_t* gw, scalar_t* a) {
  if (a != nullptr) {
    weighted_swiglu_backward_rows<scalar_t, true>(n, F, ga, h, w, gh, gw, a);
  } else {
    weighted_swiglu_backward_rows<scalar_t, false>(n, F, ga, h, w, gh, gw, a);
  }
}

// The rows the gathers read are scattered over a [T, D] matrix that the experts' products keep
// pushing out of the caches, and the hardware prefetcher cannot guess the next one: the loop
// asks for the row kPrefetchAhead rows ahead (cuts the gathers' time by ~25% at T 8192, D 512,
// E 64, k 8).
constexpr int64_t kPrefetchAhead = 4;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// dst[r] = src[tok[r]] for n rows of D values: index_select over rows, without its per-call
// dispatch and checks (the plan checked the tokens once).
template <typename scalar_t>
void gather_rows(int64_t n, int64_t D, const int64_t* tok, const scalar_t* src, scalar_t* dst) {
  const size_t bytes = static_cast<size_t>(D) * sizeof(scalar_t);
  for (int64_t r = 0; r < n; ++r) {
    if (r + kPrefetchAhead < n) prefetch_row(src + tok[r + kPrefetchAhead] * D, D);
    std::memcpy(dst + r * D, src + tok[r] * D, bytes);
  }
}

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

}  // namespace

namespace at::native {
// oneDNN's matmul primitive as torch's CPU addmm calls it for reduced-precision float32 math
// (ATen/native/mkldnn/Matmul.cpp; libtorch_cpu exports it, torch does not install its header):
// result = alpha * mat1 @ mat2, plus beta * result when beta != 0. Each operand dense or the
// transpose of a dense matrix (other strides are copied first); the product is written into
// `result`. float32 needs a CPU with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace {

// The per-expert products run on ATen (torch's matmul: MKL) or on oneDNN; `gemm` is the
// backend's code from sparseroute.kernels.gemm.kernel_code (0 ATen, 1 oneDNN). See sparseroute/gemm.py
// for why: on some CPUs MKL runs its AVX2 code where oneDNN runs AVX-512. On oneDNN the products
// call its matmul directly: it takes transposed operands as they are (the weight gradients'
// x^T and g^T need no copy) and writes into the kernel's buffers. oneDNN takes float32 and
// bfloat16 here (each where its matmul runs on this CPU), and a call whose D or F is below
// kMinDim (sparseroute.kernels.gemm.MIN_DIM) stays on ATen.
constexpr int64_t kMinDim = 4;

// Whether oneDNN's matmul runs on this CPU for `dtype` (float32 or bfloat16; asked once per
// dtype, with a small product). float32 needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, bfloat16
// what torch's mkldnn_bf16_device_check asks for; elsewhere mkldnn_matmul raises.
bool onednn_matmul_usable_for(at::ScalarType dtype) {
  auto probe = [](at::ScalarType t) {
    try {
      const auto opts = at::TensorOptions().dtype(t);
      const Tensor a = at::ones({kMinDim, kMinDim}, opts), out = at::empty({kMinDim, kMinDim}, opts);
      at::native::mkldnn_matmul(a, a, out, 0.f, 1.f);
      return out.eq(kMinDim).all().item<bool>();
    } catch (const std::exception&) {
      return false;
    }
  };
  static const bool f32 = probe(at::kFloat), bf16 = probe(at::kBFloat16);
  return dtype == at::kFloat ? f32 : dtype == at::kBFloat16 ? bf16 : false;
}

bool onednn_matmul_usable() { return onednn_matmul_usable_for(at::kFloat); }

// Whether a call's products run on oneDNN: backend code 1, float32 or bfloat16, D and F at least
// kMinDim, and oneDNN's matmul usable here for that dtype.
bool on_onednn(int64_t gemm, const Tensor& x_TD, int64_t F) {
  return gemm == 1 && std::min(x_TD.size(1), F) >= kMinDim && onednn_matmul_usable_for(x_TD.scalar_type());
}

// out = A @ B, on oneDNN or on ATen.
void product(bool onednn, Tensor out, const Tensor& A, const Tensor& B) {
  if (onednn) {
    at::native::mkldnn_matmul(A, B, out, 0.f, 1.f);
  } else {
    at::mm_out(out, A, B);
  }
}

// oneDNN builds a product's kernel for its exact shape (~1-2 ms) and keeps the last 1,024 in a
// cache. The expert loads change at every training step, and with them the rows of every
// expert's products: built afresh at every step, they would cost more than they compute (~85 ms
// a step of the `tiny` MoE LM). So on oneDNN the kernel rounds the rows of each piece up to a
// multiple of kRowBlock, with zero rows below, which bounds the shapes to a few per product:
// the saved activations h (a and s) hold each piece's rows padded so (Plan::at), the padding
// rows' outputs are dropped, and they add nothing to the weight gradients (sums over the rows).
constexpr int64_t kRowBlock = 32;

int64_t padded_rows(bool pad, int64_t n) { return pad ? (n + kRowBlock - 1) / kRowBlock * kRowBlock : n; }

// Rows [n, end) of a [rows, cols] tensor set to zero.
void zero_rows_from(Tensor& t, int64_t n) {
  if (t.size(0) > n) t.narrow(0, n, t.size(0) - n).zero_();
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

void transpose_out(Tensor dst, const Tensor& src) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "transpose_block", [&] {
    transpose_block<scalar_t>(src.size(0), src.size(1), src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>());
  });
}

// gather_rows over tensors: dst [n, D] = src[tok]. Both contiguous.
void gather_rows_out(const Tensor& dst, const Tensor& src, const int64_t* tok) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_rows", [&] {
    gather_rows<scalar_t>(dst.size(0), src.size(1), tok, src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>());
  });
}

// Memory for a pool block. Blocks of 2 MiB and more are aligned to 2 MiB and marked for
// transparent huge pages (where the OS grants them on request, as with THP "madvise"): the
// gathers and the combine read rows scattered over these buffers, and huge pages spare them
// TLB misses (~1% of a training step at T 8192, D 512, E 64, k 8). The pool keeps its blocks,
// so their pages are faulted in once, not at every call. c10::free_cpu frees either kind.
constexpr size_t kHugePage = size_t{1} << 21;

void* allocate_block(int64_t bytes) {
  const size_t n = static_cast<size_t>(std::max<int64_t>(bytes, 1));
#ifdef __linux__
  if (n >= kHugePage) {
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, n) == 0) {
      madvise(p, (n + kHugePage - 1) / kHugePage * kHugePage, MADV_HUGEPAGE);  // a request: failure is harmless
      return p;
    }
  }
#endif
  return c10::alloc_cpu(n);
}

// A pool of the kernel's buffers (saved activations, outputs, weight gradients, per-thread
// scratch), reused across calls. Tensors this large come straight from mmap and go back to the
// OS when freed, so every call would otherwise fault in fresh zeroed pages for them: ~23k minor
// faults per training step at T 8192, D 512, E 64, k 8. The buffers' storages are allocated by
// the pool's allocator, whose deleter hands a block back to the pool when the storage dies: so a
// block is reused only once no tensor, view, saved variable or .grad uses it, and while a
// storage lives it has no other owner (autograd may add into it in place, and AccumulateGrad
// may take it as a .grad without a copy). The pool keeps at most `slots` free blocks and
// `max_bytes` free bytes, dropping the least recently freed to make room; slots = 0 keeps none.
class Workspace {
 public:
  static Workspace& instance();

  Tensor take(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t need = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
    if (need == 0) return at::empty(sizes, options);
    // resizable: a resize allocates a new block here and hands the old one back
    c10::Storage storage(c10::Storage::use_byte_size_t(), need, &allocator_, /*resizable=*/true);
    return at::empty({0}, options).set_(std::move(storage), 0, sizes);
  }

  // Keep at most `slots` free blocks and `max_bytes` free bytes from now on (slots = 0: none),
  // freeing the oldest over the limits. Blocks in use come back under the new limits.
  void set_limits(int64_t slots, int64_t max_bytes) {
    TORCH_CHECK(slots >= 0 && max_bytes >= 0, "expert_parallel: workspace limits must be >= 0, got slots = ", slots,
                ", max_bytes = ", max_bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    slots_limit_ = slots;
    bytes_limit_ = max_bytes;
    drop_oldest(0);
  }

  std::tuple<int64_t, int64_t, int64_t, int64_t> state() {  // {slots, max_bytes, free blocks kept, their bytes}
    std::lock_guard<std::mutex> lock(mutex_);
    return {slots_limit_, bytes_limit_, static_cast<int64_t>(free_.size()), free_bytes_};
  }

 private:
  struct Block {
    void* ptr;
    int64_t bytes;
  };

  class Allocator final : public c10::Allocator {
   public:
    explicit Allocator(Workspace* pool) : pool_(pool) {}
    c10::DataPtr allocate(size_t n) override {
      Block* block = new Block(pool_->get(static_cast<int64_t>(n)));
      return {block->ptr, block, &Workspace::release, c10::Device(c10::DeviceType::CPU)};
    }
    void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

   private:
    Workspace* pool_;
  };

  // The smallest free block of at least `need` bytes and at most 5/4 of it, else a new one.
  Block get(int64_t need) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->bytes >= need && it->bytes <= need + need / 4 && (best == free_.end() || it->bytes < best->bytes))
          best = it;
      if (best != free_.end()) {
        const Block block = *best;
        free_bytes_ -= block.bytes;
        free_.erase(best);
        return block;
      }
    }
    return {allocate_block(need), need};
  }

  // The deleter of the pool's storages: the block goes back to the pool, or to the OS when it
  // does not fit under the limits.
  static void release(void* ctx) {
    std::unique_ptr<Block> block(static_cast<Block*>(ctx));
    instance().put(*block);
  }

  void put(const Block& block) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (slots_limit_ == 0 || block.bytes > bytes_limit_) {  // could never be kept
      c10::free_cpu(block.ptr);
      return;
    }
    drop_oldest(block.bytes);
    free_.push_back(block);
    free_bytes_ += block.bytes;
  }

  // Free the oldest free blocks until one more of `incoming` bytes fits under the limits (with
  // incoming = 0: until the kept ones fit). Called with the mutex held.
  void drop_oldest(int64_t incoming) {
    const int64_t room = incoming > 0 ? 1 : 0;
    while (!free_.empty() &&
           (static_cast<int64_t>(free_.size()) + room > slots_limit_ || free_bytes_ + incoming > bytes_limit_)) {
      c10::free_cpu(free_.front().ptr);
      free_bytes_ -= free_.front().bytes;
      free_.erase(free_.begin());
    }
  }

  std::mutex mutex_;
  std::vector<Block> free_;  // least recently freed first
  int64_t free_bytes_ = 0;
  int64_t slots_limit_ = 64;
  int64_t bytes_limit_ = int64_t{1} << 30;
  Allocator allocator_{this};
};

Workspace& Workspace::instance() {
  static Workspace* pool = new Workspace();  // never destroyed: blocks may come back at exit
  return *pool;
}

Workspace& workspace() { return Workspace::instance(); }

// Activations, numbered as sparseroute.moe.dispatch.KERNEL_ACTIVATIONS.
enum Activation : int64_t { kSwiGLU = 0, kGELU = 1, kSiLU = 2, kReLU = 3 };

// The checked inputs' split over the threads, the same in the forward and the backward.
// With `pad` (on oneDNN) each piece's rows are rounded up to a multiple of kRowBlock in the
// products and in the saved activations (see kRowBlock).
struct Plan {
  std::vector<std::vector<Piece>> parts;
  bool pad;
  // on oneDNN's backend in float32 (with dense weights), products may run on the kernel's own
  // loops instead (row_gemm.h): see own_product
  bool own;
  int64_t most = 0;  // rows of the largest piece, padded: the size of the per-thread buffers
  int64_t rows = 0;  // rows of the saved activations: S, plus the padding rows

  Plan(const std::vector<int64_t>& counts, const Tensor& x_TD, const Tensor& w_in, const Tensor& w_out,
       const Tensor& tok_S, int64_t act, int64_t threads, bool onednn)
      : pad(onednn),
        own(onednn && x_TD.scalar_type() == at::kFloat && w_in.is_contiguous() && w_out.is_contiguous()) {
    TORCH_CHECK(act >= kSwiGLU && act <= kReLU, "expert_parallel: unknown activation code ", act);
    TORCH_CHECK(x_TD.dim() == 2 && x_TD.is_contiguous(), "expert_parallel: x must be a contiguous [T, D] tensor");
    TORCH_CHECK(tok_S.dim() == 1 && tok_S.scalar_type() == at::kLong && tok_S.is_contiguous(),
                "expert_parallel: tok_S must be a contiguous 1-D int64 tensor");
    const int64_t E = w_in.size(0), F = w_out.size(1), H = w_in.size(2), S = tok_S.size(0), T = x_TD.size(0);
    const int64_t* tok = tok_S.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < S; ++r)  // the row loops index x with these unchecked
      TORCH_CHECK(tok[r] >= 0 && tok[r] < T, "expert_parallel: token ", tok[r], " out of range for ", T, " tokens");
    TORCH_CHECK(H == (act == kSwiGLU ? 2 * F : F), "expert_parallel: w_in has ", H, " columns for F = ", F);
    TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, "expert_parallel: ", counts.size(), " counts for ", E,
                " experts");
    for (int64_t c : counts) TORCH_CHECK(c >= 0, "expert_parallel: negative count ", c);
    const int64_t total = offsets_of(counts).back();
    TORCH_CHECK(total == S, "expert_parallel: the counts sum to ", total, " rows, tok_S has ", S);
    parts = split_rows(counts, std::max<int64_t>(1, std::min(threads, S)));
    for (size_t p = 0; p < parts.size(); ++p)  // the pieces in row order
      for (auto& piece : parts[p]) {
        piece.part = static_cast<int64_t>(p);
        piece.at = rows;
        rows += padded(piece);
        most = std::max(most, padded(piece));
      }
  }

  int64_t size() const { return static_cast<int64_t>(parts.size()); }

  int64_t padded(const Piece& piece) const { return padded_rows(pad, piece.rows); }

  // Whether a product whose per-expert matrix is K x N runs on the kernel's own loops.
  bool own_product(int64_t K, int64_t N) const {
    return own && sparseroute::row_gemm_runs(N) && sparseroute::row_gemm_fits(K, N);
  }

  // The expert whose rows part p continues from an earlier part (its weight gradient is a partial
  // sum, added after the parallel region), or -1.
  int64_t continued(int64_t p) const {
    return parts[p].empty() || !parts[p].front().continues ? -1 : parts[p].front().expert;
  }
};

// s = act(h) for the non-gated activations.
void activation_out(int64_t act, Tensor& s, const Tensor& h) {
  switch (act) {
    case kGELU: at::gelu_out(s, h); break;
    case kSiLU: at::silu_out(s, h); break;
    default: at::clamp_min_out(s, h, 0); break;
  }
}

// dL/dh = act'(h) * g for the non-gated activations.
void activation_backward_out(int64_t act, Tensor& gh, const Tensor& g, const Tensor& h) {
  switch (act) {
    case kGELU: at::gelu_backward_out(gh, g, h); break;
    case kSiLU: at::silu_backward_out(gh, g, h); break;
    default: at::threshold_backward_out(gh, g, h, 0); break;
  }
}

// For a = s * w (non-gated): gw[r] = <ga[r], s[r]> when gw is not null, then ga[r] *= w[r]
// (dL/ds), in one pass.
template <typename scalar_t>
SPARSEROUTE_VECTOR_CLONES void scaled_rows_backward(int64_t n, int64_t F, scalar_t* ga, const scalar_t* s, const scalar_t* w, scalar_t* gw) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < n; ++r) {
    scalar_t* g = ga + r * F;
    const scalar_t* sr = s + r * F;
    const acc_t wr = static_cast<acc_t>(w[r]);
    acc_t dw = 0;
#pragma omp simd reduction(+ : dw)
    for (int64_t f = 0; f < F; ++f) {
      const acc_t gf = load_as<acc_t>(g, f);
      dw += gf * load_as<acc_t>(sr, f);
      store_as(g, f, gf * wr);
    }
    if (gw != nullptr) gw[r] = static_cast<scalar_t>(dw);
  }
}

// Work sharing between the parts' threads. Each thread claims the pieces of its own part from
// the front; a thread that has run out of its own takes the last unclaimed piece of the started
// part with the most left (work stealing: a neighbour slowed down by the machine no longer holds
// up the call), always leaving its owner one. Every piece writes rows and weight gradients of
// its own, so who runs it changes no result.
class Sharing {
 public:
  explicit Sharing(const std::vector<std::vector<Piece>>& parts) : parts_(parts.size()) {
    for (size_t p = 0; p < parts.size(); ++p) parts_[p].back = static_cast<int64_t>(parts[p].size());
  }

  void start(int64_t p) {
    std::lock_guard<std::mutex> lock(mutex_);
    parts_[p].started = true;
  }

  // The next piece of part p for its owner, or -1.
  int64_t own(int64_t p) {
    std::lock_guard<std::mutex> lock(mutex_);
    State& st = parts_[p];
    return st.front < st.back ? st.front++ : -1;
  }

  // {part, piece} to steal, or {-1, -1}: the last unclaimed piece of the started part with the
  // most unclaimed ones, when it has two or more.
  std::pair<int64_t, int64_t> steal() {
    if (!stealing_enabled().load()) return {-1, -1};
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t best = -1;
    for (size_t p = 0; p < parts_.size(); ++p) {
      const State& st = parts_[p];
      if (st.started && st.back - st.front >= 2 && (best < 0 || st.back - st.front > parts_[best].back - parts_[best].front))
        best = static_cast<int64_t>(p);
    }
    if (best < 0) return {-1, -1};
    steals().fetch_add(1);
    return {best, --parts_[best].back};
  }

  static std::atomic<bool>& stealing_enabled() {
    static std::atomic<bool> on{true};
    return on;
  }
  static std::atomic<int64_t>& steals() {  // pieces stolen since the module was loaded
    static std::atomic<int64_t> count{0};
    return count;
  }
  static std::atomic<int64_t>& owner_delay_us() {  // tests: part 0's owner waits before each piece
    static std::atomic<int64_t> us{0};
    return us;
  }
  static std::atomic<bool>& fail_stolen() {  // tests: a stolen piece raises
    static std::atomic<bool> on{false};
    return on;
  }

 private:
  struct State {
    int64_t front = 0, back = 0;  // pieces [front, back) are unclaimed
    bool started = false;
  };
  std::mutex mutex_;
  std::vector<State> parts_;
};

// Run the pieces of every part, one part per thread, with work sharing (see Sharing). Per
// thread, `scratch()` makes its buffers once; `compute(scratch, piece)` runs a piece. An
// exception in any thread leaves the region (at::parallel_for rethrows it). Grad mode is
// thread-local, so each worker dispatches below autograd itself (the caller is an autograd
// Function that does its own backward).
template <class MakeScratch, class Compute>
void run_parts(const std::vector<std::vector<Piece>>& parts, const MakeScratch& scratch, const Compute& compute) {
  const int64_t P = static_cast<int64_t>(parts.size());
  Sharing sharing(parts);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto buffers = scratch();
    for (int64_t p = begin; p < end; ++p) {
      sharing.start(p);
      for (int64_t i; (i = sharing.own(p)) >= 0;) {
        if (p == 0 && Sharing::owner_delay_us().load() > 0)
          std::this_thread::sleep_for(std::chrono::microseconds(Sharing::owner_delay_us().load()));
        compute(buffers, parts[p][i]);
      }
    }
    for (auto [q, i] = sharing.steal(); q >= 0; std::tie(q, i) = sharing.steal()) {
      TORCH_CHECK(!Sharing::fail_stolen().load(), "expert_parallel: a stolen piece failed (test)");
      compute(buffers, parts[q][i]);
    }
  });
}

// out[t] = the sum of the rows of token t, in row order: the rows of Y [plan rows, D], where
// sorted row s of a piece is row piece.at + (s - piece.start). Summed in the accumulation type,
// rounded once; a token without rows gets zeros. Each piece's rows are taken in token order (as
// the sort by expert leaves them; a piece that is not is sorted stably by token here, which
// keeps each token's rows in row order). Then the rows of a block of consecutive tokens are one
// run in each piece, and the sums read Y run by run, which the hardware prefetcher follows,
// rather than token by token, hopping between all the experts' rows (27% less time at T 8192,
// D 512, E 64, k 8). In parallel over the blocks; a block's sums build up in a per-thread
// buffer of about kCombineBytes, from -0.0, which adds exactly.
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

// The [T, D] sums of each token's rows of Y (see combine_runs).
Tensor combine(const Plan& plan, const Tensor& tok_S, const Tensor& Y, int64_t T) {
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
  Tensor out = workspace().take({T, D}, Y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Y.scalar_type(), "combine_runs", [&] {
    combine_runs<scalar_t>(offsets, keys, rows, has_rows, D, Y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

// Returns {out_TD, h_SH (pre-activations: [gate | up] for SwiGLU, H = 2F; else H = F), a_SF
// (weighted activations; empty for SwiGLU, whose backward recomputes them from h in the pass
// that computes dL/dh: the forward then writes them only to a per-thread scratch, and saves a
// third less), s_SF (act(h) for the non-gated activations; empty for SwiGLU)}. On
// oneDNN the saved activations have each piece's padding rows too (see kRowBlock), so more than
// S rows; only mlp_backward, with the same counts, threads and backend code, reads them.
std::vector<Tensor> mlp_forward(const Tensor& x_TD, const Tensor& w_S, const Tensor& w_in, const Tensor& w_out,
                                const Tensor& tok_S, std::vector<int64_t> counts, int64_t act, int64_t threads,
                                int64_t gemm) {
  TORCH_CHECK(gemm == 0 || gemm == 1, "expert_parallel: unknown GEMM backend code ", gemm);
  const int64_t D = x_TD.size(1), F = w_out.size(1);
  const bool onednn = on_onednn(gemm, x_TD, F);
  const Plan plan(counts, x_TD, w_in, w_out, tok_S, act, threads, onednn);
  // the forward's two products on the kernel's own loops where they can, x's rows read by token
  const int64_t H = w_in.size(2);
  const bool own_up = plan.own_product(D, H), own_down = plan.own_product(F, D);
  Tensor h = workspace().take({plan.rows, H}, x_TD.options());
  Tensor a = act == kSwiGLU ? x_TD.new_empty({0, F}) : workspace().take({plan.rows, F}, x_TD.options());
  Tensor s = act == kSwiGLU ? x_TD.new_empty({0, F}) : workspace().take({plan.rows, F}, x_TD.options());
  Tensor y = workspace().take({plan.rows, D}, x_TD.options());  // each row's output
  const int64_t* tok = tok_S.const_data_ptr<int64_t>();
  run_parts(
      plan.parts,
      [&] {  // per thread: x rows (unless gathered inside the product), the weighted activations (SwiGLU)
        return std::array<Tensor, 2>{workspace().take({own_up ? 0 : plan.most, D}, x_TD.options()),
                                     workspace().take({act == kSwiGLU ? plan.most : 0, F}, x_TD.options())};
      },
      [&](std::array<Tensor, 2>& bufs, const Piece& piece) {
        const int64_t e = piece.expert, n = piece.rows, np = plan.padded(piece);
        Tensor h_p = h.narrow(0, piece.at, np);
        Tensor a_p = act == kSwiGLU ? bufs[1].narrow(0, 0, np) : a.narrow(0, piece.at, np), a_e = a_p.narrow(0, 0, n);
        if (own_up) {
          sparseroute::row_gemm(n, D, H, x_TD.const_data_ptr<float>(), D, tok + piece.start,
                                w_in.const_data_ptr<float>() + e * D * H, H, h_p.mutable_data_ptr<float>(), H);
          zero_rows_from(h_p, n);  // as the padded product leaves them
        } else {
          Tensor x_p = bufs[0].narrow(0, 0, np);
          gather_rows_out(x_p.narrow(0, 0, n), x_TD, tok + piece.start);
          zero_rows_from(x_p, n);
          product(onednn, h_p, x_p, w_in.select(0, e));
        }
        if (act == kSwiGLU) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "weighted_swiglu", [&] {
            weighted_swiglu<scalar_t>(n, F, h_p.const_data_ptr<scalar_t>(),
                                      w_S.const_data_ptr<scalar_t>() + piece.start, a_e.mutable_data_ptr<scalar_t>());
          });
        } else {
          Tensor s_e = s.narrow(0, piece.at, n);
          activation_out(act, s_e, h_p.narrow(0, 0, n));
          at::mul_out(a_e, s_e, w_S.narrow(0, piece.start, n).unsqueeze(1));
        }
        zero_rows_from(a_p, n);  // (the saved a's padding rows enter the backward's padded products)
        if (own_down) {  // the padding rows' outputs are never read
          sparseroute::row_gemm(n, F, D, a_p.const_data_ptr<float>(), F, nullptr, w_out.const_data_ptr<float>() + e * F * D,
                                D, y.mutable_data_ptr<float>() + piece.at * D, D);
        } else {
          product(onednn, y.narrow(0, piece.at, np), a_p, w_out.select(0, e));
        }
      });
  return {combine(plan, tok_S, y, x_TD.size(0)), h, a, s};
}

// Gradients {x, w_S, w_in, w_out}; an undefined tensor where ``needs`` is false.
std::vector<Tensor> mlp_backward(const Tensor& g_TD, const Tensor& x_TD, const Tensor& w_S, const Tensor& w_in,
                                 const Tensor& w_out, const Tensor& tok_S, std::vector<int64_t> counts,
                                 const Tensor& h, const Tensor& a, const Tensor& s, int64_t act,
                                 std::vector<bool> needs, int64_t threads, int64_t gemm) {
  TORCH_CHECK(gemm == 0 || gemm == 1, "expert_parallel: unknown GEMM backend code ", gemm);
  const int64_t D = x_TD.size(1), F = w_out.size(1), E = w_in.size(0);
  const bool onednn = on_onednn(gemm, x_TD, F);
  const Plan plan(counts, x_TD, w_in, w_out, tok_S, act, threads, onednn);
  TORCH_CHECK(g_TD.sizes() == x_TD.sizes() && g_TD.scalar_type() == x_TD.scalar_type() && g_TD.is_contiguous(),
              "expert_parallel: the output gradient must be a contiguous tensor of x's shape and dtype");
  TORCH_CHECK(h.size(0) == plan.rows && (act == kSwiGLU || (a.size(0) == plan.rows && s.size(0) == plan.rows)),
              "expert_parallel: the saved activations have ", h.size(0), " rows where this call's plan has ",
              plan.rows, " (the backward must use the forward's backend code)");
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
  // on oneDNN's backend in float32, dL/da = g w_out^T and dL/dx = dL/dh w_in^T run on the
  // kernel's own row products where they can (row_gemm.h), against the expert's weights
  // transposed into a per-thread buffer that stays in cache
  const int64_t H = w_in.size(2);
  const bool own_da = need_hidden && plan.own_product(D, F), own_dx = need_x && plan.own_product(H, D);
  // and the weight gradients x^T dL/dh and a^T g, reading the rows of x and g by token
  const bool own_din = need_in && plan.own_product(D, H), own_dout = need_out && plan.own_product(F, D);
  // the rows of g gathered only for the products that do not read them by token
  const bool gather_g = (need_hidden && !own_da) || (need_out && !own_dout);
  const int64_t* tok = tok_S.const_data_ptr<int64_t>();
  run_parts(
      plan.parts,
      [&] {  // per thread: g rows, x rows, dL/da, dL/dh, an expert's dL/dw_out transposed, the
             // weighted activations (SwiGLU), an expert's w_out and w_in transposed
        return std::array<Tensor, 8>{workspace().take({gather_g ? plan.most : 0, D}, x_TD.options()),
                                     workspace().take({need_in && !own_din ? plan.most : 0, D}, x_TD.options()),
                                     workspace().take({plan.most, F}, h.options()),
                                     workspace().take({plan.most, H}, h.options()),
                                     workspace().take({need_out && !own_dout ? D : 0, F}, w_out.options()),
                                     workspace().take({act == kSwiGLU && need_out ? plan.most : 0, F}, h.options()),
                                     workspace().take({own_da ? D : 0, F}, w_out.options()),
                                     workspace().take({own_dx ? H : 0, D}, w_in.options())};
      },
      [&](std::array<Tensor, 8>& bufs, const Piece& piece) {
        const int64_t e = piece.expert, n = piece.rows, start = piece.start, np = plan.padded(piece);
        const int64_t* t = tok + start;
        Tensor g_p = bufs[0].narrow(0, 0, gather_g ? np : 0);
        if (gather_g) {
          gather_rows_out(g_p.narrow(0, 0, n), g_TD, t);
          zero_rows_from(g_p, n);
        }
        // the piece's weighted activations: saved, or for SwiGLU recomputed from h (with dL/dh
        // when that is needed, in the same pass)
        const bool recompute = act == kSwiGLU && need_out;
        Tensor a_p = act == kSwiGLU ? bufs[5].narrow(0, 0, recompute ? np : 0) : a.narrow(0, piece.at, np);
        Tensor ga_p = bufs[2].narrow(0, 0, np), ga = ga_p.narrow(0, 0, n);  // dL/d(weighted activation)
        Tensor gh_p = bufs[3].narrow(0, 0, np), gh = gh_p.narrow(0, 0, n);
        if (need_hidden) {
          if (own_da) {  // only the piece's rows of dL/da are read
            float* wt = bufs[6].mutable_data_ptr<float>();
            sparseroute::transpose_rows(F, D, w_out.const_data_ptr<float>() + e * F * D, D, wt, F);
            sparseroute::row_gemm(n, D, F, g_TD.const_data_ptr<float>(), D, t, wt, F, ga_p.mutable_data_ptr<float>(), F);
          } else {
            product(onednn, ga_p, g_p, w_out.select(0, e).t());
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
          sparseroute::row_gemm_tn(n, F, D, a_p.const_data_ptr<float>(), F, nullptr, g_TD.const_data_ptr<float>(), D, t,
                                   g_out_e.mutable_data_ptr<float>(), D);
        } else if (need_out) {  // (g^T a)^T: the padding rows of a and g are zero
          if (recompute) zero_rows_from(a_p, n);
          // as a^T g, with F rows (128) against D (512) columns, this product runs ~20% slower
          product(onednn, bufs[4], g_p.t(), a_p);
          transpose_out(piece.continues ? rest_out[piece.part] : g_out.select(0, e), bufs[4]);
        }
        if (!need_hidden) return;
        if (act != kSwiGLU) activation_backward_out(act, gh, ga, h.narrow(0, piece.at, n));
        zero_rows_from(gh_p, n);
        if (own_din) {  // x^T dL/dh over the piece's rows, x's read by token
          Tensor g_in_e = piece.continues ? rest_in[piece.part] : g_in.select(0, e);
          sparseroute::row_gemm_tn(n, D, H, x_TD.const_data_ptr<float>(), D, t, gh_p.const_data_ptr<float>(), H, nullptr,
                                   g_in_e.mutable_data_ptr<float>(), H);
        } else if (need_in) {  // x^T dL/dh: the padding rows of dL/dh (and of x) are zero
          Tensor g_in_e = piece.continues ? rest_in[piece.part] : g_in.select(0, e);
          Tensor x_p = bufs[1].narrow(0, 0, np);
          gather_rows_out(x_p.narrow(0, 0, n), x_TD, t);
          zero_rows_from(x_p, n);
          product(onednn, g_in_e, x_p.t(), gh_p);
        }
        if (own_dx) {  // the padding rows' dL/dx are never read
          float* wt = bufs[7].mutable_data_ptr<float>();
          sparseroute::transpose_rows(D, H, w_in.const_data_ptr<float>() + e * D * H, H, wt, D);
          sparseroute::row_gemm(n, H, D, gh_p.const_data_ptr<float>(), H, nullptr, wt, D,
                                gx_rows.mutable_data_ptr<float>() + piece.at * D, D);
        } else if (need_x) {
          product(onednn, gx_rows.narrow(0, piece.at, np), gh_p, w_in.select(0, e).t());
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

// The routed (token, slot) pairs of indices_TK [T, K] (-1 = unused) stably sorted by expert, by
// counting: {order_S (flat positions t*K + k), tok_S (their tokens), counts (rows per expert)}.
// The same as sparseroute.moe.dispatch.sort_by_expert, in one pass instead of an argsort.
std::tuple<Tensor, Tensor, std::vector<int64_t>> sort_by_expert(const Tensor& indices_TK, int64_t E) {
  TORCH_CHECK(indices_TK.dim() == 2 && indices_TK.scalar_type() == at::kLong && indices_TK.device().is_cpu(),
              "sort_by_expert: indices must be a [T, K] int64 CPU tensor");
  const Tensor idx_t = indices_TK.contiguous();
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
  Tensor order = at::empty({S}, idx_t.options()), tok = at::empty({S}, idx_t.options());
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

// out = a @ b on oneDNN's matmul, for sparseroute.kernels.gemm: float32 CPU matrices, `out` dense.
void onednn_mm(const Tensor& a, const Tensor& b, Tensor& out) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "onednn_mm: shapes ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes(), " do not fit");
  for (const Tensor* t : {&a, &b, static_cast<const Tensor*>(&out)})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "onednn_mm: float32 CPU tensors only");
  TORCH_CHECK(out.is_contiguous(), "onednn_mm: the output must be contiguous");
  TORCH_CHECK(onednn_matmul_usable(), "onednn_mm: oneDNN's float32 matmul does not run on this CPU");
  at::native::mkldnn_matmul(a, b, out, 0.f, 1.f);
}

// Tests: every index in [0, rows).
void check_rows(const Tensor& idx, int64_t rows, const char* what) {
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r) TORCH_CHECK(p[r] >= 0 && p[r] < rows, what, ": index out of range");
}

// Tests: C = A[idx] @ B (idx empty: A @ B) by the kernel's own row products; A, B contiguous float32, B's
// rows taken `ldb` apart from a wider matrix when ldb > its columns.
Tensor row_gemm_test(const Tensor& A, const Tensor& idx, const Tensor& B, int64_t N) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat &&
                  A.is_contiguous() && B.is_contiguous() && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "_row_gemm: contiguous float32 A and B, int64 idx");
  TORCH_CHECK(A.size(1) == B.size(0) && N <= B.size(1), "_row_gemm: shapes do not fit");
  TORCH_CHECK(sparseroute::row_gemm_runs(N), "_row_gemm: does not run here for ", N, " columns");
  const bool gather = idx.numel() > 0;
  const int64_t n = gather ? idx.numel() : A.size(0);
  check_rows(idx, A.size(0), "_row_gemm");
  Tensor C = at::empty({n, N}, A.options());
  sparseroute::row_gemm(n, A.size(1), N, A.const_data_ptr<float>(), A.size(1), gather ? idx.const_data_ptr<int64_t>() : nullptr,
                        B.const_data_ptr<float>(), B.size(1), C.mutable_data_ptr<float>(), N);
  return C;
}

// Tests: A[ia]^T B[ib] (an empty index: the rows in order) by the kernel's own sums over rows.
Tensor row_gemm_tn_test(const Tensor& A, const Tensor& ia, const Tensor& B, const Tensor& ib) {
  for (const Tensor* t : {&A, &B})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous(), "_row_gemm_tn: contiguous float32 A, B");
  for (const Tensor* t : {&ia, &ib})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "_row_gemm_tn: int64 indices");
  const int64_t n = ia.numel() > 0 ? ia.numel() : A.size(0);
  TORCH_CHECK((ib.numel() > 0 ? ib.numel() : B.size(0)) == n, "_row_gemm_tn: as many rows of B as of A");
  TORCH_CHECK(sparseroute::row_gemm_runs(B.size(1)), "_row_gemm_tn: does not run here for ", B.size(1), " columns");
  check_rows(ia, A.size(0), "_row_gemm_tn");
  check_rows(ib, B.size(0), "_row_gemm_tn");
  Tensor C = at::empty({A.size(1), B.size(1)}, A.options());
  sparseroute::row_gemm_tn(n, A.size(1), B.size(1), A.const_data_ptr<float>(), A.size(1),
                           ia.numel() > 0 ? ia.const_data_ptr<int64_t>() : nullptr, B.const_data_ptr<float>(), B.size(1),
                           ib.numel() > 0 ? ib.const_data_ptr<int64_t>() : nullptr, C.mutable_data_ptr<float>(), B.size(1));
  return C;
}

// Tests: x^T by the kernel's own transpose (float32, where its row products run).
Tensor transpose_test(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "_transpose: a contiguous float32 matrix");
  TORCH_CHECK(sparseroute::row_gemm_runs(16), "_transpose: does not run here");
  Tensor out = at::empty({x.size(1), x.size(0)}, x.options());
  sparseroute::transpose_rows(x.size(0), x.size(1), x.const_data_ptr<float>(), x.size(1), out.mutable_data_ptr<float>(), x.size(0));
  return out;
}

// Tests: x (float32) rounded to bfloat16 by the kernels' conversion, and that widened back.
std::tuple<Tensor, Tensor> bf16_round_trip(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "_bf16_round_trip: a contiguous float32 tensor");
  Tensor b = at::empty(x.sizes(), x.options().dtype(at::kBFloat16)), w = at::empty_like(x);
  const float* src = x.const_data_ptr<float>();
  auto* mid = b.mutable_data_ptr<c10::BFloat16>();
  float* back = w.mutable_data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) store_as(mid, i, src[i]);
  for (int64_t i = 0; i < x.numel(); ++i) back[i] = load_as<float>(mid, i);
  return {b, w};
}

void register_softmax_topk(pybind11::module& m);  // softmax_topk.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_softmax_topk(m);
  m.def("set_workspace_limits", [](int64_t slots, int64_t max_bytes) { workspace().set_limits(slots, max_bytes); },
        "keep at most `slots` free buffers and `max_bytes` free bytes (slots = 0: none)");
  m.def("workspace_state", []() { return workspace().state(); }, "{slots, max_bytes, free buffers kept, their bytes}");
  m.def("_set_stealing", [](bool on) { Sharing::stealing_enabled().store(on); },
        "tests: let threads take pieces from slower threads' parts (default on)");
  m.def("_steals", []() { return Sharing::steals().load(); }, "tests: pieces stolen since load");
  m.def("_set_fail_stolen", [](bool on) { Sharing::fail_stolen().store(on); }, "tests: a stolen piece raises");
  m.def("_set_owner_delay_us", [](int64_t us) { Sharing::owner_delay_us().store(us); },
        "tests: part 0's thread waits this long before each of its pieces");
  m.def("_row_gemm", &row_gemm_test, "tests: A[idx] @ B[:, :N] by the kernel's own row products");
  m.def("_row_gemm_runs", [](int64_t N) { return sparseroute::row_gemm_runs(N); },
        "whether the kernel's own row products run here for N columns");
  m.def("_row_gemm_fits", [](int64_t K, int64_t N) { return sparseroute::row_gemm_fits(K, N); },
        "whether the kernel takes a product with a K x N per-expert matrix to its own row products");
  m.def("_row_gemm_tn", &row_gemm_tn_test, "tests: A[ia]^T B[ib] by the kernel's own sums over rows");
  m.def("_transpose", &transpose_test, "tests: x^T by the kernel's own transpose");
  m.def("_bf16_round_trip", &bf16_round_trip, "tests: float32 -> bfloat16 -> float32 by the kernels' conversions");
  m.def("onednn_usable", &onednn_matmul_usable, "whether oneDNN's float32 matmul runs on this CPU");
  m.def("onednn_usable_for", [](const Tensor& like) { return onednn_matmul_usable_for(like.scalar_type()); },
        "whether oneDNN's matmul runs on this CPU for tensors like this one (float32, bfloat16)");
  m.def("onednn_mm", &onednn_mm, "out = a @ b on oneDNN's matmul (float32 CPU matrices, each dense or transposed)");
  m.def("sort_by_expert", &sort_by_expert, "routed pairs stably sorted by expert (counting sort)");
  m.def("mlp_forward", &mlp_forward, "expert-parallel expert MLP, forward");
  m.def("mlp_backward", &mlp_backward, "expert-parallel expert MLP, backward");
}
