// DLPack and NumPy import of arguments, and output allocation with DLPack export (see
// dlpack.h). The consumer side follows the DLPack spec: __dlpack_device__ first, then
// __dlpack__(stream=..., max_version=(1, 1)) with an unversioned retry on TypeError, both
// capsule names accepted and renamed to used_*, the deleter owned and called once, NULL
// strides read as C order, byte_offset added, READ_ONLY honoured, lanes == 1 required.
#include "bindings/dlpack.h"

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <string>

#include "core/errors.h"
#include "core/memory.h"

namespace batchnorm::binding {

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>(); }

namespace {

// NumPy's dtype.isnative from the descriptor's byte-order character ('=' native, '|' not
// applicable, '<' / '>' explicit): the attribute lookup cost 0.2-0.4 us an array.
bool native_byte_order(char order) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  constexpr char native = '>';
#else
  constexpr char native = '<';
#endif
  return order == '=' || order == '|' || order == native;
}

void import_numpy(Imported& imp, const py::array& a, const char* arg) {
  const py::dtype dt = a.dtype();
  const char kind = dt.kind();
  const ssize_t item = dt.itemsize();
  TensorView& v = imp.view;
  // NumPy's IEEE floats are DLPack's (kDLFloat, 8 * itemsize); ml_dtypes' bfloat16 (kind 'V')
  // is known by its name, looked up only when the cheap test fails.
  const DTypeInfo* row = kind == 'f' ? find_dtype(kDLFloat, static_cast<uint8_t>(8 * item)) : nullptr;
  if (!row && item == 2) row = find_dtype(py::str(dt.attr("name")).cast<std::string>());
  if (!row) unsupported_dtype(arg, py::str(dt.attr("name")).cast<std::string>());
  v.dtype = row->dtype;
  // The kernels read and write native-endian values; a byte-swapped array would be read as
  // garbage (and an out= filled with bytes in the wrong order), so it is refused, not copied.
  if (!native_byte_order(dt.byteorder())) {
    const std::string name = py::str(dt.attr("name")).cast<std::string>();
    throw type_error(detail::concat(arg, " must have native byte order (", name, "), got the byte-swapped dtype '",
                                    py::str(dt.attr("str")).cast<std::string>(), "'; convert it with ", arg,
                                    ".astype('", name, "')"));
  }
  BN_EXPECTS(a.ndim() <= kMaxDims, value_error, arg, " must have at most ", kMaxDims, " dimensions, got ", a.ndim());
  v.ndim = static_cast<int>(a.ndim());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = a.shape(i);
    const ssize_t s = a.strides(i);
    BN_EXPECTS(s % item == 0, value_error, arg, " must have strides that are multiples of its item size (", item,
               " bytes), got a stride of ", s, " bytes");
    v.strides[i] = s / item;
  }
  v.data = const_cast<void*>(a.data());
  v.read_only = !a.writeable();
  v.device = Device{DeviceKind::cpu, 0};
  imp.keep = py::reinterpret_borrow<py::object>(a);
}

void import_capsule(Imported& imp, py::object cap, const char* arg, py::handle producer = py::handle());

// The message of a Python exception alone: pybind11's what() appends an "At:" traceback.
std::string exception_message(const py::error_already_set& e) {
  return py::str(e.value()).cast<std::string>();
}

// obj.__dlpack_device__(), or a TypeError naming the argument where the producer cannot say
// (torch raises a ValueError for its meta device).
py::tuple dlpack_device(py::handle obj, const char* arg) {
  try {
    return obj.attr("__dlpack_device__")();
  } catch (py::error_already_set& e) {
    throw type_error(detail::concat(arg, " must be on the CPU or a CUDA device, got an array whose DLPack device ",
                                    "is unknown: ", exception_message(e)));
  }
}

void import_dlpack(Imported& imp, py::handle obj, const char* arg, int64_t stream) {
  // torch refuses to export a tensor that requires grad; say why and what to use instead.
  if (py::hasattr(obj, "requires_grad") && py::bool_(obj.attr("requires_grad"))) {
    throw type_error(detail::concat(arg, " must not require grad: batchnorm's array functions record no autograd ",
                                    "graph; train with batchnorm.torch (BatchNorm2d, convert), or pass ", arg,
                                    ".detach()"));
  }
  const py::tuple dev = dlpack_device(obj, arg);
  const int32_t dev_type = dev[0].cast<int32_t>();
  const int32_t dev_id = dev[1].cast<int32_t>();
  device_of_dlpack(dev_type, dev_id, arg);  // reject unsupported devices before any export
  const bool cuda = dev_type == kDLCUDA || dev_type == kDLCUDAManaged;
  py::object s = cuda ? py::object(py::int_(stream)) : py::object(py::none());
  py::object cap;
  try {
    cap = obj.attr("__dlpack__")(py::arg("stream") = s, py::arg("max_version") = py::make_tuple(1, 1));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw type_error(detail::concat(arg, " could not be exported through DLPack: ", exception_message(e)));
    try {
      cap = obj.attr("__dlpack__")(py::arg("stream") = s);
    } catch (py::error_already_set& e2) {
      throw type_error(detail::concat(arg, " could not be exported through DLPack: ", exception_message(e2)));
    }
  }
  import_capsule(imp, cap, arg, obj);
}

// CuPy up to at least 14.2 exports a negative stride of -s bytes as (2^64 - s) / itemsize
// (unsigned division: cupy/cupy#10172), so flipped arrays (cupy.flip, x[::-1]) arrive with
// strides past any address space. When the producer's own byte strides (`.strides`, as NumPy
// and CuPy have them) explain every DLPack stride exactly, either equal or in that pattern,
// `fixed` gets the true element strides. Anything unexpected there (no such attribute, not a
// tuple of ints) leaves the strides unrepaired, to be refused.
bool repair_unsigned_strides(const DLTensor& t, py::handle producer, int64_t* fixed) {
  int64_t byte_strides[kMaxDims];
  try {
    if (!producer || !py::hasattr(producer, "strides")) return false;
    py::object given = producer.attr("strides");
    if (!py::isinstance<py::tuple>(given) || py::len(given) != static_cast<size_t>(t.ndim)) return false;
    for (int i = 0; i < t.ndim; ++i) byte_strides[i] = py::reinterpret_borrow<py::tuple>(given)[i].cast<int64_t>();
  } catch (const py::error_already_set&) {
    return false;
  } catch (const py::cast_error&) {
    return false;
  }
  const auto es = static_cast<int64_t>(dl_itemsize(t.dtype));
  bool repaired = false;
  for (int i = 0; i < t.ndim; ++i) {
    const int64_t bytes = byte_strides[i];
    if (es == 0 || bytes % es != 0) return false;
    fixed[i] = bytes / es;
    if (fixed[i] == t.strides[i] || t.shape[i] <= 1) continue;
    if (bytes >= 0 || static_cast<uint64_t>(bytes) / static_cast<uint64_t>(es) != static_cast<uint64_t>(t.strides[i]))
      return false;
    repaired = true;
  }
  return repaired;
}

// A capsule from __dlpack__ or handed over as it is (torch.utils.dlpack.to_dlpack's, which
// the Python layer uses for torch tensors on the stream the call runs on).
void import_capsule(Imported& imp, py::object cap, const char* arg, py::handle producer) {
  PyObject* c = cap.ptr();
  DLTensor* t = nullptr;
  uint64_t flags = 0;
  if (PyCapsule_IsValid(c, "dltensor_versioned")) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, "dltensor_versioned"));
    BN_EXPECTS(m->version.major == 1, type_error, arg, " exported DLPack version ", m->version.major, ".",
               m->version.minor, "; batchnorm reads version 1.x");
    PyCapsule_SetName(c, "used_dltensor_versioned");
    imp.versioned = m;
    t = &m->dl_tensor;
    flags = m->flags;
  } else if (PyCapsule_IsValid(c, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
    PyCapsule_SetName(c, "used_dltensor");
    imp.legacy = m;
    t = &m->dl_tensor;
  } else {
    // A capsule already imported (by this library or any other consumer) is renamed "used_...":
    // say so, rather than that it is no DLPack capsule.
    const char* name = PyCapsule_CheckExact(c) ? PyCapsule_GetName(c) : nullptr;
    const std::string named = name ? name : "";
    if (named == "used_dltensor" || named == "used_dltensor_versioned")
      throw type_error(detail::concat(arg, " is a DLPack capsule that was already consumed (a capsule can be imported "
                                      "only once, also by a call that then failed): pass the array itself, or a new "
                                      "capsule from its __dlpack__()"));
    if (!producer && name)
      throw type_error(detail::concat(arg, " must be a DLPack capsule named 'dltensor' or 'dltensor_versioned', got "
                                      "a capsule named '", named, "'"));
    throw type_error(detail::concat(arg, ".__dlpack__() must return a DLPack capsule, got a ", type_name(cap)));
  }
  imp.keep = cap;
  int64_t fixed[kMaxDims];
  if (t->ndim <= kMaxDims && strides_beyond_memory(*t) && repair_unsigned_strides(*t, producer, fixed)) {
    DLTensor repaired = *t;
    repaired.strides = fixed;
    imp.view = view_of_dltensor(repaired, arg);
  } else {
    imp.view = view_of_dltensor(*t, arg);
  }
  imp.view.read_only = (flags & kDLFlagReadOnly) != 0;
}

// ---- output memory ----------------------------------------------------------------------

struct Memory {
  void* ptr = nullptr;   // the allocation, freed as such
  std::size_t offset = 0;  // bytes from ptr to the result's first element
  Device device;
  int64_t stream = 0;
  // The Python object that owns `stream` (a CuPy or torch stream), held so that the stream
  // outlives this memory, whose free is queued on it: CuPy destroys a stream with its object,
  // and a free queued on a destroyed stream crashed (H200, a result dropped after its stream).
  PyObject* stream_owner = nullptr;
  // A destructor must not throw: a CUDA error while freeing (e.g. after an earlier kernel
  // fault) is dropped here rather than terminating the process; the next CUDA call reports it.
  ~Memory() {
    try {
      deallocate(device, ptr, reinterpret_cast<void*>(stream));
    } catch (...) {
    }
    // DLPack consumers may drop the memory on any thread, with or without the GIL; once the
    // interpreter is finalizing, the reference is left to it.
    if (stream_owner && Py_IsInitialized() && !finalizing()) {
      py::gil_scoped_acquire gil;
      Py_DECREF(stream_owner);
    }
  }
  void* data() const { return static_cast<char*>(ptr) + offset; }
  static bool finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
  }
};

struct Buffer {
  std::shared_ptr<Memory> memory;
  DType dtype = DType::float32;
  std::vector<int64_t> shape, strides;
};

struct ExportContext {
  std::shared_ptr<Memory> memory;
  std::vector<int64_t> shape, strides;
};

DLDataType dl_dtype(DType d) { return {dtype_info(d).dlpack_code, dtype_info(d).dlpack_bits, 1}; }

template <class M>
void fill_managed(M* m, ExportContext* ctx, const Buffer& b) {
  m->manager_ctx = ctx;
  DLTensor& t = m->dl_tensor;
  t.data = ctx->memory->data();
  t.device = b.memory->device.kind == DeviceKind::cuda ? DLDevice{kDLCUDA, b.memory->device.index} : DLDevice{kDLCPU, 0};
  t.ndim = static_cast<int32_t>(ctx->shape.size());
  t.dtype = dl_dtype(b.dtype);
  t.shape = ctx->shape.data();
  t.strides = ctx->strides.data();
  t.byte_offset = 0;
}

void delete_versioned(DLManagedTensorVersioned* m) {
  delete static_cast<ExportContext*>(m->manager_ctx);
  delete m;
}
void delete_legacy(DLManagedTensor* m) {
  delete static_cast<ExportContext*>(m->manager_ctx);
  delete m;
}
void capsule_versioned(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"));
    if (m && m->deleter) m->deleter(m);
  }
}
void capsule_legacy(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (m && m->deleter) m->deleter(m);
  }
}

py::object export_buffer(const Buffer& b, py::object stream, py::object max_version, py::object dl_device,
                         py::object copy) {
  if (!copy.is_none() && copy.cast<bool>())
    throw py::buffer_error("batchnorm.Buffer exports without copying; copy=True is not supported");
  if (!dl_device.is_none()) {
    const py::tuple d = dl_device;
    const Device& mine = b.memory->device;
    const int32_t want = d[0].cast<int32_t>();
    const bool same = (mine.kind == DeviceKind::cpu && want == kDLCPU) ||
                      (mine.kind == DeviceKind::cuda && want == kDLCUDA && d[1].cast<int>() == mine.index);
    if (!same) throw py::buffer_error("batchnorm.Buffer cannot be exported to another device");
  }
  if (b.memory->device.kind == DeviceKind::cuda && !stream.is_none()) {
    const int64_t consumer = stream.cast<int64_t>();
    if (consumer != -1 && consumer != b.memory->stream)
      stream_wait(b.memory->device, reinterpret_cast<void*>(b.memory->stream), reinterpret_cast<void*>(consumer));
  }
  auto* ctx = new ExportContext{b.memory, b.shape, b.strides};
  bool versioned = false;
  if (!max_version.is_none()) {
    const py::tuple mv = max_version;
    versioned = mv.size() >= 1 && mv[0].cast<int>() >= 1;
  }
  if (versioned) {
    auto* m = new DLManagedTensorVersioned{};
    m->version = {1, 1};
    m->deleter = delete_versioned;
    m->flags = 0;
    fill_managed(m, ctx, b);
    return py::reinterpret_steal<py::object>(PyCapsule_New(m, "dltensor_versioned", capsule_versioned));
  }
  auto* m = new DLManagedTensor{};
  m->deleter = delete_legacy;
  fill_managed(m, ctx, b);
  return py::reinterpret_steal<py::object>(PyCapsule_New(m, "dltensor", capsule_legacy));
}

// Dense strides of `shape` laid out in the order of `like`'s strides (outermost = largest).
std::vector<int64_t> dense_strides_like(const TensorView& like) {
  std::vector<int> order(like.ndim);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return std::llabs(like.strides[a]) > std::llabs(like.strides[b]); });
  std::vector<int64_t> strides(like.ndim);
  int64_t s = 1;
  for (int i = like.ndim - 1; i >= 0; --i) {
    strides[order[i]] = s;
    s *= std::max<int64_t>(like.shape[order[i]], 1);
  }
  return strides;
}

// NumPy knows three of the four by name; bfloat16 comes from ml_dtypes. Each is looked up
// once (parsing the name cost 0.4 us a result) and kept for the life of the process: the
// references are never released, so no Python object is destroyed after the interpreter.
py::dtype numpy_dtype(DType d) {
  static PyObject* known[kNumDTypes] = {};
  PyObject*& slot = known[static_cast<int>(d)];
  if (slot == nullptr) {
    py::dtype dt;
    if (d != DType::bfloat16) {
      dt = py::dtype(dtype_name(d));
    } else {
      try {
        dt = py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
      } catch (py::error_already_set&) {
        throw type_error("a bfloat16 NumPy result needs the ml_dtypes package (pip install ml_dtypes)");
      }
    }
    slot = dt.release().ptr();
  }
  return py::reinterpret_borrow<py::dtype>(slot);
}

// `offset`: bytes from the allocation to the first element (an input's misalignment, given by
// allocate below; 0 on a GPU).
Output make_output(std::vector<int64_t> shape, std::vector<int64_t> strides, DType dtype, const Device& device,
                   bool as_numpy, int64_t stream, py::handle stream_owner, std::size_t offset = 0) {
  // (Every input's bytes fit an int64, view_of_dltensor; checked again here, where a wrapped
  // size would be a buffer the kernels write past.)
  int64_t n = 1;
  bool wraps = false;
  for (int64_t s : shape) wraps |= __builtin_mul_overflow(n, s, &n);
  std::size_t bytes = 0;
  wraps |= __builtin_mul_overflow(static_cast<std::size_t>(n), dtype_size(dtype), &bytes) ||
           __builtin_add_overflow(bytes, offset, &bytes);
  if (wraps) throw std::runtime_error("batchnorm internal error: an output's size does not fit 64 bits");
  auto mem = std::make_shared<Memory>();
  mem->device = device;
  mem->stream = stream;
  mem->ptr = allocate(device, bytes, reinterpret_cast<void*>(stream));
  mem->offset = offset;
  if (device.kind == DeviceKind::cuda && stream_owner && !stream_owner.is_none())
    mem->stream_owner = stream_owner.inc_ref().ptr();
  Output out;
  TensorView& v = out.view;
  v.data = mem->data();
  v.dtype = dtype;
  v.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  v.device = device;
  if (as_numpy && device.kind == DeviceKind::cpu) {
    const py::dtype dt = numpy_dtype(dtype);
    std::vector<ssize_t> byte_strides(strides.size());
    for (size_t i = 0; i < strides.size(); ++i) byte_strides[i] = strides[i] * static_cast<ssize_t>(dtype_size(dtype));
    auto* holder = new std::shared_ptr<Memory>(mem);
    py::capsule owner(holder, [](void* p) { delete static_cast<std::shared_ptr<Memory>*>(p); });
    out.object = py::array(dt, std::vector<ssize_t>(shape.begin(), shape.end()), byte_strides, mem->data(), owner);
  } else {
    Buffer b{mem, dtype, std::move(shape), std::move(strides)};
    out.object = py::cast(std::move(b));
  }
  return out;
}

// A small contiguous result (the per-channel statistics and gradients) in memory NumPy
// allocates: no alignment to match, and our Memory + capsule + array cost 0.7 us against
// NumPy's 0.15 (two of them a training or backward call). Large ones stay with the host
// cache, which keeps their pages.
Output numpy_output(const std::vector<int64_t>& shape, DType dtype) {
  Output out;
  py::array a(numpy_dtype(dtype), std::vector<ssize_t>(shape.begin(), shape.end()));
  TensorView& v = out.view;
  v.data = a.mutable_data();
  v.dtype = dtype;
  v.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = shape[i];
    v.strides[i] = a.strides(i) / static_cast<ssize_t>(dtype_size(dtype));
  }
  v.device = Device{DeviceKind::cpu, 0};
  out.object = std::move(a);
  return out;
}

// NumPy's masked arrays are ndarrays whose data the kernels would read whole, masked values
// included (statistics over invalid readings, a NaN channel): refused rather than silently
// misread. Only subclasses are tested (an exact ndarray costs one type comparison); numpy.ma is
// imported, once, when one comes.
void refuse_masked(py::handle obj, const char* arg) {
  if (Py_TYPE(obj.ptr()) == py::detail::npy_api::get().PyArray_Type_) return;
  static py::handle masked = py::object(py::module_::import("numpy.ma").attr("MaskedArray")).release();
  const int is_masked = PyObject_IsInstance(obj.ptr(), masked.ptr());
  if (is_masked < 0) throw py::error_already_set();
  if (is_masked)
    throw type_error(detail::concat(arg, " must be a plain NumPy array, got a masked array (numpy.ma.MaskedArray), "
                                    "whose mask would be ignored: pass ", arg, ".filled(value), or ", arg,
                                    ".data to use every value"));
}

}  // namespace

Imported::~Imported() {
  if (versioned && versioned->deleter) versioned->deleter(versioned);
  else if (legacy && legacy->deleter) legacy->deleter(legacy);
}

bool array_device(py::handle obj, Device& device, const char* arg) {
  if (obj.is_none()) return false;
  if (!py::isinstance<py::array>(obj) && py::hasattr(obj, "__dlpack_device__")) {
    const py::tuple dev = dlpack_device(obj, arg);
    device = device_of_dlpack(dev[0].cast<int32_t>(), dev[1].cast<int32_t>(), arg);
  } else {
    device = Device{DeviceKind::cpu, 0};
  }
  return true;
}

ImportedPtr import_array(py::handle obj, const char* arg, int64_t stream, bool allow_asarray) {
  auto imp = std::make_unique<Imported>();
  if (obj.is_none()) return imp;
  // Capsules before the attribute tests: a failed hasattr raises and formats an AttributeError
  // (0.5 us), paid by every torch tensor the Python layer hands over as a capsule.
  if (py::isinstance<py::array>(obj)) {
    refuse_masked(obj, arg);
    import_numpy(*imp, py::reinterpret_borrow<py::array>(obj), arg);
  } else if (PyCapsule_CheckExact(obj.ptr())) {
    import_capsule(*imp, py::reinterpret_borrow<py::object>(obj), arg);
  } else if (py::hasattr(obj, "__dlpack__") && py::hasattr(obj, "__dlpack_device__")) {
    import_dlpack(*imp, obj, arg, stream);
  } else if (allow_asarray && (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj) ||
                               py::hasattr(obj, "__array__") || py::hasattr(obj, "__array_interface__"))) {
    py::object a = py::module_::import("numpy").attr("asarray")(obj);
    import_numpy(*imp, py::reinterpret_borrow<py::array>(a), arg);
  } else {
    throw type_error(detail::concat(arg, " must be a NumPy array or an array supporting DLPack (__dlpack__), got ",
                                    type_name(obj)));
  }
  return imp;
}

// The offset past a 64-byte line at which a result laid out like `like` starts on the CPU:
// `like`'s own, when `like` is dense in that layout with elements of the result's size, so
// that the kernels' vectors fall on the same lines in both (they align the output; an input
// 16 bytes past a line, as NumPy's large arrays are, then had every vector straddle two lines
// under AVX-512). AMD EPYC Zen 4, tools/ab_lib, x 16 bytes past a line, 1 thread, hot, the
// output at 0 against at 16: channels-last inference 8192x64 1.09x the time, 2048x256 1.11x,
// 8x28x28x64 1.06-1.09x, training 8192x64 1.02-1.04x; channels-first and data from memory
// 0.95-1.08x, as between two identical outputs (noise).
std::size_t offset_like(const TensorView& like, const std::vector<int64_t>& strides, DType dtype,
                        const Device& device) {
  const auto item = static_cast<uintptr_t>(dtype_size(dtype));
  const auto at = reinterpret_cast<uintptr_t>(like.data) % 64;
  if (device.kind != DeviceKind::cpu || dtype_size(like.dtype) != dtype_size(dtype) || at % item != 0 ||
      static_cast<size_t>(like.ndim) != strides.size())
    return 0;
  for (int i = 0; i < like.ndim; ++i)
    if (like.shape[i] > 1 && like.strides[i] != strides[i]) return 0;
  return at;
}

Output allocate(const OutputSpec& spec, bool as_numpy, int64_t stream, py::handle stream_owner) {
  if (spec.like) {
    const TensorView& order = spec.order ? *spec.order : *spec.like;
    std::vector<int64_t> strides = dense_strides_like(order);
    const std::size_t offset = offset_like(*spec.like, strides, spec.dtype, spec.device);
    return make_output(std::vector<int64_t>(order.shape, order.shape + order.ndim), std::move(strides), spec.dtype,
                       spec.device, as_numpy, stream, stream_owner, offset);
  }
  std::vector<int64_t> shape(spec.shape, spec.shape + spec.ndim), strides(spec.ndim, 1);
  for (int d = spec.ndim - 2; d >= 0; --d) strides[d] = strides[d + 1] * shape[d + 1];
  const int64_t bytes = (spec.ndim ? strides[0] * shape[0] : 1) * static_cast<int64_t>(dtype_size(spec.dtype));
  if (as_numpy && spec.device.kind == DeviceKind::cpu && bytes < static_cast<int64_t>(kHostCachedMinBytes))
    return numpy_output(shape, spec.dtype);
  return make_output(std::move(shape), std::move(strides), spec.dtype, spec.device, as_numpy, stream, stream_owner);
}

void register_buffer(py::module_& m) {
  py::class_<Buffer>(m, "Buffer",
                     "Memory allocated by batchnorm for a result, handed to the caller's array library "
                     "through DLPack (zero-copy).")
      .def("__dlpack__", &export_buffer, py::kw_only(), py::arg("stream") = py::none(),
           py::arg("max_version") = py::none(), py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__",
           [](const Buffer& b) {
             const Device& d = b.memory->device;
             const int type = d.kind == DeviceKind::cuda ? kDLCUDA : kDLCPU;
             const int index = d.kind == DeviceKind::cuda ? d.index : 0;
             return py::make_tuple(type, index);
           })
      .def_property_readonly("shape", [](const Buffer& b) { return py::tuple(py::cast(b.shape)); })
      .def_property_readonly("dtype", [](const Buffer& b) { return dtype_name(b.dtype); });
}

}  // namespace batchnorm::binding
