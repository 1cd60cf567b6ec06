// Shared helpers for the header-only kernels (CPU and CUDA).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__
#else
#define FF_HOST_DEVICE
#endif

namespace fisherfast {

// Tensors cross the Python boundary as integer addresses (no torch headers).
template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Calls f with a null pointer of the element type named by ``dtype`` (the op
// layer passes "float32" or "float64"), so one generic lambda serves both.
template <typename F>
inline void with_float_dtype(const char* fn, const std::string& dtype, F&& f) {
  if (dtype == "float32") {
    f(static_cast<float*>(nullptr));
  } else if (dtype == "float64") {
    f(static_cast<double*>(nullptr));
  } else {
    throw std::invalid_argument(std::string(fn) + ": dtype must be float32 or float64, got " + dtype);
  }
}

FF_HOST_DEVICE inline bool is_power_of_two(std::int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

}  // namespace fisherfast
