// The process-wide CPU thread count (set_num_threads / get_num_threads of the contract).
#include "cpu/threads.h"

#include <atomic>
#include <thread>

#include "core/errors.h"
#include "core/ops.h"

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
}  // namespace cpu
}  // namespace batchnorm
