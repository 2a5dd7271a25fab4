// The private door between the Python module (batchnorm._C) and libbatchnorm, so that the
// module runs the library's one copy of the kernels, thread setting and memory caches. Not a
// public ABI: these functions take the core's C++ structs, which only a module built from the
// same tree may pass, and bn_detail_build_tag() lets the module check that it was.
// Exported (prefix bn_) with C linkage; every one returns a bn_status, never throws.
#pragma once
#include <cstddef>
#include <cstdint>

#include "batchnorm/batchnorm.h"
#include "core/memory.h"
#include "core/ops.h"
#include "cpu/threads.h"

extern "C" {
BN_API const char* bn_detail_build_tag(void);
// Each op in its two steps (core/ops.h): <op>_specs validates the inputs and fills *specs;
// <op> checks the outputs against those specs (of the same params) and runs.
BN_API bn_status bn_detail_statistics_specs(const batchnorm::StatisticsParams* p, batchnorm::StatisticsSpecs* specs);
BN_API bn_status bn_detail_statistics(const batchnorm::StatisticsParams* p, const batchnorm::StatisticsSpecs* specs,
                                      int64_t* count);
BN_API bn_status bn_detail_forward_training_specs(const batchnorm::ForwardTrainingParams* p,
                                                  batchnorm::ForwardTrainingSpecs* specs);
BN_API bn_status bn_detail_forward_training(const batchnorm::ForwardTrainingParams* p,
                                            const batchnorm::ForwardTrainingSpecs* specs);
BN_API bn_status bn_detail_forward_inference_specs(const batchnorm::ForwardInferenceParams* p,
                                                   batchnorm::ForwardInferenceSpecs* specs);
BN_API bn_status bn_detail_forward_inference(const batchnorm::ForwardInferenceParams* p,
                                             const batchnorm::ForwardInferenceSpecs* specs);
BN_API bn_status bn_detail_backward_specs(const batchnorm::BackwardParams* p, batchnorm::BackwardSpecs* specs);
BN_API bn_status bn_detail_backward(const batchnorm::BackwardParams* p, const batchnorm::BackwardSpecs* specs);
BN_API bn_status bn_detail_backward_reduce_specs(const batchnorm::BackwardReduceParams* p,
                                                 batchnorm::BackwardReduceSpecs* specs);
BN_API bn_status bn_detail_backward_reduce(const batchnorm::BackwardReduceParams* p,
                                           const batchnorm::BackwardReduceSpecs* specs);
BN_API bn_status bn_detail_backward_elemt_specs(const batchnorm::BackwardElemtParams* p,
                                                batchnorm::BackwardElemtSpecs* specs);
BN_API bn_status bn_detail_backward_elemt(const batchnorm::BackwardElemtParams* p,
                                          const batchnorm::BackwardElemtSpecs* specs);
BN_API bn_status bn_detail_merge_statistics_specs(const batchnorm::MergeStatisticsParams* p,
                                                  batchnorm::MergeStatisticsSpecs* specs);
BN_API bn_status bn_detail_merge_statistics(const batchnorm::MergeStatisticsParams* p,
                                            const batchnorm::MergeStatisticsSpecs* specs,
                                            int64_t* total);
BN_API bn_status bn_detail_fold_specs(const batchnorm::FoldParams* p, batchnorm::FoldSpecs* specs);
BN_API bn_status bn_detail_fold(const batchnorm::FoldParams* p, const batchnorm::FoldSpecs* specs);
BN_API bn_status bn_detail_check_environment(void);
BN_API bn_status bn_detail_set_stream_threshold_bytes(int64_t bytes);
BN_API int64_t bn_detail_stream_threshold_bytes(void);
BN_API double bn_detail_store_probe_ratio(void);
BN_API const char* bn_detail_simd_level(void);
BN_API bn_status bn_detail_cuda_info(batchnorm::CudaInfo* info);
BN_API bn_status bn_detail_allocate(const batchnorm::Device* device, size_t bytes, void* stream, void** ptr);
BN_API bn_status bn_detail_deallocate(const batchnorm::Device* device, void* ptr, void* stream);
BN_API bn_status bn_detail_release_cached_memory(size_t* bytes);
BN_API bn_status bn_detail_stream_wait(const batchnorm::Device* device, void* producer, void* consumer);
// cpu::enter_pool / leave_pool: the calling thread's parallel loops on a host's pool (XLA's, for
// batchnorm._jax) until it leaves; the thread-local pool lives in the library with the loops.
BN_API const batchnorm::cpu::TaskPool* bn_detail_enter_pool(const batchnorm::cpu::TaskPool* pool);
BN_API void bn_detail_leave_pool(const batchnorm::cpu::TaskPool* previous);
}
