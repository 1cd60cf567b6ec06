// Shared helpers for the header-only kernels (CPU and CUDA).
#pragma once
#include <cstdint>

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

FF_HOST_DEVICE inline bool is_power_of_two(std::int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

}  // namespace fisherfast
