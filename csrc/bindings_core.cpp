// lavin_edge._C: CPU features, the backend table, and the small utilities (threads, fp16 rounding, the
// bandwidth probe).
#include <pybind11/stl.h>

#include <vector>

#include "bindings_common.h"
#include "cpu_features.h"
#include "parallel.h"

namespace lavin_bind {

namespace {

// Every backend compiled into this build; built_backends() (cpu_features.cpp) lists the same names.
const Backend kBackends[] = {
#ifdef LAVIN_EDGE_BUILD_X86
    {"avx512", &w4_gemm_avx512, &quantize_activations, &llm_adapter_avx512, &vit_adapter_avx512,
     &attend_group_avx512},
    {"avx2", &w4_gemm_avx2, &quantize_activations, &llm_adapter_avx2, &vit_adapter_avx2, &attend_group_avx2},
#endif
#ifdef LAVIN_EDGE_BUILD_NEON
    {"neon-i8mm", &w4_gemm_neon_i8mm, &quantize_activations, &llm_adapter_neon, &vit_adapter_neon,
     &attend_group_neon},
    {"neon-dotprod", &w4_gemm_neon_dotprod, &quantize_activations, &llm_adapter_neon, &vit_adapter_neon,
     &attend_group_neon},
    {"neon", &w4_gemm_neon, &quantize_activations, &llm_adapter_neon, &vit_adapter_neon, &attend_group_neon},
#endif
    {"scalar", &w4_gemm_generic, &quantize_activations_scalar, &llm_adapter_scalar, &vit_adapter_scalar,
     &attend_group_generic},
};

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

py::dict py_cpu_features() {
  const CpuFeatures& f = cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq;
  d["avx512_vnni"] = f.avx512vnni;
  d["avx512_bf16"] = f.avx512bf16;
  d["neon"] = f.neon;
  d["dotprod"] = f.dotprod;
  d["i8mm"] = f.i8mm;
  d["fphp"] = f.fphp;
  const std::vector<std::string> usable = usable_backends();
  d["best_isa"] = usable.front();
  d["backends"] = usable;
  d["built_backends"] = built_backends();
  d["openmp"] = kHaveOpenMP;
  d["omp_max_threads"] = max_threads();
#ifdef LAVIN_EDGE_WITH_CUDA
  d["cuda_compiled"] = true;
#else
  d["cuda_compiled"] = false;
#endif
  return d;
}

double py_read_bandwidth(uintptr_t buf, int64_t nbytes, int threads) {
  require(buf != 0 && nbytes >= 64, "read_bandwidth: need a buffer of at least 64 bytes");
  py::gil_scoped_release nogil;
  return read_bandwidth_kernel(ptr<const void>(buf), nbytes, resolve_threads(threads));
}

// What each backend needs, for the error of a backend this CPU cannot run.
const char* requirement(const std::string& name) {
  if (name == "avx512") return "AVX-512 F/BW/VL/DQ/VNNI";
  if (name == "avx2") return "AVX2/FMA/F16C";
  if (name == "neon-i8mm") return "the int8 matrix multiply (FEAT_I8MM) and dot product";
  if (name == "neon-dotprod") return "the int8 dot product (FEAT_DotProd)";
  return "Advanced SIMD";
}

}  // namespace

const Backend& backend_named(const std::string& name) {
  for (const Backend& b : kBackends) {
    if (name != b.name) continue;
    const std::vector<std::string> usable = usable_backends();
    for (const std::string& u : usable)
      if (u == name) return b;
    require(false, "isa '" + name + "' requested but this CPU lacks " + requirement(name));
  }
  throw std::invalid_argument("unknown isa '" + name + "' (built here: " + joined(built_backends()) + ")");
}

int resolve_threads(int threads) { return threads > 0 ? threads : max_threads(); }

void register_core(py::module_& m) {
  m.attr("MAX_ADAPTER_RANK") = kMaxAdapterRank;
  m.def("cpu_features", &py_cpu_features,
        "CPU features the kernels dispatch on, the backends built and usable here (best_isa first), OpenMP");
  m.def(
      "float_to_half",
      [](uintptr_t x, uintptr_t out, int64_t n) {
        require(x && out && n >= 0, "float_to_half: null pointer or negative count");
        const float* in = ptr<const float>(x);
        uint16_t* o = ptr<uint16_t>(out);
        for (int64_t i = 0; i < n; ++i) o[i] = float_to_half(in[i]);
      },
      "The KV cache's fp32 -> fp16 rounding (n floats at x into n uint16 at out), for the tests",
      py::arg("x"), py::arg("out"), py::arg("n"));
  m.def("read_bandwidth", &py_read_bandwidth, "Sum a buffer with `threads` threads (STREAM-like read probe)",
        py::arg("buf"), py::arg("nbytes"), py::arg("threads") = 0);
  m.def("max_threads", []() { return max_threads(); });
}

}  // namespace lavin_bind
