// The library side of the private bridge (bridge.h): each function calls the core and keeps
// its exceptions inside (guarded), exactly as the public C functions do.
#include "capi/bridge.h"

#include "capi/guard.h"

#ifndef BN_BUILD_TAG
#error "BN_BUILD_TAG must be defined by the build (CMakeLists.txt)"
#endif

using namespace batchnorm;
using batchnorm::capi::guarded;

extern "C" {

BN_API const char* bn_detail_build_tag(void) { return BN_BUILD_TAG; }

BN_API bn_status bn_detail_statistics_specs(const StatisticsParams* p, StatisticsSpecs* specs) {
  return guarded([&] { *specs = statistics_specs(*p); });
}
BN_API bn_status bn_detail_statistics(const StatisticsParams* p, const StatisticsSpecs* specs, int64_t* count) {
  return guarded([&] { *count = statistics(*p, *specs); });
}
BN_API bn_status bn_detail_forward_training_specs(const ForwardTrainingParams* p, ForwardTrainingSpecs* specs) {
  return guarded([&] { *specs = forward_training_specs(*p); });
}
BN_API bn_status bn_detail_forward_training(const ForwardTrainingParams* p, const ForwardTrainingSpecs* specs) {
  return guarded([&] { forward_training(*p, *specs); });
}
BN_API bn_status bn_detail_forward_inference_specs(const ForwardInferenceParams* p, ForwardInferenceSpecs* specs) {
  return guarded([&] { *specs = forward_inference_specs(*p); });
}
BN_API bn_status bn_detail_forward_inference(const ForwardInferenceParams* p, const ForwardInferenceSpecs* specs) {
  return guarded([&] { forward_inference(*p, *specs); });
}
BN_API bn_status bn_detail_backward_specs(const BackwardParams* p, BackwardSpecs* specs) {
  return guarded([&] { *specs = backward_specs(*p); });
}
BN_API bn_status bn_detail_backward(const BackwardParams* p, const BackwardSpecs* specs) {
  return guarded([&] { backward(*p, *specs); });
}
BN_API bn_status bn_detail_backward_reduce_specs(const BackwardReduceParams* p, BackwardReduceSpecs* specs) {
  return guarded([&] { *specs = backward_reduce_specs(*p); });
}
BN_API bn_status bn_detail_backward_reduce(const BackwardReduceParams* p, const BackwardReduceSpecs* specs) {
  return guarded([&] { backward_reduce(*p, *specs); });
}
BN_API bn_status bn_detail_backward_elemt_specs(const BackwardElemtParams* p, BackwardElemtSpecs* specs) {
  return guarded([&] { *specs = backward_elemt_specs(*p); });
}
BN_API bn_status bn_detail_backward_elemt(const BackwardElemtParams* p, const BackwardElemtSpecs* specs) {
  return guarded([&] { backward_elemt(*p, *specs); });
}
BN_API bn_status bn_detail_merge_statistics_specs(const MergeStatisticsParams* p, MergeStatisticsSpecs* specs) {
  return guarded([&] { *specs = merge_statistics_specs(*p); });
}
BN_API bn_status bn_detail_merge_statistics(const MergeStatisticsParams* p, const MergeStatisticsSpecs* specs,
                                            int64_t* total) {
  return guarded([&] { *total = merge_statistics(*p, *specs); });
}
BN_API bn_status bn_detail_fold_specs(const FoldParams* p, FoldSpecs* specs) {
  return guarded([&] { *specs = fold_specs(*p); });
}
BN_API bn_status bn_detail_fold(const FoldParams* p, const FoldSpecs* specs) {
  return guarded([&] { fold(*p, *specs); });
}
BN_API bn_status bn_detail_check_environment(void) {
  return guarded([&] { check_environment(); });
}
BN_API bn_status bn_detail_set_stream_threshold_bytes(int64_t bytes) {
  return guarded([&] { set_stream_threshold_bytes(bytes); });
}
BN_API int64_t bn_detail_stream_threshold_bytes(void) { return stream_threshold_bytes(); }
BN_API double bn_detail_store_probe_ratio(void) { return store_probe_ratio(); }
BN_API const char* bn_detail_simd_level(void) {
  static const std::string level = simd_level();  // fixed for the process (cpuid, BATCHNORM_ISA)
  return level.c_str();
}
BN_API bn_status bn_detail_cuda_info(CudaInfo* info) {
  return guarded([&] { *info = cuda_info(); });
}
BN_API bn_status bn_detail_allocate(const Device* device, size_t bytes, void* stream, void** ptr) {
  return guarded([&] { *ptr = allocate(*device, bytes, stream); });
}
BN_API bn_status bn_detail_deallocate(const Device* device, void* ptr, void* stream) {
  return guarded([&] { deallocate(*device, ptr, stream); });
}
BN_API bn_status bn_detail_release_cached_memory(size_t* bytes) {
  return guarded([&] { *bytes = release_cached_memory(); });
}
BN_API bn_status bn_detail_stream_wait(const Device* device, void* producer, void* consumer) {
  return guarded([&] { stream_wait(*device, producer, consumer); });
}
BN_API const cpu::TaskPool* bn_detail_enter_pool(const cpu::TaskPool* pool) { return cpu::enter_pool(pool); }
BN_API void bn_detail_leave_pool(const cpu::TaskPool* previous) { cpu::leave_pool(previous); }

}  // extern "C"
