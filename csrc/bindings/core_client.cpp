// The core's C++ API (core/ops.h, core/memory.h) as the Python module sees it: each function
// forwards to libbatchnorm through the private bridge (capi/bridge.h), so the module and C/C++
// hosts in the same process share one copy of the kernels, the thread setting and the memory
// caches. A failure comes back as a status and the library's message and is rethrown here as
// the core's exception, which module.cpp turns into ValueError / TypeError / RuntimeError.
#include <stdexcept>
#include <string>

#include "bindings/core_client.h"
#include "capi/bridge.h"
#include "core/errors.h"

namespace batchnorm {

namespace {
void check(bn_status status) {
  switch (status) {
    case BN_OK: return;
    case BN_ERROR_VALUE: throw value_error(bn_last_error());
    case BN_ERROR_TYPE: throw type_error(bn_last_error());
    case BN_ERROR_RUNTIME: throw runtime_error(bn_last_error());
    default: throw std::runtime_error(std::string("batchnorm internal error: ") + bn_last_error());
  }
}
}  // namespace

// The module passes the core's structs by pointer: a libbatchnorm from another build (one
// already loaded in the process under the same SONAME) could lay them out differently.
void check_library_build(const char* module_tag, const char* module) {
  const std::string library_tag = bn_detail_build_tag();
  BN_EXPECTS(library_tag == module_tag, runtime_error, module, " was built for libbatchnorm ", module_tag,
             " but the process loaded libbatchnorm ", library_tag,
             " (another installation of libbatchnorm.so.", BN_VERSION_MAJOR, " was loaded first)");
}

// _C runs each op in its two steps (it allocates in between); _jax, whose outputs XLA
// allocated, the one-step forms (inline in core/ops.h, calling these).
template <class P, class S>
S specs_of(bn_status (*bridge)(const P*, S*), const P& p) {
  S specs;
  check(bridge(&p, &specs));
  return specs;
}
template <class P, class S>
int64_t counted(bn_status (*bridge)(const P*, const S*, int64_t*), const P& p, const S& specs) {
  int64_t n = 0;
  check(bridge(&p, &specs, &n));
  return n;
}

StatisticsSpecs statistics_specs(const StatisticsParams& p) { return specs_of(bn_detail_statistics_specs, p); }
ForwardTrainingSpecs forward_training_specs(const ForwardTrainingParams& p) {
  return specs_of(bn_detail_forward_training_specs, p);
}
ForwardInferenceSpecs forward_inference_specs(const ForwardInferenceParams& p) {
  return specs_of(bn_detail_forward_inference_specs, p);
}
BackwardSpecs backward_specs(const BackwardParams& p) { return specs_of(bn_detail_backward_specs, p); }
BackwardReduceSpecs backward_reduce_specs(const BackwardReduceParams& p) {
  return specs_of(bn_detail_backward_reduce_specs, p);
}
BackwardElemtSpecs backward_elemt_specs(const BackwardElemtParams& p) {
  return specs_of(bn_detail_backward_elemt_specs, p);
}
MergeStatisticsSpecs merge_statistics_specs(const MergeStatisticsParams& p) {
  return specs_of(bn_detail_merge_statistics_specs, p);
}
FoldSpecs fold_specs(const FoldParams& p) { return specs_of(bn_detail_fold_specs, p); }
int64_t statistics(const StatisticsParams& p, const StatisticsSpecs& s) { return counted(bn_detail_statistics, p, s); }
void forward_training(const ForwardTrainingParams& p, const ForwardTrainingSpecs& s) {
  check(bn_detail_forward_training(&p, &s));
}
void forward_inference(const ForwardInferenceParams& p, const ForwardInferenceSpecs& s) {
  check(bn_detail_forward_inference(&p, &s));
}
void backward(const BackwardParams& p, const BackwardSpecs& s) { check(bn_detail_backward(&p, &s)); }
void backward_reduce(const BackwardReduceParams& p, const BackwardReduceSpecs& s) {
  check(bn_detail_backward_reduce(&p, &s));
}
void backward_elemt(const BackwardElemtParams& p, const BackwardElemtSpecs& s) {
  check(bn_detail_backward_elemt(&p, &s));
}
int64_t merge_statistics(const MergeStatisticsParams& p, const MergeStatisticsSpecs& s) {
  return counted(bn_detail_merge_statistics, p, s);
}
void fold(const FoldParams& p, const FoldSpecs& s) { check(bn_detail_fold(&p, &s)); }

// _jax's handlers open their scopes of XLA's pool in the library, where the loops read it.
namespace cpu {
PoolScope::PoolScope(const TaskPool* pool) : saved_(bn_detail_enter_pool(pool)) {}
PoolScope::~PoolScope() { bn_detail_leave_pool(saved_); }
}  // namespace cpu

void set_num_threads(int n) { check(bn_set_num_threads(n)); }
void check_environment() { check(bn_detail_check_environment()); }
void set_stream_threshold_bytes(int64_t bytes) { check(bn_detail_set_stream_threshold_bytes(bytes)); }
int get_num_threads() { return bn_get_num_threads(); }
std::string simd_level() { return bn_detail_simd_level(); }
int64_t stream_threshold_bytes() { return bn_detail_stream_threshold_bytes(); }
double store_probe_ratio() { return bn_detail_store_probe_ratio(); }
CudaInfo cuda_info() {
  CudaInfo info;
  check(bn_detail_cuda_info(&info));
  return info;
}

void* allocate(const Device& device, std::size_t bytes, void* stream) {
  void* ptr = nullptr;
  check(bn_detail_allocate(&device, bytes, stream, &ptr));
  return ptr;
}
void deallocate(const Device& device, void* ptr, void* stream) { check(bn_detail_deallocate(&device, ptr, stream)); }
std::size_t release_cached_memory() {
  std::size_t bytes = 0;
  check(bn_detail_release_cached_memory(&bytes));
  return bytes;
}
void stream_wait(const Device& device, void* producer, void* consumer) {
  check(bn_detail_stream_wait(&device, producer, consumer));
}

}  // namespace batchnorm
