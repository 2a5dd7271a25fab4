// Output memory routing (see memory.h), and the host cache of large blocks: a fresh block
// of tens of MB costs a page fault per 4 KiB page on first touch (glibc maps every block above
// 32 MiB anew), as much time as the kernel that fills it; freed blocks of 1 MiB and more are
// kept by size and handed out again, up to BATCHNORM_HOST_CACHE_MB (default 512; 0 disables),
// and fresh large blocks ask for transparent huge pages.
#include "core/memory.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/backend.h"
#include "core/errors.h"
#include "cpu/scratch.h"

namespace batchnorm {

namespace {

constexpr std::size_t kHugePage = std::size_t(2) << 20;
constexpr std::size_t kTailPage = std::size_t(4) << 10;

// A cached block's size: whole huge pages, except that a tail of at most one small page past
// the last whole huge page takes a small page, not another huge one (the binding asks for up
// to 63 bytes more than a result's size, to give it its input's alignment: a 16 MB result
// would otherwise cost 18 MB, the last 2 MB faulted in for 16-63 bytes).
std::size_t cached_block_bytes(std::size_t bytes) {
  const std::size_t whole = bytes / kHugePage * kHugePage;
  const std::size_t tail = bytes - whole;
  return tail == 0 ? whole : tail <= kTailPage ? whole + kTailPage : whole + kHugePage;
}

struct HostCache {
  std::mutex mutex;
  std::multimap<std::size_t, void*> free_blocks;  // by size
  std::unordered_map<void*, std::size_t> sizes;   // every live or cached large block
  std::size_t cached = 0;
  std::size_t limit = 0;

  HostCache() {
    const char* env = std::getenv("BATCHNORM_HOST_CACHE_MB");
    long long mb = 512;
    if (env && *env) {
      try {
        mb = std::stoll(env);
      } catch (...) {
        mb = 512;
      }
    }
    limit = mb > 0 ? static_cast<std::size_t>(mb) << 20 : 0;
  }

  // Never destroyed: blocks may be freed by other libraries' deleters during interpreter
  // shutdown, after static destructors would have run.
  static HostCache& get() {
    static HostCache* cache = new HostCache();
    return *cache;
  }

  void* take(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto it = free_blocks.find(bytes);
      if (it != free_blocks.end()) {
        void* p = it->second;
        free_blocks.erase(it);
        cached -= bytes;
        return p;
      }
    }
    // posix_memalign, not aligned_alloc: a block with a small tail page is no multiple of the
    // alignment, which aligned_alloc need not accept (AddressSanitizer refuses it).
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: fewer, larger page faults
#endif
    std::lock_guard<std::mutex> lock(mutex);
    sizes[p] = bytes;
    return p;
  }

  // False when p is not a large block (the caller frees it).
  bool give(void* p) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = sizes.find(p);
    if (it == sizes.end()) return false;
    const std::size_t bytes = it->second;
    if (cached + bytes <= limit) {
      free_blocks.emplace(bytes, p);
      cached += bytes;
    } else {
      sizes.erase(it);
      std::free(p);
    }
    return true;
  }

  std::size_t release() {
    std::lock_guard<std::mutex> lock(mutex);
    std::size_t released = cached;
    for (auto& [bytes, p] : free_blocks) {
      sizes.erase(p);
      std::free(p);
    }
    free_blocks.clear();
    cached = 0;
    return released;
  }
};

}  // namespace

namespace cpu {

void* allocate(int, std::size_t bytes, void*) {
  void* p;
  if (bytes >= kHostCachedMinBytes) {
    p = HostCache::get().take(cached_block_bytes(bytes));
  } else {
    const std::size_t rounded = (bytes + 63) / 64 * 64;
    p = std::aligned_alloc(64, rounded ? rounded : 64);
  }
  BN_EXPECTS(p != nullptr, runtime_error, "out of host memory allocating ", bytes, " bytes");
  return p;
}

void deallocate(int, void* ptr, void*) {
  if (!HostCache::get().give(ptr)) std::free(ptr);
}

std::size_t release_cached() { return HostCache::get().release() + scratch_release(); }

}  // namespace cpu

std::size_t release_cached_memory() {
  std::size_t released = cpu_backend().release_cached();
  const Backend* cuda = cuda_backend();
  if (cuda && cuda->info().available) released += cuda->release_cached();
  return released;
}

void* allocate(const Device& device, std::size_t bytes, void* stream) {
  return backend_for(device).allocate(device.index, bytes, stream);
}

void deallocate(const Device& device, void* ptr, void* stream) {
  if (ptr) backend_for(device).deallocate(device.index, ptr, stream);
}

void stream_wait(const Device& device, void* producer, void* consumer) {
  backend_for(device).stream_wait(device.index, producer, consumer);
}

}  // namespace batchnorm
