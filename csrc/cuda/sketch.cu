// Placeholder: filled in by the sketch work.
#include <pybind11/pybind11.h>
namespace fisherfast {
void bind_sketch_cuda(pybind11::module_& m) {}
}  // namespace fisherfast
