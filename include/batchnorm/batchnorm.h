/* batchnorm's C ABI (C99 and C++): the ops of the contract over DLPack's DLTensor, for hosts
 * that are not Python. Callers allocate every output; NULL means "not given"; each call
 * returns BN_OK or a bn_status, with bn_last_error() the thread's message. No C++ exception
 * ever leaves the library, and a failed call writes nothing (outputs and running statistics
 * are untouched). Link with the CMake target batchnorm::batchnorm (libbatchnorm.so.1).
 * Version 1.1 added the fused forward and backward (the *_ex functions and their options); 1.2
 * the training variants (batch renorm, ghost batch norm, skip_nonfinite, the biased running
 * variance) as members appended to those options. */
#ifndef BATCHNORM_BATCHNORM_H_
#define BATCHNORM_BATCHNORM_H_

#include <stddef.h>
#include <stdint.h>

/* The ABI version, the one place it is written (CMake reads it for the SONAME and the package
 * version). A new major version may break callers; minor versions only add. */
#define BN_VERSION_MAJOR 1
#define BN_VERSION_MINOR 2
#define BN_VERSION_PATCH 0
#define BN_VERSION (BN_VERSION_MAJOR * 10000 + BN_VERSION_MINOR * 100 + BN_VERSION_PATCH)

#if defined(_WIN32) && defined(BN_BUILDING_LIBRARY)
#define BN_API __declspec(dllexport)
#elif defined(_WIN32)
#define BN_API __declspec(dllimport)
#elif defined(__GNUC__)
#define BN_API __attribute__((visibility("default")))
#else
#define BN_API
#endif

/* DLPack 1.x: the structs this ABI reads, as the spec fixes them (dlpack/dlpack.h). A program
 * that also uses dlpack.h includes it first; the definitions are then taken from it. */
#ifndef DLPACK_DLPACK_H_
#ifdef __cplusplus
typedef enum : int32_t {
#else
typedef enum {
#endif
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U
} DLDataTypeCode;

typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides; /* in elements; NULL means C order (row-major, compact) */
  uint64_t byte_offset;
} DLTensor;
#endif /* DLPACK_DLPACK_H_ */

#ifdef __cplusplus
extern "C" {
#endif

/* The kind of failure, as the Python API raises it. */
typedef enum {
  BN_OK = 0,
  BN_ERROR_VALUE = 1,   /* ValueError: bad values or shapes */
  BN_ERROR_TYPE = 2,    /* TypeError: bad types, dtypes, devices, or NULL for a required array */
  BN_ERROR_RUNTIME = 3, /* RuntimeError: CUDA failures, out of memory */
  BN_ERROR_INTERNAL = 4 /* a bug in batchnorm: please report it with the message */
} bn_status;

/* The ABI version of the loaded library: major * 10000 + minor * 100 + patch (BN_VERSION of the
 * header it was built from). */
BN_API int bn_version(void);

/* The message of this thread's last bn_ call: "" after a success, else the error, in the same
 * words as the Python API's ("weight must have shape (64,), got (32,)"). Valid until this
 * thread's next bn_ call. Never NULL. */
BN_API const char* bn_last_error(void);

/* Arrays: float16, bfloat16, float32 or float64, lanes 1, on the CPU (kDLCPU, kDLCUDAHost) or a
 * CUDA device (kDLCUDA, kDLCUDAManaged), any strides. `axis` is the channel axis (negative counts
 * from the end). Per-channel outputs (mean, var, saved_mean, saved_invstd, dweight, dbias) are
 * contiguous (C,) arrays of the accumulation dtype: float64 for float64 input, else float32,
 * sharing no memory with any other argument of the call (each is refused with BN_ERROR_VALUE).
 * `stream` is the cudaStream_t the work is enqueued on for CUDA arrays (NULL: the default
 * stream); NULL on the CPU, where every call returns when the work is done. */

/* Per-channel mean and biased variance of x; *count (when count is not NULL) receives the
 * number of values per channel. mean and var may also both be float64 for any x: the
 * statistics are then accumulated and returned in float64 (the Python API's dtype="float64"). */
BN_API bn_status bn_statistics(const DLTensor* x, int axis, DLTensor* mean, DLTensor* var, int64_t* count,
                               void* stream);

/* The statistics of the concatenation of `num_shards` shards from their per-shard (mean,
 * biased var, count) (Chan's formula; shards with count 0 are ignored). *count receives the
 * total. means[i] and vars[i] are (C,) arrays; mean and var are the accumulation dtype of
 * means[0]. */
BN_API bn_status bn_merge_statistics(int64_t num_shards, const DLTensor* const* means, const DLTensor* const* vars,
                                     const int64_t* counts, DLTensor* mean, DLTensor* var, int64_t* count,
                                     void* stream);

/* Training-mode batch norm: y = (x - mean) * invstd * weight + bias with the batch statistics.
 * weight, bias: optional (C,). running_mean, running_var: optional (both or neither), updated in
 * place with running = (1 - momentum) * running + momentum * batch (unbiased variance). out
 * receives y: x's shape and dtype, any strides, may be x itself (the Python API's out=).
 * saved_mean and saved_invstd are what bn_backward takes. */
BN_API bn_status bn_forward_training(const DLTensor* x, const DLTensor* weight, const DLTensor* bias,
                                     DLTensor* running_mean, DLTensor* running_var, double momentum, double eps,
                                     int axis, DLTensor* out, DLTensor* saved_mean, DLTensor* saved_invstd,
                                     void* stream);

/* Inference-mode batch norm into out: y = (x - mean) / sqrt(var + eps) * weight + bias. */
BN_API bn_status bn_forward_inference(const DLTensor* x, const DLTensor* mean, const DLTensor* var,
                                      const DLTensor* weight, const DLTensor* bias, double eps, int axis,
                                      DLTensor* out, void* stream);

/* Gradients of bn_forward_training: out receives dx (x's shape and dtype, may be dy or x),
 * dweight = sum(dy * x_hat) and dbias = sum(dy) per channel. */
BN_API bn_status bn_backward(const DLTensor* dy, const DLTensor* x, const DLTensor* saved_mean,
                             const DLTensor* saved_invstd, const DLTensor* weight, int axis, DLTensor* out,
                             DLTensor* dweight, DLTensor* dbias, void* stream);

/* Folds an inference batch norm into the preceding conv / linear layer: kernel_out (kernel's
 * shape and dtype) and bias_out ((C,), kernel's dtype, contiguous), computed in float64. `axis`
 * is the kernel's output-channel axis (0 for Conv / Linear in PyTorch layout). conv_bias,
 * weight and bias are optional. */
BN_API bn_status bn_fold(const DLTensor* kernel, const DLTensor* conv_bias, const DLTensor* mean,
                         const DLTensor* var, const DLTensor* weight, const DLTensor* bias, double eps, int axis,
                         DLTensor* kernel_out, DLTensor* bias_out, void* stream);

/* ---- Since 1.1: options structs and the fused ops ---------------------------------------------
 * The *_ex functions take the arguments of the plain ones plus a pointer to an options struct
 * (NULL: every option at its default, the plain function's behaviour). Each struct opens with
 * `struct_size`, which the caller sets to the sizeof() of the header it compiled against (the
 * BN_*_OPTIONS_INIT macros do, with every other member zero): later minor versions append
 * members, and the library reads only those the caller's struct holds, so a program built
 * against an older header keeps working. Every member's zero value is its default (members
 * appended later follow that rule too). A struct larger than the library knows is accepted when
 * the members it does not know are zero (at their defaults), else the call fails with
 * BN_ERROR_VALUE naming the struct: a newer program asked for something this library lacks.
 * struct_size below the 1.1 size (e.g. an uninitialized struct) is a BN_ERROR_VALUE too.
 *
 * Fused batch norm: y = act(bn(x) + residual), in the passes over memory of plain batch norm
 * plus the read of the residual, and its gradients (those of the unfused composition). */

/* The activation applied after the residual add (int32_t in the options structs). */
typedef enum { BN_ACTIVATION_NONE = 0, BN_ACTIVATION_RELU = 1 } bn_activation;

/* Options of bn_forward_training_ex. */
typedef struct {
  size_t struct_size;       /* sizeof(bn_training_options) of the caller's header */
  const DLTensor* residual; /* optional: x's shape, dtype and device, any strides; NULL: no add */
  int32_t activation;       /* a bn_activation: BN_ACTIVATION_NONE (default) or BN_ACTIVATION_RELU */
  int32_t reserved0;        /* must be 0 (a later minor version may give it a meaning, 0 its default) */
  /* Since 1.2, the training variants (the Python API's forward_training(..., running_var_unbiased,
   * skip_nonfinite, ghost_batch, renorm)); a program setting them needs libbatchnorm >= 1.2
   * (find_package(batchnorm 1.2 CONFIG REQUIRED)): an older library refuses them (see above). */
  /* 1: running_var takes the biased batch variance (Keras, Flax); 0 (default): the unbiased one
   * (PyTorch). */
  int32_t running_var_biased;
  /* 1: a channel whose batch statistics are not finite keeps its running statistics bit for bit
   * (y is still computed, saved_mean / saved_invstd show the non-finite values); 0: off. */
  int32_t skip_nonfinite;
  /* Ghost batch norm (Hoffer et al. 2017): > 0, statistics per group of ghost_batch consecutive
   * samples along axis 0 (which must divide x.shape[0] and not be the channel axis), each
   * group normalized with its own; saved_mean / saved_invstd are then (x.shape[0] / ghost_batch,
   * C) contiguous arrays; the running statistics are updated once, with the whole batch's.
   * 0: off. */
  int64_t ghost_batch;
  /* Batch renormalization (Ioffe 2017): on when renorm_rmax or renorm_dmax is nonzero (then
   * rmax >= 1, dmax >= 0); y = (x_hat * r + d) * weight + bias with r = clip(sigma_B / sigma_run,
   * 1/rmax, rmax), d = clip((mu_B - mu_run) / sigma_run, -dmax, dmax) from the running
   * statistics before this call's update (required). r and d are written into renorm_r_out and
   * renorm_d_out ((C,) contiguous, the accumulation dtype; required with renorm), which
   * bn_backward_ex takes as constants. Not with ghost_batch. */
  double renorm_rmax;
  double renorm_dmax;
  DLTensor* renorm_r_out;
  DLTensor* renorm_d_out;
} bn_training_options;

/* Options of bn_forward_inference_ex. */
typedef struct {
  size_t struct_size;       /* sizeof(bn_inference_options) of the caller's header */
  const DLTensor* residual; /* optional, as in bn_training_options */
  int32_t activation;       /* a bn_activation */
  int32_t reserved0;        /* must be 0 */
} bn_inference_options;

/* Options of bn_backward_ex: the gradients of the fused forward. */
typedef struct {
  size_t struct_size; /* sizeof(bn_backward_options) of the caller's header */
  /* With BN_ACTIVATION_RELU: the fused forward's output (x's shape and dtype), which gives the
   * ReLU's mask (the gradient passes where y > 0). NULL with BN_ACTIVATION_NONE. */
  const DLTensor* y;
  /* Optional output: the residual's gradient (dy through the activation), x's shape and dtype,
   * any strides; may be dy itself. With BN_ACTIVATION_RELU and no dresidual_out, `out` must not
   * be x (the masked gradient is staged in it before x is read). */
  DLTensor* dresidual_out;
  int32_t activation; /* the forward's bn_activation */
  int32_t reserved0;  /* must be 0 */
  /* Since 1.2: the gradients of a training-variant forward. renorm_r / renorm_d: the batch-renorm
   * forward's r and d ((C,), any float dtype; both or neither), constants to the gradient:
   * dweight = sum(g * (x_hat * r + d)). ghost_batch: the ghost forward's group size, with
   * saved_mean / saved_invstd its (x.shape[0] / ghost_batch, C) statistics; 0: off. */
  const DLTensor* renorm_r;
  const DLTensor* renorm_d;
  int64_t ghost_batch;
} bn_backward_options;

/* Initializers giving every option its default: `bn_training_options o = BN_TRAINING_OPTIONS_INIT;`
 * (C99 and C++). */
#define BN_TRAINING_OPTIONS_INIT \
  {sizeof(bn_training_options), NULL, BN_ACTIVATION_NONE, 0, 0, 0, 0, 0.0, 0.0, NULL, NULL}
#define BN_INFERENCE_OPTIONS_INIT {sizeof(bn_inference_options), NULL, BN_ACTIVATION_NONE, 0}
#define BN_BACKWARD_OPTIONS_INIT {sizeof(bn_backward_options), NULL, NULL, BN_ACTIVATION_NONE, 0, NULL, NULL, 0}

/* bn_forward_training with options: y = act(bn(x) + residual) with the batch statistics.
 * saved_mean / saved_invstd are those of bn(x) alone (what bn_backward_ex takes). */
BN_API bn_status bn_forward_training_ex(const DLTensor* x, const DLTensor* weight, const DLTensor* bias,
                                        DLTensor* running_mean, DLTensor* running_var, double momentum,
                                        double eps, int axis, const bn_training_options* options, DLTensor* out,
                                        DLTensor* saved_mean, DLTensor* saved_invstd, void* stream);

/* bn_forward_inference with options: y = act(bn(x) + residual) with the given statistics. */
BN_API bn_status bn_forward_inference_ex(const DLTensor* x, const DLTensor* mean, const DLTensor* var,
                                         const DLTensor* weight, const DLTensor* bias, double eps, int axis,
                                         const bn_inference_options* options, DLTensor* out, void* stream);

/* bn_backward with options: the gradients of bn_forward_training_ex's y in x (into out), weight
 * and bias, and (into options->dresidual_out when given) in the residual. dy is the gradient
 * of the fused output; dweight and dbias are sum(g * x_hat) and sum(g) of g = dy through the
 * activation. */
BN_API bn_status bn_backward_ex(const DLTensor* dy, const DLTensor* x, const DLTensor* saved_mean,
                                const DLTensor* saved_invstd, const DLTensor* weight, int axis,
                                const bn_backward_options* options, DLTensor* out, DLTensor* dweight,
                                DLTensor* dbias, void* stream);

/* The process-wide thread count of the CPU kernels (shared with the Python module when both
 * are loaded from the same installation). n must be >= 1. */
BN_API bn_status bn_set_num_threads(int n);
BN_API int bn_get_num_threads(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* BATCHNORM_BATCHNORM_H_ */
