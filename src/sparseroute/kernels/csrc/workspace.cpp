// The buffer pool (workspace.h).

#include "workspace.h"

#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <memory>
#include <utility>

namespace sparseroute {

namespace {

// Memory for a pool block. Blocks of 2 MiB and more are aligned to 2 MiB and marked for
// transparent huge pages (where the OS grants them on request, as with THP "madvise"): the
// gathers and the combine read rows scattered over these buffers, and huge pages spare them
// TLB misses. The pool keeps its blocks, so their pages are faulted in once, not at every
// call. c10::free_cpu frees either kind.
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

}  // namespace

Workspace& Workspace::instance() {
  static Workspace* pool = new Workspace();  // never destroyed: blocks may come back at exit
  return *pool;
}

at::Tensor Workspace::take(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t need = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (need == 0) return at::empty(sizes, options);
  // resizable: a resize allocates a new block here and hands the old one back
  c10::Storage storage(c10::Storage::use_byte_size_t(), need, &allocator_, /*resizable=*/true);
  return at::empty({0}, options).set_(std::move(storage), 0, sizes);
}

void Workspace::set_limits(int64_t slots, int64_t max_bytes) {
  TORCH_CHECK(slots >= 0 && max_bytes >= 0, "expert_parallel: workspace limits must be >= 0, got slots = ", slots,
              ", max_bytes = ", max_bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  slots_limit_ = slots;
  bytes_limit_ = max_bytes;
  drop_oldest(0);
}

std::tuple<int64_t, int64_t, int64_t, int64_t> Workspace::state() {
  std::lock_guard<std::mutex> lock(mutex_);
  return {slots_limit_, bytes_limit_, static_cast<int64_t>(free_.size()), free_bytes_};
}

c10::DataPtr Workspace::Allocator::allocate(size_t n) {
  Block* block = new Block(pool_->get(static_cast<int64_t>(n)));
  return {block->ptr, block, &Workspace::release, c10::Device(c10::DeviceType::CPU)};
}

// The smallest free block of at least `need` bytes and at most 5/4 of it, else a new one.
Workspace::Block Workspace::get(int64_t need) {
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
void Workspace::release(void* ctx) {
  std::unique_ptr<Block> block(static_cast<Block*>(ctx));
  instance().put(*block);
}

void Workspace::put(const Block& block) {
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
void Workspace::drop_oldest(int64_t incoming) {
  const int64_t room = incoming > 0 ? 1 : 0;
  while (!free_.empty() &&
         (static_cast<int64_t>(free_.size()) + room > slots_limit_ || free_bytes_ + incoming > bytes_limit_)) {
    c10::free_cpu(free_.front().ptr);
    free_bytes_ -= free_.front().bytes;
    free_.erase(free_.begin());
  }
}

}  // namespace sparseroute
