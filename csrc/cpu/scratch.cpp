// The per-thread cache behind cpu::buffer (scratch.h). Blocks under kLarge come from malloc
// directly (its bins serve them without system calls); larger ones are kept after use, up to
// kSlots blocks and kLimit bytes per thread (the smallest given back to make room for a larger
// one), and handed out again to a request they fit without wasting more than half of the
// block. Each block carries its malloc'd start and its size before the payload, so a block may
// be freed on another thread than the one that allocated it. Separate from the outputs' host
// cache (core/memory.cpp): outputs leave the library and come back from any thread, in exact
// sizes, under a lock; temporaries live within one call, so each thread keeps its own, without
// one.
#include "cpu/scratch.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "cpu/threads.h"

namespace batchnorm::cpu {
namespace {

// Payloads on 64-byte boundaries: a vector of a per-channel array (the channels-last maps'
// coefficients, the sums' arrays) then never straddles two cache lines, as one at malloc's
// 16-byte alignment did three times in four. malloc'd with room to align, the block's start
// and the payload's size in the 16 bytes before the payload (aligned_alloc instead was slower
// for the small blocks: 32x24x32x32 NHWC training 1.07x the time).
constexpr std::size_t kAlign = 64;
constexpr std::size_t kHeader = 16;
// Below this, malloc's bins do well. Not much more: a call's blocks of 4-64 KB (a few
// per-channel arrays at 1024-8192 channels) freed to malloc together passed glibc's trim
// threshold (128 KB, until the process frees an mmapped block larger than that), so every
// call gave the heap top back to the OS and faulted it in again: AMD EPYC Zen 4, a C host
// (tools/ab_lib), 1 thread, float32 16x2048 training 82 us -> 25 us with the threshold out of
// reach (GLIBC_TUNABLES); with this cache from 4 KB, training 67-71 -> 18-19 us, backward 64-72
// -> 18-19 us. A Python process has usually freed a large
// array by then (NumPy's and torch's come from mmap), which raises the threshold.
constexpr std::size_t kLarge = 4 * 1024;
constexpr std::size_t kLimit = 32u << 20;  // bytes a thread's cache may hold
constexpr int kSlots = 32;

// The block a payload lives in, and the payload's size.
void*& block_of(void* p) { return static_cast<void**>(p)[-2]; }
std::size_t& size_of(void* p) { return static_cast<std::size_t*>(p)[-1]; }

// Cached payloads (see block_of) and their sizes.
struct Cache {
  void* blocks[kSlots] = {};
  std::size_t sizes[kSlots] = {};
  int count = 0;
  std::size_t held = 0;
  std::size_t release() {
    const std::size_t released = held;
    for (int i = 0; i < count; ++i) std::free(block_of(blocks[i]));
    count = 0;
    held = 0;
    return released;
  }
  ~Cache() { release(); }
};

thread_local Cache cache;

}  // namespace

void* scratch_allocate(std::size_t bytes) {
  if (bytes > SIZE_MAX - 2 * (kHeader + kAlign)) throw std::bad_alloc();
  if (bytes >= kLarge) {
    int best = -1;
    for (int i = 0; i < cache.count; ++i)
      if (cache.sizes[i] >= bytes && cache.sizes[i] / 2 <= bytes && (best < 0 || cache.sizes[i] < cache.sizes[best]))
        best = i;
    if (best >= 0) {
      void* p = cache.blocks[best];
      cache.held -= cache.sizes[best];
      --cache.count;
      cache.blocks[best] = cache.blocks[cache.count];
      cache.sizes[best] = cache.sizes[cache.count];
      return p;
    }
  }
  const std::size_t payload = (bytes + kAlign - 1) / kAlign * kAlign;
  void* block = std::malloc(kHeader + kAlign + payload);
  if (block == nullptr) throw std::bad_alloc();
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(block) + kHeader;
  void* p = reinterpret_cast<void*>((at + kAlign - 1) / kAlign * kAlign);
  block_of(p) = block;
  size_of(p) = payload;
  return p;
}

void scratch_free(void* p) noexcept {
  if (p == nullptr) return;
  const std::size_t payload = size_of(p);
  if (payload >= kLarge && payload <= kLimit) {
    // Room made by giving back the smallest cached blocks, as long as they are smaller than
    // this one: a cache full of another shape's blocks would otherwise send every block of
    // this one to malloc, and a large block given back for a small one would be faulted in
    // again by the next call that needs it.
    while (cache.count == kSlots || cache.held + payload > kLimit) {
      int smallest = 0;
      for (int i = 1; i < cache.count; ++i)
        if (cache.sizes[i] < cache.sizes[smallest]) smallest = i;
      if (cache.sizes[smallest] >= payload) {
        std::free(block_of(p));
        return;
      }
      std::free(block_of(cache.blocks[smallest]));
      cache.held -= cache.sizes[smallest];
      --cache.count;
      cache.blocks[smallest] = cache.blocks[cache.count];
      cache.sizes[smallest] = cache.sizes[cache.count];
    }
    cache.blocks[cache.count] = p;
    cache.sizes[cache.count] = payload;
    ++cache.count;
    cache.held += payload;
    return;
  }
  std::free(block_of(p));
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
