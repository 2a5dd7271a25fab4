// CPU threading: the process-wide thread count and parallel_for, a static OpenMP split of
// independent tasks, or a split over a host's thread pool (TaskPool) while one is set for the
// calling thread. Reductions are cut into groups by the shape alone, never by the thread
// count, and any other cut (blocks of channels) leaves each channel's operations as they are,
// so any number of threads computes the same bits.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>

#if defined(BN_WITH_OPENMP)
#include <omp.h>
#endif

namespace batchnorm::cpu {

// A host's thread pool, which parallel_for uses instead of OpenMP while it is set for the
// calling thread (PoolScope): an XLA FFI call runs the kernels on XLA's intra-op threads.
// OpenMP teams beside XLA's pool oversubscribed the cores (both spin while they wait: a
// channels-last inference under jit took 5-12 ms instead of 2), and every XLA thread that
// calls a kernel would start a team of its own. schedule(ctx, task, arg) runs task(arg) on
// one of the pool's `threads` threads or inline, in any order, maybe not concurrently.
struct TaskPool {
  void* ctx = nullptr;
  int threads = 1;
  void (*schedule)(void* ctx, void (*task)(void* arg), void* arg) = nullptr;
};

// How many PoolScopes are open in the process: 0 (no host pool anywhere, the eager API's case)
// spares parallel_for the thread-local lookups below (__tls_get_addr in a shared library: 40-80
// ns of a 0.4 us call).
extern std::atomic<int> open_pool_scopes;
// The calling thread's pool (nullptr: OpenMP's team).
const TaskPool* current_pool();
// Sets the calling thread's pool (nullptr: OpenMP's team) and returns the one it had; what
// PoolScope does, as two calls the private bridge exports (capi/bridge.h: batchnorm._jax,
// linked to libbatchnorm, opens its scopes there).
const TaskPool* enter_pool(const TaskPool* pool);
void leave_pool(const TaskPool* previous);
// Sets the calling thread's pool for its lifetime (the previous one after).
class PoolScope {
 public:
  explicit PoolScope(const TaskPool* pool);
  ~PoolScope();
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;

 private:
  const TaskPool* saved_;
};

// Whether this thread runs a pool task of parallel_for (where a nested one stays serial).
bool in_pool_task();
// Runs chunk(arg, c) for every c in [0, chunks) on the pool's threads and the calling one,
// each chunk once, and returns when all have run, rethrowing the first exception. Chunks are
// claimed, not assigned: a pool task that starts late (or never runs concurrently) finds them
// taken, so the call never waits for a thread that is busy elsewhere.
void run_on_pool(const TaskPool& pool, int64_t chunks, void (*chunk)(void* arg, int64_t c), void* arg);

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
  const bool pools = open_pool_scopes.load(std::memory_order_relaxed) != 0;
  if (pools && in_pool_task()) {  // nested in a pool's chunk (whose thread has no pool of its own set)
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  if (const TaskPool* pool = pools ? current_pool() : nullptr) {
    const int64_t use = n < pool->threads ? n : pool->threads;
    if (use > 1 && work >= kMinParallelWork) {
      // The static split of the OpenMP path: chunk c runs [n c / use, n (c + 1) / use).
      auto chunk = [&](int64_t c) {
        for (int64_t i = n * c / use, end = n * (c + 1) / use; i < end; ++i) f(i);
      };
      run_on_pool(*pool, use, [](void* body, int64_t c) { (*static_cast<decltype(chunk)*>(body))(c); }, &chunk);
      return;
    }
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
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
