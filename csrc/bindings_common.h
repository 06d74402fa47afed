// What the binding files of lavin_edge._C share (bindings.cpp defines the module and calls each file's
// register_*): address and size checks, the CPU backend table, and the prepared-weight descriptors.
//
// Tensors cross as raw addresses (tensor.data_ptr()) plus sizes: no torch headers, no copies.
// The Python wrapper (lavin_edge/kernels/) validates dtype, device, contiguity and shapes and
// owns every buffer; the binding files re-check the arithmetic relations between the sizes they
// receive (so a wrong call raises ValueError instead of reading out of bounds) and release
// the GIL around the kernels.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace lavin_bind {

namespace py = pybind11;
using namespace lavin;

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// Every v[i] in [lo, hi). One require() per entry would build its message string per entry: that cost
// ~23 ns each, a third of an act-order GEMV's time at k = 11008.
template <typename T>
bool all_in_range(const T* v, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    if (v[i] < lo || v[i] >= hi) return false;
  }
  return true;
}

// One CPU backend: the kernels an `isa` name selects. Only the backends compiled into this build exist
// (cpu_features.h, built_backends).
struct Backend {
  const char* name;
  W4GemmFn gemm;
  // The "scalar" backend runs the scalar quantizer, so that tests can hold the SIMD ones to it bit for bit;
  // the others run quantize_activations (the best build for this CPU).
  QuantizeFn quantize;
  LlmAdapterFn llm_adapter;
  VitAdapterFn vit_adapter;
  AttendFn attend;
};

// The backend called `name`: std::invalid_argument if it is not built here or this CPU cannot run it.
const Backend& backend_named(const std::string& name);

// threads > 0 as given, else the OpenMP default (1 in a build without OpenMP).
int resolve_threads(int threads);

// Descriptor of one prepared W4 linear (lavin_edge.kernels.w4.TiledW4.native).
struct W4Weights {
  W4Prepared w;
  int64_t nbytes = 0;  // packed weights + scales + zeros: what one product reads
};

// Descriptor of one prepared RMSNorm + folded routed adapter (lavin_edge.kernels.adapters.PreparedNormAdapter):
// g [dim], A [rank][dim], a [rank], U [2][dim][rank], u [2][dim], fp32.
struct NormAdapterWeights {
  DecodeNorm norm{};
  int64_t dim = 0;
  float eps = 0.0f;
};

void register_core(py::module_& m);      // bindings_core.cpp: features, backends, misc
void register_w4(py::module_& m);        // bindings_w4.cpp
void register_adapters(py::module_& m);  // bindings_adapters.cpp
void register_decode(py::module_& m);    // bindings_decode.cpp

}  // namespace lavin_bind
