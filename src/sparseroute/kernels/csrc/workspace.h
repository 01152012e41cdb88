// The pool of the expert kernel's buffers (saved activations, outputs, weight gradients,
// per-thread scratch), reused across calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <mutex>
#include <tuple>
#include <vector>

namespace sparseroute {

// Tensors this large come straight from mmap and go back to the OS when freed, so every call
// would otherwise fault in fresh zeroed pages for them. The buffers' storages are allocated by
// the pool's allocator, whose deleter hands a block back to the pool when the storage dies: so a
// block is reused only once no tensor, view, saved variable or .grad uses it, and while a
// storage lives it has no other owner (autograd may add into it in place, and AccumulateGrad
// may take it as a .grad without a copy). The pool keeps at most `slots` free blocks and
// `max_bytes` free bytes, dropping the least recently freed to make room; slots = 0 keeps none.
class Workspace {
 public:
  static Workspace& instance();

  // A tensor of `sizes` on a pooled block (a fresh empty tensor when it has no elements).
  at::Tensor take(at::IntArrayRef sizes, const at::TensorOptions& options);

  // Keep at most `slots` free blocks and `max_bytes` free bytes from now on (slots = 0: none),
  // freeing the oldest over the limits. Blocks in use come back under the new limits.
  void set_limits(int64_t slots, int64_t max_bytes);

  // {slots, max_bytes, free blocks kept, their bytes}
  std::tuple<int64_t, int64_t, int64_t, int64_t> state();

 private:
  struct Block {
    void* ptr;
    int64_t bytes;
  };

  class Allocator final : public c10::Allocator {
   public:
    explicit Allocator(Workspace* pool) : pool_(pool) {}
    c10::DataPtr allocate(size_t n) override;
    void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

   private:
    Workspace* pool_;
  };

  Block get(int64_t need);
  static void release(void* ctx);
  void put(const Block& block);
  void drop_oldest(int64_t incoming);

  std::mutex mutex_;
  std::vector<Block> free_;  // least recently freed first
  int64_t free_bytes_ = 0;
  int64_t slots_limit_ = 64;
  int64_t bytes_limit_ = int64_t{1} << 30;
  Allocator allocator_{this};
};

inline Workspace& workspace() { return Workspace::instance(); }

}  // namespace sparseroute
