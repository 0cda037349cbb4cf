// The extension module r4b._C: each csrc/*.cpp contributes its functions through a register_* hook,
// so a new source file adds one line here instead of its own module.
#include <pybind11/pybind11.h>

namespace r4b {
void register_packing(pybind11::module_& m);
}  // namespace r4b

PYBIND11_MODULE(_C, m) {
    m.doc() = "r4b native extension (see r4b.packing for the documented Python API)";
    r4b::register_packing(m);
}
