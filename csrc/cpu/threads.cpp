// The process-wide CPU thread count (set_num_threads / get_num_threads of the contract) and
// the machine facts the work partitioning reads (cache size).
#include "cpu/threads.h"

#include <atomic>
#include <thread>
#include <unistd.h>

#include "core/errors.h"
#include "core/ops.h"
#include "cpu/plan.h"

namespace batchnorm {
namespace {
int default_threads() {
#if defined(BN_WITH_OPENMP)
  return omp_get_max_threads() > 0 ? omp_get_max_threads() : 1;
#else
  return 1;
#endif
}
std::atomic<int>& threads_setting() {
  static std::atomic<int> n{default_threads()};
  return n;
}
}  // namespace

void set_num_threads(int n) {
  BN_EXPECTS(n >= 1, value_error, "n must be an int >= 1, got ", n);
  threads_setting().store(n);
}
int get_num_threads() { return threads_setting().load(); }

namespace cpu {
int thread_count() { return get_num_threads(); }

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    long v = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<int64_t>(v) : int64_t(1) << 20;
  }();
  return bytes;
}

int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    long v = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (v <= 0) v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<int64_t>(v) : int64_t(32) << 20;
  }();
  return bytes;
}
}  // namespace cpu
}  // namespace batchnorm
