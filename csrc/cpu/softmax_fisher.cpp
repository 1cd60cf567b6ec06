// Placeholder: filled in by the softmax_fisher work.
#include <pybind11/pybind11.h>
namespace fisherfast {
void bind_softmax_fisher(pybind11::module_& m) {}
}  // namespace fisherfast
