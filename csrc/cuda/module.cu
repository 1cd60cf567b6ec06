// fisherfast._C_cuda: the CUDA extension. Each op binds itself from its own file.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

namespace fisherfast {
void bind_fwht_cuda(pybind11::module_& m);
void bind_softmax_fisher_cuda(pybind11::module_& m);
void bind_sketch_cuda(pybind11::module_& m);
}  // namespace fisherfast

// Empty string when a CUDA device is usable, else the runtime's reason. The
// module imports without a driver; every runtime call then fails, so the op
// layer probes once and reports.
static std::string probe() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  if (count == 0) return "no CUDA device";
  return "";
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fisherfast CUDA kernels (sm_80/sm_90 + PTX); tensors are passed as DLPack views or data pointers";
  m.def("probe", &probe, "Empty string if a CUDA device is usable, else why not.");
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  fisherfast::bind_fwht_cuda(m);
  fisherfast::bind_softmax_fisher_cuda(m);
  fisherfast::bind_sketch_cuda(m);
}
