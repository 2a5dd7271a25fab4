// The CPU ops' per-call temporaries (per-channel vectors, per-group partial sums): std::vector
// with an allocator that keeps large blocks in a small per-thread cache between calls. glibc
// serves blocks of 128 KB and more with mmap, or gives the heap top back to the OS once the
// freed space passes its trim threshold, so a call with tens of thousands of channels paid
// page faults and TLB shootdowns for its own temporaries every time.
#pragma once
#include <cstddef>
#include <type_traits>
#include <vector>

namespace batchnorm::cpu {

// A block of at least `bytes` on a 64-byte boundary; from this thread's cache when one fits.
void* scratch_allocate(std::size_t bytes);
// Gives a block back: into this thread's cache (blocks of 4 KB and more; when the cache is
// full, in place of its smallest block if that is smaller), else to malloc.
void scratch_free(void* p) noexcept;
// Frees the blocks cached by the calling thread and by the threads of its parallel regions
// (batchnorm.empty_cache()); returns the bytes released.
std::size_t scratch_release();

template <class T>
struct ScratchAllocator {
  using value_type = T;
  ScratchAllocator() noexcept = default;
  template <class U>
  ScratchAllocator(const ScratchAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(scratch_allocate(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) noexcept { scratch_free(p); }
  template <class U>
  bool operator==(const ScratchAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const ScratchAllocator<U>&) const noexcept { return false; }
};

// The temporaries' vector type.
template <class T>
using buffer = std::vector<T, ScratchAllocator<T>>;

// n values from the same cache, left unwritten: for arrays of which every element is written
// before it is read (a buffer's zero fill was a serial pass over each before its parallel
// one: 1.5 MB of partial moments in (2, 65536) training). Default-constructed: none, until
// one is moved in.
template <class T>
class scratch_array {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>);

 public:
  scratch_array() noexcept = default;
  explicit scratch_array(std::size_t n) : p_(static_cast<T*>(scratch_allocate(n * sizeof(T)))) {}
  ~scratch_array() { scratch_free(p_); }
  scratch_array(const scratch_array&) = delete;
  scratch_array& operator=(const scratch_array&) = delete;
  scratch_array(scratch_array&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  scratch_array& operator=(scratch_array&& o) noexcept {
    if (this != &o) {
      scratch_free(p_);
      p_ = o.p_;
      o.p_ = nullptr;
    }
    return *this;
  }
  T* data() noexcept { return p_; }
  const T* data() const noexcept { return p_; }
  T& operator[](std::size_t i) noexcept { return p_[i]; }
  const T& operator[](std::size_t i) const noexcept { return p_[i]; }

 private:
  T* p_ = nullptr;
};

}  // namespace batchnorm::cpu
