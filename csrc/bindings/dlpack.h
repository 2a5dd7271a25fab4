// The binding's one door for arrays: imports any argument (a NumPy array directly, anything
// else through DLPack by the spec) into a TensorView that keeps its producer alive, and
// allocates outputs either as NumPy arrays or as `Buffer`s that export themselves through
// DLPack to the caller's array library. Nothing here is Python-free: it is binding code.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dlpack.h"
#include "core/ops.h"
#include "core/tensor.h"

namespace batchnorm::binding {

namespace py = pybind11;

// DLPack ABI: DLDevice, DLDataType and DLTensor come from the public C header (via
// core/dlpack.h); the managed tensors and capsule flags of dlpack.h v1.x are written here.
extern "C" {
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;
  DLTensor dl_tensor;
};
}
constexpr uint64_t kDLFlagReadOnly = 1;

// An imported argument: its view plus whatever keeps the memory alive. Destroy with the GIL
// held (producers' deleters may touch Python objects).
struct Imported {
  TensorView view;
  py::object keep;  // the NumPy array, or the DLPack capsule
  DLManagedTensor* legacy = nullptr;
  DLManagedTensorVersioned* versioned = nullptr;
  Imported() = default;
  Imported(const Imported&) = delete;
  Imported& operator=(const Imported&) = delete;
  ~Imported();
};
using ImportedPtr = std::unique_ptr<Imported>;

// The name of obj's type, for errors ("list", "Tensor").
std::string type_name(py::handle obj);

// The device an argument lives on, without importing it (for stream choice and checks).
// None -> nullopt-like: returns false. `arg` names the argument in errors.
bool array_device(py::handle obj, Device& device, const char* arg = "array");

// Imports `obj` (None gives an undefined view). `stream` is the consumer stream passed to
// __dlpack__ for CUDA producers (DLPack convention: 1 = legacy default stream).
// Objects that are neither NumPy arrays nor DLPack producers are converted with
// numpy.asarray when `allow_asarray` (read-only inputs), else rejected with a TypeError.
ImportedPtr import_array(py::handle obj, const char* arg, int64_t stream, bool allow_asarray);

// An output allocated as the core's spec says: like an input (its shape, dense in the stride
// order of spec.order, else of spec.like) or contiguous of the spec's shape. as_numpy: a NumPy
// array owning its memory; otherwise a Buffer (DLPack producer). `stream_owner` (None or
// null: none) is the Python object owning `stream`, kept alive while the memory lives, since
// its free is queued on that stream.
struct Output {
  py::object object;
  TensorView view;
};
Output allocate(const OutputSpec& spec, bool as_numpy, int64_t stream, py::handle stream_owner = py::handle());

void register_buffer(py::module_& m);

}  // namespace batchnorm::binding
