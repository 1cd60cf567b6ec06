// A small typed tensor view for the entry points (CPU and CUDA): a tensor
// crosses the Python boundary as a DLPack capsule (torch.utils.dlpack.to_dlpack),
// whose DLTensor gives the data pointer, dtype, device, shape and strides. Each
// entry point reads its tensors once, checks them (dtype, device, rank,
// shapes that must agree) and then works on raw pointers. No torch headers:
// the DLPack structs below follow the DLPack ABI (v0.x "dltensor" capsules).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace fisherfast {

namespace dlpack {
struct Device {
  std::int32_t device_type;  // 1 = CPU, 2 = CUDA
  std::int32_t device_id;
};
struct DataType {
  std::uint8_t code;  // 0 = int, 1 = uint, 2 = float
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  std::int32_t ndim;
  DataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null = compact row-major
  std::uint64_t byte_offset;
};
struct Managed {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(Managed*);
};
}  // namespace dlpack

enum class DType { f32, f64, i64, other };
enum class Device { cpu, cuda, other };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::i64: return "int64";
    default: return "an unsupported dtype";
  }
}

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<std::int64_t>() { return DType::i64; }

constexpr int kMaxDims = 4;

// One tensor argument: data (null for None), dtype, device, shape and strides (elements).
struct View {
  const char* name = "";
  void* data = nullptr;
  DType dtype = DType::other;
  Device device = Device::other;
  int ndim = 0;
  std::int64_t shape[kMaxDims] = {0, 0, 0, 0};
  std::int64_t stride[kMaxDims] = {0, 0, 0, 0};

  explicit operator bool() const { return data != nullptr; }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
  std::int64_t size(int i) const { return shape[i]; }
};

[[noreturn]] inline void bad(const char* fn, const View& v, const std::string& what) {
  throw std::invalid_argument(std::string(fn) + ": " + v.name + " " + what);
}

// The view of a DLPack capsule (or an empty view for None when optional).
inline View view(const char* fn, const char* name, pybind11::handle obj, bool optional = false) {
  View v;
  v.name = name;
  if (obj.is_none()) {
    if (!optional) bad(fn, v, "is required");
    return v;
  }
  PyObject* cap = obj.ptr();
  if (!PyCapsule_IsValid(cap, "dltensor")) bad(fn, v, "must be a DLPack capsule (torch.utils.dlpack.to_dlpack)");
  const auto* t = &static_cast<dlpack::Managed*>(PyCapsule_GetPointer(cap, "dltensor"))->dl_tensor;
  if (t->ndim > kMaxDims) bad(fn, v, "has more than 4 dimensions");
  if (t->dtype.lanes != 1) bad(fn, v, "must not be a vector dtype");
  v.dtype = t->dtype.code == 2 && t->dtype.bits == 32   ? DType::f32
            : t->dtype.code == 2 && t->dtype.bits == 64 ? DType::f64
            : t->dtype.code == 0 && t->dtype.bits == 64 ? DType::i64
                                                        : DType::other;
  v.device = t->device.device_type == 1 ? Device::cpu : t->device.device_type == 2 ? Device::cuda : Device::other;
  v.ndim = t->ndim;
  std::int64_t compact = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    v.shape[i] = t->shape[i];
    v.stride[i] = t->strides ? t->strides[i] : compact;
    compact *= t->shape[i];
  }
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  if (v.data == nullptr) v.data = reinterpret_cast<void*>(std::uintptr_t(1));  // an empty tensor is not None
  return v;
}

// Checks of one call: dtype and device, rank, exact shape (−1: any), unit
// stride of the last dimension, and full contiguity where the kernel indexes
// the tensor as a dense array.
inline void expect(const char* fn, const View& v, DType dtype, Device device, std::initializer_list<std::int64_t> shape,
                   bool contiguous = true) {
  if (!v) return;
  if (v.dtype != dtype) bad(fn, v, std::string("must be ") + dtype_name(dtype) + ", got " + dtype_name(v.dtype));
  if (v.device != device) bad(fn, v, device == Device::cuda ? "must be on a CUDA device" : "must be on the CPU");
  if (v.ndim != static_cast<int>(shape.size())) bad(fn, v, "must have " + std::to_string(shape.size()) + " dimensions");
  int i = 0;
  for (std::int64_t s : shape) {
    if (s >= 0 && v.shape[i] != s)
      bad(fn, v, "dimension " + std::to_string(i) + " must be " + std::to_string(s) + ", got " +
                     std::to_string(v.shape[i]));
    ++i;
  }
  std::int64_t numel = 1;
  for (int j = 0; j < v.ndim; ++j) numel *= v.shape[j];
  if (numel == 0) return;  // nothing is read or written: strides are free
  if (v.ndim > 0 && v.shape[v.ndim - 1] > 1 && v.stride[v.ndim - 1] != 1) bad(fn, v, "must have unit last stride");
  if (contiguous) {
    std::int64_t want = 1;
    for (int j = v.ndim - 1; j >= 0; --j) {
      if (v.shape[j] > 1 && v.stride[j] != want) bad(fn, v, "must be contiguous");
      want *= v.shape[j];
    }
  }
}

// Calls f with a null pointer of the floating element type of ``v``.
template <typename F>
inline void with_float_view(const char* fn, const View& v, F&& f) {
  if (v.dtype == DType::f32) {
    f(static_cast<float*>(nullptr));
  } else if (v.dtype == DType::f64) {
    f(static_cast<double*>(nullptr));
  } else {
    bad(fn, v, std::string("must be float32 or float64, got ") + dtype_name(v.dtype));
  }
}

}  // namespace fisherfast
