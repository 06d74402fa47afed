// lavin_edge._C: the W4 descriptors and products (tiled GEMM, repack, the GPTQ-layout oracle).
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings_common.h"

namespace lavin_bind {

namespace {

// The prepared layout's sizes, checked: a wrong call raises ValueError instead of reading out of bounds.
W4Prepared checked_w4(const char* what, uintptr_t qw, int64_t qw_bytes, uintptr_t scales, int64_t scales_numel,
                      uintptr_t zeros, int64_t zeros_numel, uintptr_t perm, int64_t perm_numel, int64_t n, int64_t np,
                      int64_t k, int64_t kp, int64_t groups) {
  const std::string w(what);
  require(n > 0 && k > 0, w + ": n and k must be positive");
  require(np % kTile == 0 && np >= n && np - n < kTile, w + ": np must be n rounded up to a multiple of 16");
  require(kp % kBlock == 0 && kp >= k && kp - k < kBlock, w + ": kp must be k rounded up to a multiple of 32");
  require(groups > 0 && (kp / kBlock) % groups == 0, w + ": groups must divide kp / 32");
  require(qw_bytes == np / kTile * (kp / 8) * 64, w + ": packed weight size does not match n, k");
  require(scales_numel == np * groups && zeros_numel == np * groups, w + ": scales/zeros size does not match");
  require(perm == 0 || perm_numel == k, w + ": perm must hold k entries");
  require(qw && scales && zeros, w + ": null pointer");
  W4Prepared p;
  p.qw = ptr<const uint8_t>(qw);
  p.scales = ptr<const uint16_t>(scales);
  p.zeros = ptr<const uint8_t>(zeros);
  p.perm = perm ? ptr<const int32_t>(perm) : nullptr;
  p.n = n;
  p.np = np;
  p.k = k;
  p.kp = kp;
  p.groups = groups;
  p.blocks_per_group = kp / kBlock / groups;
  if (p.perm) {  // O(k): cheap next to the O(nk) product, and it rules out a wild gather
    require(all_in_range(p.perm, k, 0, k), w + ": perm entry out of range [0, k)");
  }
  return p;
}

W4Weights make_w4_weights(uintptr_t qw, int64_t qw_bytes, uintptr_t scales, int64_t scales_numel, uintptr_t zeros,
                          int64_t zeros_numel, uintptr_t perm, int64_t perm_numel, int64_t n, int64_t np, int64_t k,
                          int64_t kp, int64_t groups) {
  W4Weights d;
  d.w = checked_w4("W4Weights", qw, qw_bytes, scales, scales_numel, zeros, zeros_numel, perm, perm_numel, n, np, k,
                   kp, groups);
  d.nbytes = qw_bytes + 2 * scales_numel + zeros_numel;
  return d;
}

void py_w4_gemm(const std::string& isa_name, const W4Weights& weights, uintptr_t x, int64_t m, int64_t ldx,
                uintptr_t y, int64_t ldy, int threads) {
  const Backend& be = backend_named(isa_name);
  const W4Prepared& w = weights.w;
  require(m > 0, "w4_gemm: m must be positive");
  require(ldx >= w.k && ldy >= w.n, "w4_gemm: row strides smaller than the rows");
  require(x && y, "w4_gemm: null pointer");
  const ActFormat fmt = act_format_from_env();
  std::vector<int8_t> q(static_cast<size_t>(m * act_row_bytes(w.kp)));
  std::vector<float> d(static_cast<size_t>(m * (w.kp / kBlock)));
  std::vector<float> gsum(static_cast<size_t>(m * w.groups));
  const int nt = resolve_threads(threads);
  {
    py::gil_scoped_release nogil;
    const XQuant xq = be.quantize(ptr<const float>(x), ldx, w, m, fmt, q.data(), d.data(), gsum.data());
    be.gemm(w, xq, ptr<float>(y), ldy, nt);
  }
}

void py_w4_gemm_gptq_reference(uintptr_t x, int64_t m, uintptr_t qweight, int64_t qweight_numel, uintptr_t qzeros,
                               int64_t qzeros_numel, uintptr_t scales, int64_t scales_numel, uintptr_t g_idx,
                               int64_t g_idx_numel, int64_t n, int64_t k, int64_t groups, int64_t group_size,
                               int zero_offset, uintptr_t y, int threads) {
  require(n > 0 && k > 0 && m > 0 && groups > 0 && group_size > 0, "gptq_reference: sizes must be positive");
  require(k % 8 == 0, "gptq_reference: k must be a multiple of 8");
  require(qweight_numel == k / 8 * n, "gptq_reference: qweight must be [k/8, n]");
  require(qzeros_numel == groups * ((n + 7) / 8), "gptq_reference: qzeros must be [G, ceil(n/8)]");
  require(scales_numel == groups * n, "gptq_reference: scales must be [G, n]");
  require(g_idx == 0 || g_idx_numel == k, "gptq_reference: g_idx must hold k entries");
  require(g_idx != 0 || (k + group_size - 1) / group_size <= groups, "gptq_reference: too few groups for k");
  const int32_t* gi = g_idx ? ptr<const int32_t>(g_idx) : nullptr;
  if (gi) {
    require(all_in_range(gi, k, 0, groups), "gptq_reference: g_idx entry out of range [0, G)");
  }
  py::gil_scoped_release nogil;
  w4_gemm_gptq_reference(ptr<const float>(x), m, ptr<const int32_t>(qweight), ptr<const int32_t>(qzeros),
                         ptr<const uint16_t>(scales), gi, n, k, groups, group_size, zero_offset, ptr<float>(y),
                         resolve_threads(threads));
}

void py_w4_repack(uintptr_t qweight, int64_t qweight_numel, int64_t n, int64_t k, uintptr_t perm, int64_t perm_numel,
                  int64_t np, int64_t kp, uintptr_t out, int64_t out_bytes, int threads) {
  require(n > 0 && k > 0 && k % 8 == 0, "w4_repack: n > 0 and k a positive multiple of 8 required");
  require(qweight_numel == k / 8 * n, "w4_repack: qweight must be [k/8, n]");
  require(np % kTile == 0 && np >= n && np - n < kTile, "w4_repack: np must be n rounded up to a multiple of 16");
  require(kp % kBlock == 0 && kp >= k && kp - k < kBlock, "w4_repack: kp must be k rounded up to a multiple of 32");
  require(out_bytes == np / kTile * (kp / 8) * 64, "w4_repack: output size does not match np, kp");
  require(perm == 0 || perm_numel == k, "w4_repack: perm must hold k entries");
  const int32_t* pm = perm ? ptr<const int32_t>(perm) : nullptr;
  if (pm) {
    require(all_in_range(pm, k, 0, k), "w4_repack: perm entry out of range [0, k)");
  }
  py::gil_scoped_release nogil;
  w4_repack_gptq(ptr<const int32_t>(qweight), n, k, pm, np, kp, ptr<uint8_t>(out), resolve_threads(threads));
}

}  // namespace

void register_w4(py::module_& m) {
  py::class_<W4Weights>(m, "W4Weights",
                        "A prepared W4 linear in the tiled layout of csrc/kernels.h: addresses and sizes, checked "
                        "once here; the caller keeps the tensors alive")
      .def(py::init(&make_w4_weights), py::arg("qw"), py::arg("qw_bytes"), py::arg("scales"), py::arg("scales_numel"),
           py::arg("zeros"), py::arg("zeros_numel"), py::arg("perm"), py::arg("perm_numel"), py::arg("n"),
           py::arg("np"), py::arg("k"), py::arg("kp"), py::arg("groups"))
      .def_property_readonly("n", [](const W4Weights& d) { return d.w.n; })
      .def_property_readonly("k", [](const W4Weights& d) { return d.w.k; })
      .def_property_readonly("nbytes", [](const W4Weights& d) { return d.nbytes; });
  m.def("w4_gemm", &py_w4_gemm, "y = x W^T on a prepared W4 linear (x [m][ldx] fp32, y [m][ldy] fp32)",
        py::arg("isa"), py::arg("weights"), py::arg("x"), py::arg("m"), py::arg("ldx"), py::arg("y"), py::arg("ldy"),
        py::arg("threads") = 0);
  m.def("w4_repack", &py_w4_repack, "Repack GPTQ qweight into the prepared tiled layout", py::arg("qweight"),
        py::arg("qweight_numel"), py::arg("n"), py::arg("k"), py::arg("perm"), py::arg("perm_numel"), py::arg("np"),
        py::arg("kp"), py::arg("out"), py::arg("out_bytes"), py::arg("threads") = 0);
  m.def("w4_gemm_gptq_reference", &py_w4_gemm_gptq_reference,
        "Scalar double-accumulating W4 GEMM straight on the GPTQ layout (oracle)", py::arg("x"), py::arg("m"),
        py::arg("qweight"), py::arg("qweight_numel"), py::arg("qzeros"), py::arg("qzeros_numel"), py::arg("scales"),
        py::arg("scales_numel"), py::arg("g_idx"), py::arg("g_idx_numel"), py::arg("n"), py::arg("k"),
        py::arg("groups"), py::arg("group_size"), py::arg("zero_offset"), py::arg("y"), py::arg("threads") = 0);
}

}  // namespace lavin_bind
