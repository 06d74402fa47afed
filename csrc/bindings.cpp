// pybind11 module lavin_edge._C: the module definition. Each area registers its functions from its own file
// (bindings_core.cpp, bindings_w4.cpp, bindings_adapters.cpp, bindings_decode.cpp); what they share is in
// bindings_common.h.
//
// Prepared weights cross as descriptors built once at prepare time: `W4Weights` (a W4 linear in
// the tiled layout of kernels.h) and `NormAdapterWeights` (RMSNorm gain + folded routed adapter).
// Their sizes are checked when they are built; the per-call entry points (`w4_gemm`,
// `llm_adapter`) and the `DecodeStack` take them as they are, so one prepared linear serves both
// the per-op path and the one-call decode step. The descriptor holds addresses only: the
// caller keeps the tensors alive for as long as the descriptor is used.
#include <pybind11/pybind11.h>

#include <string>

#include "bindings_common.h"
#ifdef LAVIN_EDGE_WITH_CUDA
#include "cuda/cuda_api.h"
#endif

using namespace lavin_bind;
namespace lavin { void register_cuda(py::module_& m); }  // csrc/bindings_cuda.cpp

namespace {

// ---- CUDA --------------------------------------------------------------------------------------
#ifdef LAVIN_EDGE_WITH_CUDA
void check_cuda(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("CUDA error: " + err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lavin-edge native kernels (CPU: scalar, AVX2/AVX-512 VNNI on x86-64, NEON on AArch64; CUDA when built "
            "with nvcc)";
  register_core(m);
  register_w4(m);
  register_adapters(m);
  register_decode(m);
  lavin::register_cuda(m);
#ifdef LAVIN_EDGE_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", &cuda::device_count, "CUDA devices visible (0 without a driver)");
  m.def(
      "cuda_w4_gemm",
      [](uintptr_t x, int64_t ldx, uintptr_t perm, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t m,
         int64_t n, int64_t k, int64_t groups, int64_t group_size, uintptr_t workspace, uintptr_t y, int64_t stream) {
        require(m > 0 && n > 0 && k > 0 && k % 8 == 0, "cuda_w4_gemm: bad sizes (k must be a multiple of 8)");
        require(group_size > 0 && group_size % 8 == 0 && groups * group_size >= k,
                "cuda_w4_gemm: group_size must be a multiple of 8 covering k");
        require(ldx >= k, "cuda_w4_gemm: ldx < k");
        check_cuda(cuda::w4_gemm(ptr<const void>(x), ldx, ptr<const int32_t>(perm), ptr<const int32_t>(qweight),
                                 ptr<const void>(scales), ptr<const uint8_t>(zeros), m, n, k, groups, group_size,
                                 ptr<float>(workspace), ptr<void>(y), stream));
      },
      py::arg("x"), py::arg("ldx"), py::arg("perm"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("groups"), py::arg("group_size"), py::arg("workspace"),
      py::arg("y"), py::arg("stream") = 0);
  m.def(
      "cuda_llm_adapter",
      [](uintptr_t x, uintptr_t y, int64_t rows, int64_t dim, int64_t rank, uintptr_t g, uintptr_t A, uintptr_t a,
         uintptr_t U, uintptr_t u, uintptr_t row_modality, double eps, int64_t stream) {
        require(rows > 0 && dim > 0 && rank > 0 && rank <= kMaxAdapterRank, "cuda_llm_adapter: bad sizes");
        check_cuda(cuda::llm_adapter(ptr<const void>(x), ptr<void>(y), rows, dim, rank, ptr<const float>(g),
                                     ptr<const float>(A), ptr<const float>(a), ptr<const float>(U),
                                     ptr<const float>(u), ptr<const int32_t>(row_modality), static_cast<float>(eps),
                                     stream));
      },
      py::arg("x"), py::arg("y"), py::arg("rows"), py::arg("dim"), py::arg("rank"), py::arg("g"), py::arg("A"),
      py::arg("a"), py::arg("U"), py::arg("u"), py::arg("row_modality"), py::arg("eps"), py::arg("stream") = 0);
  m.def(
      "cuda_vit_adapter",
      [](uintptr_t x, uintptr_t y, int64_t rows, int64_t dim, int64_t rank, uintptr_t A, uintptr_t a, uintptr_t R,
         uintptr_t rb, uintptr_t B, uintptr_t b, uintptr_t Dw, uintptr_t d, double temperature, double scale,
         int64_t stream) {
        require(rows > 0 && dim > 0 && dim % 2 == 0 && rank >= 2 && rank <= kMaxAdapterRank && rank % 2 == 0,
                "cuda_vit_adapter: bad sizes");
        check_cuda(cuda::vit_adapter(ptr<const void>(x), ptr<void>(y), rows, dim, rank, ptr<const float>(A),
                                     ptr<const float>(a), ptr<const float>(R), ptr<const float>(rb),
                                     ptr<const float>(B), ptr<const float>(b), ptr<const float>(Dw),
                                     ptr<const float>(d), static_cast<float>(temperature),
                                     static_cast<float>(scale), stream));
      },
      py::arg("x"), py::arg("y"), py::arg("rows"), py::arg("dim"), py::arg("rank"), py::arg("A"), py::arg("a"),
      py::arg("R"), py::arg("rb"), py::arg("B"), py::arg("b"), py::arg("Dw"), py::arg("d"), py::arg("temperature"),
      py::arg("scale"), py::arg("stream") = 0);
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", []() { return 0; }, "CUDA kernels not compiled: always 0");
#endif
}
