// How the expert kernel splits its work: the routed rows, sorted by expert, are cut into as many
// equal parts as there are intra-op threads; each thread runs its part expert by expert, a piece
// at a time, inside one at::parallel_for region; a thread that finishes early takes unstarted
// pieces of another's part; after the region, each token's output is the sum of its rows.
//
// Legend: T tokens, D model dim, E experts, F expert hidden, H the up projection's width (2F for
// SwiGLU, else F), S routed rows sorted by expert, P parts. The rows of expert e are
// [offset[e], offset[e] + counts[e]) of the S rows; tok_S[s] is the token of row s and w_S[s]
// its routing weight. A piece is the rows of one expert that fall into one part; an expert cut
// by a part boundary has a piece in each of those parts.
//
// Determinism: the pieces are a fixed function of the counts and of P; a token's rows are summed
// in row order; the weight gradient of a cut expert is its first piece's, plus the later pieces'
// in part order. A result thus depends only on the inputs, P and the backends, not on which
// thread ran which piece.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "codes.h"

#ifndef SPARSEROUTE_TESTING
#define SPARSEROUTE_TESTING 0
#endif

namespace sparseroute {

// The test module (built with SPARSEROUTE_TESTING=1) has switches that steer the work sharing;
// the shipped module compiles them out.
constexpr bool kTesting = SPARSEROUTE_TESTING != 0;

struct Piece {
  int64_t expert, start, rows;
  bool continues;  // not the expert's first rows: its weight gradient is a partial sum to add
  int64_t at = 0;    // its first row in the saved activations (start, or with padding rows before it)
  int64_t part = 0;  // the part it is in
};

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts);

// The pieces of each of P parts of rows [p*S/P, (p+1)*S/P), in row order.
std::vector<std::vector<Piece>> split_rows(const std::vector<int64_t>& counts, int64_t P);

// oneDNN builds a product's kernel for its exact shape and keeps the last 1,024 in a cache. The
// expert loads change at every training step, and with them the rows of every expert's products:
// built afresh at every step, they would cost more than they compute. So where any product runs
// on oneDNN, the kernel rounds the rows of each piece up to a multiple of kRowBlock, with zero
// rows below, which bounds the shapes to a few per product: the saved activations h (a and s)
// hold each piece's rows padded so (Piece::at), the padding rows' outputs are dropped, and they
// add nothing to the weight gradients (sums over the rows). The kernel's own loops and ATen run
// on the padded layout too (they read or write only a piece's real rows, or zero rows).
constexpr int64_t kRowBlock = 32;

inline int64_t padded_rows(bool pad, int64_t n) { return pad ? (n + kRowBlock - 1) / kRowBlock * kRowBlock : n; }

// The checked inputs, their split over the threads and where each product runs: the same in the
// forward and the backward. `backends` has one backend code per product (codes.h, in product
// order), as the caller chose; the plan checks that each can run (else a TORCH_CHECK names the
// product and why) and decides nothing itself. With `pad` (some product on oneDNN) each piece's
// rows are rounded up to a multiple of kRowBlock in the products and in the saved activations.
struct Plan {
  std::vector<std::vector<Piece>> parts;
  std::array<Backend, kNumProducts> backend{};
  bool pad = false;
  int64_t most = 0;  // rows of the largest piece, padded: the size of the per-thread buffers
  int64_t rows = 0;  // rows of the saved activations: S, plus the padding rows

  Plan(const std::vector<int64_t>& counts, const at::Tensor& x_TD, const at::Tensor& w_S, const at::Tensor& w_in,
       const at::Tensor& w_out, const at::Tensor& tok_S, int64_t act, int64_t threads,
       const std::vector<int64_t>& backends);

  int64_t size() const { return static_cast<int64_t>(parts.size()); }

  int64_t padded(const Piece& piece) const { return padded_rows(pad, piece.rows); }

  Backend on(Product p) const { return backend[p]; }

  // The expert whose rows part p continues from an earlier part (its weight gradient is a partial
  // sum, added after the parallel region), or -1.
  int64_t continued(int64_t p) const {
    return parts[p].empty() || !parts[p].front().continues ? -1 : parts[p].front().expert;
  }
};

// The test module's switches of the work sharing (see kTesting); one set per module.
struct SharingSwitches {
  std::atomic<bool> stealing{true};          // threads may take pieces of other parts
  std::atomic<int64_t> steals{0};            // pieces stolen since the module was loaded
  std::atomic<int64_t> owner_delay_us{0};    // part 0's owner waits up to this long before each
                                             // piece, until a piece of the call has been stolen
  std::atomic<bool> fail_stolen{false};      // a stolen piece raises
};
SharingSwitches& sharing_switches();

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
    if (kTesting && !sharing_switches().stealing.load()) return {-1, -1};
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t best = -1;
    for (size_t p = 0; p < parts_.size(); ++p) {
      const State& st = parts_[p];
      if (st.started && st.back - st.front >= 2 && (best < 0 || st.back - st.front > parts_[best].back - parts_[best].front))
        best = static_cast<int64_t>(p);
    }
    if (best < 0) return {-1, -1};
    if (kTesting) sharing_switches().steals.fetch_add(1);
    return {best, --parts_[best].back};
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
  const int64_t steals_before = kTesting ? sharing_switches().steals.load() : 0;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto buffers = scratch();
    for (int64_t p = begin; p < end; ++p) {
      sharing.start(p);
      for (int64_t i; (i = sharing.own(p)) >= 0;) {
        if constexpr (kTesting) {
          // hold part 0's owner back until another thread has stolen (bounded): on a loaded
          // machine a fixed pause may end before the other thread is even scheduled
          const int64_t us = sharing_switches().owner_delay_us.load();
          const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
          while (p == 0 && sharing_switches().steals.load() == steals_before && std::chrono::steady_clock::now() < until)
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        compute(buffers, parts[p][i]);
      }
    }
    // tests: while part 0's owner is held back and nothing has been stolen yet, a thread with no
    // work keeps looking (bounded) instead of leaving before part 0 has even started
    const auto give_up = std::chrono::steady_clock::now() +
                         std::chrono::microseconds(kTesting ? sharing_switches().owner_delay_us.load() : 0);
    for (;;) {
      auto [q, i] = sharing.steal();
      if (q < 0) {
        if constexpr (kTesting) {
          if (sharing_switches().steals.load() == steals_before && std::chrono::steady_clock::now() < give_up) {
            std::this_thread::sleep_for(std::chrono::microseconds(50));
            continue;
          }
        }
        break;
      }
      if constexpr (kTesting) TORCH_CHECK(!sharing_switches().fail_stolen.load(), "expert_parallel: a stolen piece failed (test)");
      compute(buffers, parts[q][i]);
    }
  });
}

// The [T, D] sums of each token's rows of Y [plan rows, D]: out[t] = the sum of the rows of token
// t, in row order (see schedule.cpp).
at::Tensor combine(const Plan& plan, const at::Tensor& tok_S, const at::Tensor& Y, int64_t T);

// The routed (token, slot) pairs of indices_TK [T, K] (-1 = unused) stably sorted by expert, by
// counting: {order_S (flat positions t*K + k), tok_S (their tokens), counts (rows per expert)}:
// the layout the plan takes. The same as sparseroute.moe.dispatch.sort_by_expert, in one pass
// instead of an argsort.
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> sort_by_expert(const at::Tensor& indices_TK, int64_t E);

}  // namespace sparseroute
