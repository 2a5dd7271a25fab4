// The XLA FFI handlers of batchnorm._jax (handlers.cpp), one per op and platform, as the
// plain C entry points XLA calls; module.cpp hands them to jax.ffi.register_ffi_target.
#pragma once
#include "xla/ffi/api/c_api.h"

#define BN_JAX_DECLARE_HANDLERS(platform)                                          \
  extern "C" XLA_FFI_Error* bn_jax_statistics_##platform(XLA_FFI_CallFrame*);        \
  extern "C" XLA_FFI_Error* bn_jax_merge_##platform(XLA_FFI_CallFrame*);             \
  extern "C" XLA_FFI_Error* bn_jax_forward_training_##platform(XLA_FFI_CallFrame*);  \
  extern "C" XLA_FFI_Error* bn_jax_forward_inference_##platform(XLA_FFI_CallFrame*); \
  extern "C" XLA_FFI_Error* bn_jax_backward_##platform(XLA_FFI_CallFrame*);

BN_JAX_DECLARE_HANDLERS(cpu)
#if defined(BN_WITH_CUDA)
BN_JAX_DECLARE_HANDLERS(cuda)
#endif
