// CPU threading: the process-wide thread count and parallel_for, a static OpenMP split of
// independent tasks. Reductions are cut into groups by the shape alone, never by the thread
// count, and any other cut (blocks of channels) leaves each channel's operations as they are,
// so any number of threads computes the same bits.
#pragma once
#include <cstdint>
#include <exception>

#if defined(BN_WITH_OPENMP)
#include <omp.h>
#endif

namespace batchnorm::cpu {

int thread_count();

// Notes a team of n threads about to start (returns n): the largest so far is how many
// threads of the pool may hold cached temporaries (scratch_release reaches them all).
int note_team(int n);
int largest_team();

// Below this many elements of work a call stays on the calling thread: a parallel region
// costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 15;

// Runs f(i) for i in [0, n), split statically over up to thread_count() threads when `work`
// (elements touched) makes it worth it.
template <class F>
void parallel_for(int64_t n, int64_t work, F&& f) {
#if defined(BN_WITH_OPENMP)
  const int threads = thread_count();
  // Inside another parallel_for (tasks run side by side, cpu::for_each) it stays on its thread.
  if (threads > 1 && n > 1 && work >= kMinParallelWork && !omp_in_parallel()) {
    const int use = note_team(static_cast<int>(n < threads ? n : threads));
    // An exception must not leave the region (std::terminate): the first one is kept and
    // thrown on the calling thread once every task has run (a task that throws, as a ghost
    // group's op reading a bad BATCHNORM_ISA does, fails before writing anything).
    std::exception_ptr error;
#pragma omp parallel for schedule(static) num_threads(use)
    for (int64_t i = 0; i < n; ++i) {
      try {
        f(i);
      } catch (...) {
#pragma omp critical(batchnorm_parallel_for_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace batchnorm::cpu
