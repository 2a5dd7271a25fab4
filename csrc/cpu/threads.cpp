// The process-wide CPU thread count (set_num_threads / get_num_threads of the contract) and
// the machine facts the work partitioning reads (cache size).
#include "cpu/threads.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <set>
#include <string>
#include <thread>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

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
  BN_EXPECTS(n <= 1 << 16, value_error, "n must be at most 65536, got ", n);
  threads_setting().store(n);
}
int get_num_threads() { return threads_setting().load(); }

void set_stream_threshold_bytes(int64_t bytes) { cpu::set_stream_threshold(bytes); }
int64_t stream_threshold_bytes() { return cpu::stream_threshold_bytes(); }
double store_probe_ratio() { return cpu::store_probe_ratio(); }

namespace cpu {
namespace {
int64_t usable_cpus();
}  // namespace

int thread_count() {
  // A host's pool has its own size (its host's setting, not set_num_threads).
  if (open_pool_scopes.load(std::memory_order_relaxed) != 0)
    if (const TaskPool* pool = current_pool()) return std::max(1, pool->threads);
  // The team a parallel region asks for: the setting, at most max(256, 8 x the CPUs this
  // process may use). OpenMP ends the process when it cannot create a thread (libgomp:
  // "Thread creation failed"), as set_num_threads(65536) did on 2 CPUs; no result depends on
  // the team's size (threads.h).
  static const int cap = static_cast<int>(std::min<int64_t>(1 << 16, std::max<int64_t>(256, 8 * usable_cpus())));
  return std::min(get_num_threads(), cap);
}

namespace {
thread_local const TaskPool* this_threads_pool = nullptr;
thread_local int pool_task_depth = 0;

// What a parallel_for on a pool shares with its tasks: owned jointly (a task may start after
// the call returned, and must then find every chunk taken without touching the caller's
// frame, which `arg` points into).
struct PoolRun {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0;
  void (*chunk)(void*, int64_t) = nullptr;
  void* arg = nullptr;
  std::mutex error_lock;
  std::exception_ptr error;

  void work() {
    ++pool_task_depth;
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) break;
      try {
        chunk(arg, c);
      } catch (...) {
        std::lock_guard<std::mutex> hold(error_lock);
        if (!error) error = std::current_exception();
      }
      done.fetch_add(1, std::memory_order_release);
    }
    --pool_task_depth;
  }
};
}  // namespace

std::atomic<int> open_pool_scopes{0};

const TaskPool* current_pool() { return this_threads_pool; }
const TaskPool* enter_pool(const TaskPool* pool) {
  open_pool_scopes.fetch_add(1, std::memory_order_relaxed);
  const TaskPool* previous = this_threads_pool;
  this_threads_pool = pool;
  return previous;
}
void leave_pool(const TaskPool* previous) {
  this_threads_pool = previous;
  open_pool_scopes.fetch_sub(1, std::memory_order_relaxed);
}
PoolScope::PoolScope(const TaskPool* pool) : saved_(enter_pool(pool)) {}
PoolScope::~PoolScope() { leave_pool(saved_); }
bool in_pool_task() { return pool_task_depth > 0; }

void run_on_pool(const TaskPool& pool, int64_t chunks, void (*chunk)(void*, int64_t), void* arg) {
  auto run = std::make_shared<PoolRun>();
  run->chunks = chunks;
  run->chunk = chunk;
  run->arg = arg;
  try {
    for (int64_t t = 1; t < chunks; ++t) {
      auto held = std::make_unique<std::shared_ptr<PoolRun>>(run);
      pool.schedule(pool.ctx, [](void* p) {
        const std::unique_ptr<std::shared_ptr<PoolRun>> mine(static_cast<std::shared_ptr<PoolRun>*>(p));
        (*mine)->work();
      }, held.get());
      held.release();  // the task owns it now
    }
  } catch (...) {  // (out of memory while scheduling: the chunks left are this thread's)
  }
  run->work();
  // The chunks still running are on threads that are running them: wait for those alone.
  while (run->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  if (run->error) std::rethrow_exception(run->error);
}

namespace {
std::atomic<int>& team_record() {
  static std::atomic<int> n{1};
  return n;
}
}  // namespace

int note_team(int n) {
  int seen = team_record().load(std::memory_order_relaxed);
  while (n > seen && !team_record().compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
  }
  return n;
}
int largest_team() { return team_record().load(std::memory_order_relaxed); }

namespace {
// fork(): libgomp cannot start a team in the child of a process whose OpenMP ran one. The
// child has the forking thread alone, and the pool it inherits waits for threads that are not
// there: its first parallel region hung (a torch DataLoader worker, a multiprocessing child
// started by fork, after the parent trained on 2 threads). As torch's DataLoader does for
// torch's threads, such a child runs the kernels on one thread (set_num_threads there brings
// the hang back: start children with spawn or forkserver for threads of their own).
void one_thread_after_fork() {
  if (team_record().load(std::memory_order_relaxed) > 1) {
    team_record().store(1, std::memory_order_relaxed);
    threads_setting().store(1);
  }
}
[[maybe_unused]] const int fork_handler = pthread_atfork(nullptr, nullptr, one_thread_after_fork);
}  // namespace

void for_each(int64_t n, int64_t work, void (*fn)(void* ctx, int64_t i), void* ctx) {
  // Tasks side by side only when they keep every thread busy to the end; otherwise one after
  // the other, each with all the threads (a nested parallel region runs on one thread).
  const int64_t T = thread_count();
  if (n >= T && (n % T == 0 || n >= 4 * T)) {
    parallel_for(n, work, [&](int64_t i) { fn(ctx, i); });
    return;
  }
  for (int64_t i = 0; i < n; ++i) fn(ctx, i);
}

namespace {
// The file `field` of CPU `cpu`'s unified or data cache of `level` in sysfs (the kernel's view
// of this machine, or of this VM), as one word; "" when sysfs does not say.
std::string cache_field(int cpu, int level, const char* field) {
  for (int i = 0; i < 8; ++i) {
    const std::string dir =
        "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/cache/index" + std::to_string(i) + "/";
    std::ifstream lv(dir + "level"), ty(dir + "type");
    int l = 0;
    std::string type;
    if (!(lv >> l) || !(ty >> type)) break;
    if (l != level || type == "Instruction") continue;
    std::ifstream f(dir + field);
    std::string word;
    return f >> word ? word : std::string();
  }
  return std::string();
}

// Bytes of the unified or data cache of `level` seen by CPU 0, from sysfs, else from sysconf;
// -1 when neither says. sysfs comes first: glibc's sysconf reported a 384 MiB L3 on a 2-core
// EPYC VM whose L3 is 32 MiB.
int64_t cache_bytes(int level) {
  const std::string size = cache_field(0, level, "size");
  if (!size.empty()) {
    int64_t v = 0;
    size_t used = 0;
    try {
      v = std::stoll(size, &used);
    } catch (...) {
      v = 0;
    }
    const char unit = used < size.size() ? size[used] : '\0';
    v *= unit == 'K' ? 1024 : unit == 'M' ? (1 << 20) : 1;
    if (v > 0) return v;
  }
  long v = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  v = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
#endif
  return v > 0 ? static_cast<int64_t>(v) : -1;
}
}  // namespace

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const int64_t v = cache_bytes(2);
    return v > 0 ? v : int64_t(1) << 20;
  }();
  return bytes;
}

namespace {
// -1: not set by the testing hook; the environment or the cache size decides.
std::atomic<int64_t>& stream_threshold_override() {
  static std::atomic<int64_t> v{-1};
  return v;
}
}  // namespace

int64_t stream_threshold_from_env() {
  static const int64_t bytes = [] {
    const char* s = std::getenv("BATCHNORM_STREAM_BYTES");
    if (s == nullptr || *s == '\0') return int64_t(-1);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s, &end, 10);
    BN_EXPECTS(errno == 0 && *s >= '0' && *s <= '9' && *end == '\0' && v >= 0, value_error,
               "BATCHNORM_STREAM_BYTES must be a byte count (an integer >= 0), got '", s, "'");
    return static_cast<int64_t>(v);
  }();
  return bytes;
}

namespace {
// CPUs this process may run on (its affinity mask), at least 1.
int64_t usable_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// L2 caches among the CPUs this process may run on: the distinct sets of CPUs sharing one, as
// sysfs lists them (two hyperthreads of a core share theirs), else one per CPU.
int64_t usable_l2s() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return usable_cpus();
  std::set<std::string> shared;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    const std::string list = cache_field(cpu, 2, "shared_cpu_list");
    if (list.empty()) return usable_cpus();  // sysfs does not say: one per CPU
    shared.insert(list);
  }
  return std::max<int64_t>(1, static_cast<int64_t>(shared.size()));
#else
  return usable_cpus();
#endif
}
}  // namespace

namespace {
// The default threshold lies between these two: the cache's cap, or the CPUs' L2s (when
// smaller) where the cache is in doubt and the store probe says regular stores do not pay.
int64_t capped_by_cache() {
  static const int64_t cap = std::min(last_level_cache_bytes(), kStreamBytesPerCpu * usable_cpus());
  return cap;
}
int64_t capped_by_l2s() {
  // A reported cache within the cap is taken at its word: no probe (cpu/plan.h says why).
  static const int64_t l2s = last_level_cache_bytes() > capped_by_cache()
                                 ? std::min(capped_by_cache(), l2_cache_bytes() * usable_l2s())
                                 : capped_by_cache();
  return l2s;
}
// The hook's setting, else BATCHNORM_STREAM_BYTES, else -1.
int64_t stream_threshold_set() {
  const int64_t forced = stream_threshold_override().load(std::memory_order_relaxed);
  return forced >= 0 ? forced : stream_threshold_from_env();
}
}  // namespace

int64_t stream_threshold_bytes() {
  const int64_t set = stream_threshold_set();
  if (set >= 0) return set;
  static const int64_t by_cache = [] {
    if (capped_by_l2s() == capped_by_cache()) return capped_by_cache();  // nothing to decide
    const double probe = store_probe_ratio();
    return probe > 0 && probe < kStreamingBeatsCache ? capped_by_l2s() : capped_by_cache();
  }();
  return by_cache;
}

bool stream_threshold_below(int64_t bytes) {
  const int64_t set = stream_threshold_set();
  if (set >= 0) return set < bytes;
  // Outside the two candidates' range the answer is the same either way: no probe.
  if (bytes <= capped_by_l2s()) return false;
  if (bytes > capped_by_cache()) return true;
  return stream_threshold_bytes() < bytes;
}

void set_stream_threshold(int64_t bytes) { stream_threshold_override().store(bytes < 0 ? -1 : bytes); }

int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t v = cache_bytes(3);
    if (v <= 0) v = cache_bytes(2);
    return v > 0 ? v : int64_t(32) << 20;
  }();
  return bytes;
}
}  // namespace cpu
}  // namespace batchnorm
