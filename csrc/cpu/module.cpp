// fisherfast._C: the CPU extension. Each op binds itself from its own file.
#include <pybind11/pybind11.h>

namespace fisherfast {
void bind_fwht(pybind11::module_& m);
void bind_softmax_fisher(pybind11::module_& m);
void bind_sketch(pybind11::module_& m);
}  // namespace fisherfast

PYBIND11_MODULE(_C, m) {
  m.doc() = "fisherfast CPU kernels (C++17, OpenMP); tensors are passed as DLPack views or data pointers";
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  fisherfast::bind_fwht(m);
  fisherfast::bind_softmax_fisher(m);
  fisherfast::bind_sketch(m);
}
