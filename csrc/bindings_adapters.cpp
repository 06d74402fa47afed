// lavin_edge._C: the norm + adapter descriptors and the LLM / ViT adapter kernels.
#include <pybind11/stl.h>

#include <string>

#include "bindings_common.h"

namespace lavin_bind {

namespace {

NormAdapterWeights make_norm_adapter_weights(uintptr_t g, uintptr_t A, uintptr_t a, uintptr_t U, uintptr_t u,
                                             int64_t dim, int64_t rank, double eps) {
  require(dim > 0, "NormAdapterWeights: dim must be positive");
  require(rank > 0 && rank <= kMaxAdapterRank, "NormAdapterWeights: rank must be in [1, MAX_ADAPTER_RANK]");
  require(eps > 0.0, "NormAdapterWeights: eps must be positive");
  require(g && A && a && U && u, "NormAdapterWeights: null pointer");
  NormAdapterWeights d;
  d.norm = DecodeNorm{ptr<const float>(g), ptr<const float>(A), ptr<const float>(a), ptr<const float>(U),
                      ptr<const float>(u), rank};
  d.dim = dim;
  d.eps = static_cast<float>(eps);
  return d;
}

void py_llm_adapter(const std::string& isa_name, const NormAdapterWeights& weights, uintptr_t x, uintptr_t y,
                    int64_t rows, uintptr_t row_modality, int threads) {
  const Backend& be = backend_named(isa_name);
  require(rows > 0, "llm_adapter: rows must be positive");
  require(x && y && row_modality, "llm_adapter: null pointer");
  const int32_t* mod = ptr<const int32_t>(row_modality);
  require(all_in_range(mod, rows, 0, 2), "llm_adapter: modality must be 0 or 1");
  const DecodeNorm& n = weights.norm;
  LlmAdapterArgs p{ptr<const float>(x), ptr<float>(y), rows, weights.dim, n.rank, n.g, n.A, n.a, n.U, n.u, mod,
                   weights.eps};
  const int nt = resolve_threads(threads);
  py::gil_scoped_release nogil;
  be.llm_adapter(p, nt);
}

void py_vit_adapter(const std::string& isa_name, uintptr_t x, uintptr_t y, int64_t rows, int64_t dim, int64_t rank,
                    uintptr_t A, uintptr_t a, uintptr_t R, uintptr_t rb, uintptr_t B, uintptr_t b, uintptr_t Dw,
                    uintptr_t d, double temperature, double scale, int threads) {
  const Backend& be = backend_named(isa_name);
  require(rows > 0 && dim > 0 && dim % 2 == 0, "vit_adapter: rows > 0 and an even dim > 0 required");
  require(rank >= 2 && rank <= kMaxAdapterRank && rank % 2 == 0, "vit_adapter: rank must be even, in [2, MAX_ADAPTER_RANK]");
  require(temperature > 0.0, "vit_adapter: temperature must be positive");
  VitAdapterArgs p{ptr<const float>(x), ptr<float>(y), rows, dim, rank, ptr<const float>(A), ptr<const float>(a),
                   ptr<const float>(R), ptr<const float>(rb), ptr<const float>(B), ptr<const float>(b),
                   ptr<const float>(Dw), ptr<const float>(d), static_cast<float>(temperature),
                   static_cast<float>(scale)};
  const int nt = resolve_threads(threads);
  py::gil_scoped_release nogil;
  be.vit_adapter(p, nt);
}

}  // namespace

void register_adapters(py::module_& m) {
  py::class_<NormAdapterWeights>(m, "NormAdapterWeights",
                                 "A prepared RMSNorm + folded routed adapter (fp32 g, A, a, U, u addresses), checked "
                                 "once here; the caller keeps the tensors alive")
      .def(py::init(&make_norm_adapter_weights), py::arg("g"), py::arg("A"), py::arg("a"), py::arg("U"), py::arg("u"),
           py::arg("dim"), py::arg("rank"), py::arg("eps"))
      .def_property_readonly("dim", [](const NormAdapterWeights& d) { return d.dim; })
      .def_property_readonly("rank", [](const NormAdapterWeights& d) { return d.norm.rank; })
      .def_property_readonly("eps", [](const NormAdapterWeights& d) { return d.eps; });
  m.def("llm_adapter", &py_llm_adapter, "Fused RMSNorm + folded routed adapter on prepared weights (fp32)",
        py::arg("isa"), py::arg("weights"), py::arg("x"), py::arg("y"), py::arg("rows"), py::arg("row_modality"),
        py::arg("threads") = 0);
  m.def("vit_adapter", &py_vit_adapter, "Per-token routed ViT adapter (fp32)", py::arg("isa"), py::arg("x"),
        py::arg("y"), py::arg("rows"), py::arg("dim"), py::arg("rank"), py::arg("A"), py::arg("a"), py::arg("R"),
        py::arg("rb"), py::arg("B"), py::arg("b"), py::arg("Dw"), py::arg("d"), py::arg("temperature"),
        py::arg("scale"), py::arg("threads") = 0);
}

}  // namespace lavin_bind
