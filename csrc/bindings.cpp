// pybind11 bindings of the xkern CUDA extension (xkern._C).
// `available_ops()` lists the ops this build implements; the `cuda` backend (xkern/ops/backends/cuda_ext.py,
// chosen by the registry of xkern/ops/registry.py) routes an op here only when it is listed. setup.py defines
// XKERN_WITH_DECODE_KERNEL when it compiles the decode kernel (csrc/nf4_lora_decode.cu) into the extension.
#include <torch/extension.h>

#include <string>
#include <vector>

#ifdef XKERN_WITH_DECODE_KERNEL
#include "lora_linear.h"
#endif

std::vector<std::string> available_ops() {
#ifdef XKERN_WITH_DECODE_KERNEL
  return {"lora_linear"};
#else
  return {};
#endif
}

std::string build_info() {
  std::string s = "xkern._C built with CUDA ";
#ifdef CUDA_VERSION
  s += std::to_string(CUDA_VERSION);
#else
  s += "(unknown)";
#endif
#ifdef XKERN_WITH_DECODE_KERNEL
  s += "; decode kernel (NF4 GEMV + multi-adapter LoRA, M <= 16)";
#endif
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xkern CUDA kernels";
  m.def("available_ops", &available_ops, "Names of the ops this build implements");
  m.def("build_info", &build_info, "CUDA version the extension was compiled with");
#ifdef XKERN_WITH_DECODE_KERNEL
  m.def("lora_linear_decode", &lora_linear_decode,
        "NF4 GEMV + multi-adapter LoRA for 1..16 rows: returns (y [M, N] in x.dtype, xa [M, r] float32)",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("absmax"), pybind11::arg("absmax2"),
        pybind11::arg("code2"), pybind11::arg("offset"), pybind11::arg("n_out"), pybind11::arg("k"),
        pybind11::arg("blocksize"), pybind11::arg("lora_A"), pybind11::arg("lora_B"), pybind11::arg("scale"),
        pybind11::arg("ids"), pybind11::arg("split_k") = 0, pybind11::arg("force_generic") = false);
  m.def("lora_linear_decode_plan", &lora_linear_decode_plan,
        "[vec, mt, rows_per_block, n_tiles, split_k, k_slab] of the decode kernel for a shape",
        pybind11::arg("m"), pybind11::arg("n_out"), pybind11::arg("k"), pybind11::arg("num_sms"),
        pybind11::arg("split_k") = 0, pybind11::arg("force_generic") = false);
#endif
}
