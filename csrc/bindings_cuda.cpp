// pybind11 entry points of the CUDA engine's kernels (csrc/cuda/gemv.cu) and of their lane-by-lane CPU
// emulation (csrc/cuda/lane_emulate.cpp, always built). Addresses cross as integers, as in bindings.cpp;
// the Python side (lavin_edge/kernels/cuda.py) owns and checks the tensors, this file re-checks the sizes.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "adapter_limits.h"
#include "cuda/gemv_api.h"

namespace py = pybind11;

namespace lavin {
namespace {

template <typename T>
T* addr(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

void check_w4(int64_t m, int64_t n, int64_t k, int64_t gs, int64_t ldo, int kind, const char* what) {
  if (!(m >= 1 && m <= 8 && n > 0 && k > 0 && k % 32 == 0 && gs > 0 && gs % 32 == 0 && k % gs == 0 &&
        ldo >= n && kind >= 0 && kind <= 2))
    throw py::value_error(std::string(what) +
                          ": bad sizes (m in 1..8; k and group_size multiples of 32, k of group_size; ldo >= n)");
}

#ifdef LAVIN_EDGE_WITH_CUDA
void check_cuda(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("CUDA error: " + err);
}
#endif

}  // namespace

void register_cuda(py::module_& m) {
  m.def(
      "w4_gemv_emulate",
      [](uintptr_t x, int64_t rows, uintptr_t qw, uintptr_t sz, uintptr_t out, int64_t ldo, int kind, int64_t n,
         int64_t k, int64_t gs) {
        check_w4(rows, n, k, gs, ldo, kind, "w4_gemv_emulate");
        py::gil_scoped_release release;
        lane::w4_gemv_emulate(addr<const void>(x), rows, addr<const void>(qw), addr<const void>(sz),
                              addr<void>(out), ldo, kind, n, k, gs);
      },
      "The CUDA W4 GEMV run lane by lane on the CPU (host addresses; see csrc/cuda/gemv_api.h)", py::arg("x"),
      py::arg("m"), py::arg("qw"), py::arg("sz"), py::arg("out"), py::arg("ldo"), py::arg("kind"), py::arg("n"),
      py::arg("k"), py::arg("group_size"));
  m.def(
      "w4_dequant_emulate",
      [](uintptr_t qw, uintptr_t sz, uintptr_t w, int64_t n, int64_t k, int64_t gs) {
        check_w4(1, n, k, gs, n, 0, "w4_dequant_emulate");
        py::gil_scoped_release release;
        lane::w4_dequant_emulate(addr<const void>(qw), addr<const void>(sz), addr<void>(w), n, k, gs);
      },
      "The CUDA W4 dequantize kernel on the CPU: fp16 W [n][k] in group order", py::arg("qw"), py::arg("sz"),
      py::arg("w"), py::arg("n"), py::arg("k"), py::arg("group_size"));
#ifdef LAVIN_EDGE_WITH_CUDA
  m.def(
      "cuda_w4_gemv",
      [](uintptr_t x, int64_t rows, uintptr_t qw, uintptr_t sz, uintptr_t out, int64_t ldo, int kind, int64_t n,
         int64_t k, int64_t gs, int64_t stream) {
        check_w4(rows, n, k, gs, ldo, kind, "cuda_w4_gemv");
        check_cuda(cuda::w4_gemv(addr<const void>(x), rows, addr<const void>(qw), addr<const void>(sz),
                                 addr<void>(out), ldo, kind, n, k, gs, stream));
      },
      py::arg("x"), py::arg("m"), py::arg("qw"), py::arg("sz"), py::arg("out"), py::arg("ldo"), py::arg("kind"),
      py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("stream") = 0);
  m.def(
      "cuda_w4_dequant",
      [](uintptr_t qw, uintptr_t sz, uintptr_t w, int64_t n, int64_t k, int64_t gs, int64_t stream) {
        check_w4(1, n, k, gs, n, 0, "cuda_w4_dequant");
        check_cuda(cuda::w4_dequant(addr<const void>(qw), addr<const void>(sz), addr<void>(w), n, k, gs, stream));
      },
      py::arg("qw"), py::arg("sz"), py::arg("w"), py::arg("n"), py::arg("k"), py::arg("group_size"),
      py::arg("stream") = 0);
  m.def(
      "cuda_norm_adapter",
      [](uintptr_t x, bool x_fp32, uintptr_t y, int64_t rows, int64_t dim, int64_t rank, uintptr_t g, uintptr_t A,
         uintptr_t a, uintptr_t U, uintptr_t u, uintptr_t row_modality, double eps, int64_t stream) {
        if (!(rows > 0 && dim > 0 && dim <= 12288 && rank > 0 && rank <= kMaxAdapterRank))
          throw py::value_error("cuda_norm_adapter: bad sizes");
        check_cuda(cuda::norm_adapter(addr<const void>(x), x_fp32, addr<void>(y), rows, dim, rank,
                                      addr<const void>(g), addr<const void>(A), addr<const void>(a),
                                      addr<const void>(U), addr<const void>(u), addr<const int32_t>(row_modality),
                                      static_cast<float>(eps), stream));
      },
      py::arg("x"), py::arg("x_fp32"), py::arg("y"), py::arg("rows"), py::arg("dim"), py::arg("rank"), py::arg("g"),
      py::arg("A"), py::arg("a"), py::arg("U"), py::arg("u"), py::arg("row_modality"), py::arg("eps"),
      py::arg("stream") = 0);
#endif
}

}  // namespace lavin
