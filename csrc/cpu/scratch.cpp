// The per-thread cache behind cpu::buffer (scratch.h). Blocks under kLarge come from malloc
// directly (its bins serve them without system calls); larger ones are kept after use, up to
// kSlots blocks and kLimit bytes per thread, and handed out again to a request they fit
// without wasting more than half of the block. Each block carries its size in a header, so a
// block may be freed on another thread than the one that allocated it. Separate from the
// outputs' host cache (core/memory.cpp): outputs leave the library and come back from any
// thread, in exact sizes, under a lock; temporaries live within one call, so each thread
// keeps its own, without one.
#include "cpu/scratch.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "cpu/threads.h"

namespace batchnorm::cpu {
namespace {

constexpr std::size_t kHeader = 16;            // keeps malloc's 16-byte alignment
constexpr std::size_t kLarge = 64 * 1024;      // below this, malloc's bins do well
constexpr std::size_t kLimit = 32u << 20;      // bytes a thread's cache may hold
constexpr int kSlots = 16;

struct Cache {
  void* blocks[kSlots] = {};
  std::size_t sizes[kSlots] = {};
  int count = 0;
  std::size_t held = 0;
  std::size_t release() {
    const std::size_t released = held;
    for (int i = 0; i < count; ++i) std::free(blocks[i]);
    count = 0;
    held = 0;
    return released;
  }
  ~Cache() { release(); }
};

thread_local Cache cache;

std::size_t& size_of(void* block) { return *static_cast<std::size_t*>(block); }

}  // namespace

void* scratch_allocate(std::size_t bytes) {
  if (bytes > SIZE_MAX - 2 * kHeader) throw std::bad_alloc();
  if (bytes >= kLarge) {
    int best = -1;
    for (int i = 0; i < cache.count; ++i)
      if (cache.sizes[i] >= bytes && cache.sizes[i] / 2 <= bytes && (best < 0 || cache.sizes[i] < cache.sizes[best]))
        best = i;
    if (best >= 0) {
      void* block = cache.blocks[best];
      cache.held -= cache.sizes[best];
      --cache.count;
      cache.blocks[best] = cache.blocks[cache.count];
      cache.sizes[best] = cache.sizes[cache.count];
      return static_cast<char*>(block) + kHeader;
    }
  }
  const std::size_t payload = (bytes + kHeader - 1) / kHeader * kHeader;
  void* block = std::malloc(kHeader + payload);
  if (block == nullptr) throw std::bad_alloc();
  size_of(block) = payload;
  return static_cast<char*>(block) + kHeader;
}

void scratch_free(void* p) noexcept {
  if (p == nullptr) return;
  void* block = static_cast<char*>(p) - kHeader;
  const std::size_t payload = size_of(block);
  if (payload >= kLarge && cache.count < kSlots && cache.held + payload <= kLimit) {
    cache.blocks[cache.count] = block;
    cache.sizes[cache.count] = payload;
    ++cache.count;
    cache.held += payload;
    return;
  }
  std::free(block);
}

std::size_t scratch_release() {
  std::atomic<std::size_t> released{cache.release()};
#if defined(BN_WITH_OPENMP)
  if (!omp_in_parallel()) {
    // Every thread of the pool this thread's regions have used (libgomp keeps one pool per
    // calling thread: other threads' pools are theirs to release).
#pragma omp parallel num_threads(std::max(largest_team(), thread_count()))
    released += cache.release();
  }
#endif
  return released.load();
}

}  // namespace batchnorm::cpu
