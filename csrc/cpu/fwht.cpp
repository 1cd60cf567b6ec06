// Placeholder: filled in by the fwht work.
#include <pybind11/pybind11.h>
namespace fisherfast {
void bind_fwht(pybind11::module_& m) {}
}  // namespace fisherfast
