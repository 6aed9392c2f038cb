// pybind11 bindings of the xkern CUDA extension (xkern._C).
// The decode kernels land with the CUDA issue; until then the module reports what it was built
// with, and `available_ops()` is empty, so the dispatcher never routes an op here.
#include <torch/extension.h>

#include <string>
#include <vector>

std::vector<std::string> available_ops() { return {}; }

std::string build_info() {
  std::string s = "xkern._C built with CUDA ";
#ifdef CUDA_VERSION
  s += std::to_string(CUDA_VERSION);
#else
  s += "(unknown)";
#endif
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xkern CUDA kernels";
  m.def("available_ops", &available_ops, "Names of the ops this build implements");
  m.def("build_info", &build_info, "CUDA version the extension was compiled with");
}
