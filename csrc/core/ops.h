// The core's public C++ API: one params struct per op of the contract (../shared/API.md),
// validated here and routed to the CPU or CUDA backend by the arrays' device. Each op's specs
// function says what outputs to allocate; an undefined TensorView (TensorView{}) means "not
// given". This header is what the Python binding, the C ABI and the JAX handlers consume.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/layout.h"
#include "core/tensor.h"

namespace batchnorm {

// Temporary device memory lent by the host framework (XLA's allocator inside an FFI call).
// The framework owns the blocks and keeps them valid for the work enqueued on the op's stream.
struct ScratchAllocator {
  void* (*allocate)(void* context, std::size_t bytes) = nullptr;  // returns null when out of memory
  void* context = nullptr;
};

// Where the work runs: the CUDA stream (cudaStream_t, as void* to keep CUDA headers out);
// null means the legacy default stream. Ignored on the CPU.
struct Exec {
  void* stream = nullptr;
  // When set, the CUDA backend takes its per-op workspace from here instead of its own pool.
  const ScratchAllocator* scratch = nullptr;
};

struct StatisticsParams {
  TensorView x;
  int axis = 1;
  // outputs: (C,), contiguous, in the accumulation dtype, or both float64 with `wide` (or
  // when mean is given in float64, the C ABI's way to ask): the kernels' float64 moments
  // unrounded, for shards that are merged later (across processes).
  TensorView mean, var;
  bool wide = false;
  Exec exec;
};

struct ForwardTrainingParams {
  TensorView x, weight, bias, running_mean, running_var;
  double momentum = 0.1;
  double eps = 1e-5;
  int axis = 1;
  TensorView y;                          // output, x's shape and dtype, any strides, may be x
  TensorView saved_mean, saved_invstd;   // outputs: (C,), accumulation dtype, contiguous
  // Given batch statistics (both or neither): the (C,) mean and biased variance of a batch of
  // batch_count values per channel of which x is a part (x may be empty), e.g. merged across
  // processes. x is then not reduced; everything else is as with its own statistics.
  TensorView batch_mean, batch_var;
  int64_t batch_count = 0;
  // Fused: y = act(bn(x) + residual); residual (optional) has x's shape and dtype, any strides.
  TensorView residual;
  Activation activation = Activation::none;
  // Training variants (API.md "Training variants"):
  // running_var takes the unbiased batch variance (PyTorch) or the biased one (Keras, Flax);
  bool running_var_unbiased = true;
  // a channel whose batch statistics are not finite keeps its running statistics bit for bit;
  bool skip_nonfinite = false;
  // batch renormalization (Ioffe 2017): needs the running statistics; r and d, outputs (C,) in
  // the accumulation dtype, contiguous, receive the per-channel corrections (constants to
  // backward);
  bool renorm = false;
  double renorm_rmax = 1.0, renorm_dmax = 0.0;
  TensorView renorm_r, renorm_d;
  // ghost batch norm: > 0, statistics per group of ghost_batch consecutive samples along axis
  // 0, saved_mean / saved_invstd then (N / ghost_batch, C); the running statistics are updated
  // once, with the whole batch's statistics.
  int64_t ghost_batch = 0;
  // Optional outputs, (C,) float64 contiguous: the batch mean and biased variance unrounded
  // (what ghost batch norm merges across its groups).
  TensorView moments_mean, moments_var;
  Exec exec;
};

struct ForwardInferenceParams {
  TensorView x, mean, var, weight, bias;
  double eps = 1e-5;
  int axis = 1;
  TensorView y;
  TensorView residual;  // fused: y = act(bn(x) + residual), as in ForwardTrainingParams
  Activation activation = Activation::none;
  Exec exec;
};

struct BackwardParams {
  TensorView dy, x, saved_mean, saved_invstd, weight;
  int axis = 1;
  TensorView dx;                  // output, x's shape and dtype, may be dy or x
  TensorView dweight, dbias;      // outputs: (C,), accumulation dtype, contiguous
  // The fused forward's gradients: with activation relu, y (its output, x's shape and dtype)
  // gives the mask; dresidual (optional output, x's shape and dtype, may be dy) receives the
  // residual's gradient, dy masked.
  TensorView y;
  Activation activation = Activation::none;
  TensorView dresidual;
  // Of a batch-renorm forward: its r and d ((C,), any float dtype), constants to the gradient.
  TensorView renorm_r, renorm_d;
  // Of a ghost-batch forward: the group size; saved_mean / saved_invstd are (N / ghost_batch, C).
  int64_t ghost_batch = 0;
  Exec exec;
};

// The backward pass in two steps, for statistics that span several processes (torch's
// batch_norm_backward_reduce / batch_norm_backward_elemt): the reduce step gives this
// shard's per-channel sums, which the caller adds up across shards; the elementwise step
// takes the totals and the total count. On one shard, the two give backward's bits.
struct BackwardReduceParams {
  TensorView dy, x, mean, invstd;  // mean / invstd: the forward's saved_mean / saved_invstd
  int axis = 1;
  TensorView sum_dy, sum_dy_xmu;  // outputs: (C,), float64, contiguous (zero for an empty x)
  TensorView dweight, dbias;      // outputs: (C,), accumulation dtype: this shard's gradients
  Exec exec;
};

struct BackwardElemtParams {
  TensorView dy, x, mean, invstd, weight;
  TensorView sum_dy, sum_dy_xmu;  // (C,), any float dtype: the sums over every shard
  int64_t count = 0;              // values per channel over every shard
  int axis = 1;
  TensorView dx;                  // output, x's shape and dtype, may be dy or x
  Exec exec;
};

struct MergeStatisticsParams {
  std::vector<TensorView> means, vars;
  std::vector<int64_t> counts;
  TensorView mean, var;  // outputs: (C,), accumulation dtype of the inputs, contiguous
  Exec exec;
};

struct FoldParams {
  TensorView kernel, conv_bias, mean, var, weight, bias;
  double eps = 1e-5;
  int axis = 0;
  TensorView kernel_out;  // kernel's shape and dtype
  TensorView bias_out;    // (C,), kernel's dtype, contiguous
  Exec exec;
};

// ---- validate, then execute ------------------------------------------------------------
// Each op is two steps (oneDNN's primitive descriptor, then execute). `<op>_specs(p)` checks
// every argument that is not an output and returns the outputs' specs: the one place where
// output shapes and dtypes are decided. `<op>(p, specs)` checks each given output against its
// spec and runs. A caller that allocates outputs (the Python binding, the JAX trace checks)
// asks for the specs first; `<op>(p)` does both steps, for callers that bring every output.

// An output as the op sizes it: a contiguous (shape[0],) or (shape[0], shape[1]) array of
// `dtype` on `device`; or, with `like`, an array of like's shape, dtype and device in any
// strides (allocated in `order`'s memory order). Neither (ndim 0, no like): the call does not
// produce it (the op refuses it when given, in its own words).
struct OutputSpec {
  int ndim = 0;
  int64_t shape[2] = {0, 0};
  DType dtype = DType::float32;
  Device device{};
  const TensorView* like = nullptr;  // an input of the params the spec was made from
  const char* like_name = nullptr;   // its name in messages ("x")
  const TensorView* order = nullptr;  // whose memory order an allocation takes (like's when null)
  bool produced() const { return ndim > 0 || like != nullptr; }
};

// The specs structs hold `axis`, the channel axis in [0, ndim), where the op has one; the
// specs of `like` outputs point into the params they were made from, which must outlive them
// with their inputs unchanged.
struct StatisticsSpecs {
  int axis = 0;
  OutputSpec mean, var;
};
struct ForwardTrainingSpecs {
  int axis = 0;
  OutputSpec y, saved_mean, saved_invstd;
  OutputSpec renorm_r, renorm_d;         // with renorm only
  OutputSpec moments_mean, moments_var;  // optional: written when given
};
struct ForwardInferenceSpecs {
  int axis = 0;
  OutputSpec y;
};
struct BackwardSpecs {
  int axis = 0;
  OutputSpec dx, dweight, dbias;
  OutputSpec dresidual;  // optional: written when given
};
struct BackwardReduceSpecs {
  int axis = 0;
  OutputSpec sum_dy, sum_dy_xmu, dweight, dbias;
};
struct BackwardElemtSpecs {
  int axis = 0;
  OutputSpec dx;
};
struct MergeStatisticsSpecs {  // per-channel inputs: no axis
  OutputSpec mean, var;
  int64_t total = 0;  // the values per channel over every shard
};
struct FoldSpecs {
  int axis = 0;
  OutputSpec kernel_out, bias_out;
};

StatisticsSpecs statistics_specs(const StatisticsParams& p);
ForwardTrainingSpecs forward_training_specs(const ForwardTrainingParams& p);
ForwardInferenceSpecs forward_inference_specs(const ForwardInferenceParams& p);
BackwardSpecs backward_specs(const BackwardParams& p);
BackwardReduceSpecs backward_reduce_specs(const BackwardReduceParams& p);
BackwardElemtSpecs backward_elemt_specs(const BackwardElemtParams& p);
MergeStatisticsSpecs merge_statistics_specs(const MergeStatisticsParams& p);
FoldSpecs fold_specs(const FoldParams& p);

// Each returns after the work is done on the CPU, or enqueued on exec.stream on a GPU.
// statistics returns the count per channel, merge_statistics the total count. The overloads
// with specs take those `<op>_specs(p)` returned for these very params.
int64_t statistics(const StatisticsParams& p, const StatisticsSpecs& specs);
void forward_training(const ForwardTrainingParams& p, const ForwardTrainingSpecs& specs);
void forward_inference(const ForwardInferenceParams& p, const ForwardInferenceSpecs& specs);
void backward(const BackwardParams& p, const BackwardSpecs& specs);
void backward_reduce(const BackwardReduceParams& p, const BackwardReduceSpecs& specs);
void backward_elemt(const BackwardElemtParams& p, const BackwardElemtSpecs& specs);
int64_t merge_statistics(const MergeStatisticsParams& p, const MergeStatisticsSpecs& specs);
void fold(const FoldParams& p, const FoldSpecs& specs);
// The one-step forms: validate, then run (inline, so a module calling the core through the
// bridge, bindings/core_client.cpp, gets them too).
inline int64_t statistics(const StatisticsParams& p) { return statistics(p, statistics_specs(p)); }
inline void forward_training(const ForwardTrainingParams& p) { forward_training(p, forward_training_specs(p)); }
inline void forward_inference(const ForwardInferenceParams& p) { forward_inference(p, forward_inference_specs(p)); }
inline void backward(const BackwardParams& p) { backward(p, backward_specs(p)); }
inline void backward_reduce(const BackwardReduceParams& p) { backward_reduce(p, backward_reduce_specs(p)); }
inline void backward_elemt(const BackwardElemtParams& p) { backward_elemt(p, backward_elemt_specs(p)); }
inline int64_t merge_statistics(const MergeStatisticsParams& p) {
  return merge_statistics(p, merge_statistics_specs(p));
}
inline void fold(const FoldParams& p) { fold(p, fold_specs(p)); }

// Process-wide CPU thread count (>= 1; ValueError otherwise).
void set_num_threads(int n);
int get_num_threads();

// Checks the environment variables the library reads (BATCHNORM_ISA, BATCHNORM_STREAM_BYTES)
// and throws value_error naming the variable and its valid values; called at import.
void check_environment();

// Testing hook: outputs larger than `bytes` are written with non-temporal stores; a negative
// value restores the default (stream_threshold_bytes below).
void set_stream_threshold_bytes(int64_t bytes);
// The threshold in force: the hook's, else BATCHNORM_STREAM_BYTES, else the last-level cache
// capped at 32 MiB per CPU this process may run on, and at those CPUs' L2s where the store
// probe says regular stores do not pay (cpu/plan.h says why).
int64_t stream_threshold_bytes();
// The store probe's time ratio, streamed over regular stores (measured on the first call; 0
// where not measured).
double store_probe_ratio();

struct CudaInfo {
  bool compiled = false;
  bool available = false;
  std::vector<std::string> devices;
  std::string reason;
};
std::string simd_level();  // the CPU ISA level in use: "avx512_bf16", "avx512", "avx2" or "baseline"
CudaInfo cuda_info();

}  // namespace batchnorm
