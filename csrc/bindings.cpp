// pybind11 module lavin_edge._C.
//
// Tensors cross as raw addresses (tensor.data_ptr()) plus sizes: no torch headers, no copies.
// The Python wrapper (lavin_edge/kernels/) validates dtype, device, contiguity and shapes and
// owns every buffer; this file re-checks the arithmetic relations between the sizes it
// receives (so a wrong call raises ValueError instead of reading out of bounds) and releases
// the GIL around the kernels.
//
// Prepared weights cross as descriptors built once at prepare time: `W4Weights` (a W4 linear in
// the tiled layout of kernels.h) and `NormAdapterWeights` (RMSNorm gain + folded routed adapter).
// Their sizes are checked when they are built; the per-call entry points (`w4_gemm`,
// `llm_adapter`) and the `DecodeStack` take them as they are, so one prepared linear serves both
// the per-op path and the one-call decode step. The descriptor holds addresses only: the
// caller keeps the tensors alive for as long as the descriptor is used.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "kernels.h"
#ifdef LAVIN_EDGE_WITH_CUDA
#include "cuda/cuda_api.h"
#endif

namespace py = pybind11;
using namespace lavin;
namespace lavin { void register_cuda(py::module_& m); }  // csrc/bindings_cuda.cpp

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void require(bool ok, const std::string& msg) {
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

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa parse_isa(const std::string& name) {
  const CpuFeatures& f = cpu_features();
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") {
    require(f.can_avx2(), "isa 'avx2' requested but this CPU lacks AVX2/FMA/F16C");
    return Isa::kAvx2;
  }
  if (name == "avx512") {
    require(f.can_avx512(), "isa 'avx512' requested but this CPU lacks AVX-512 F/BW/VL/DQ/VNNI");
    return Isa::kAvx512;
  }
  throw std::invalid_argument("unknown isa '" + name + "' (expected scalar, avx2 or avx512)");
}

std::string best_isa() {
  const CpuFeatures& f = cpu_features();
  return f.can_avx512() ? "avx512" : f.can_avx2() ? "avx2" : "scalar";
}

int resolve_threads(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }

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
  d["best_isa"] = best_isa();
  d["omp_max_threads"] = omp_get_max_threads();
#ifdef LAVIN_EDGE_WITH_CUDA
  d["cuda_compiled"] = true;
#else
  d["cuda_compiled"] = false;
#endif
  return d;
}

// ---- W4 -------------------------------------------------------------------------------------

W4GemmFn w4_gemm_fn(Isa isa) {
  return isa == Isa::kAvx512 ? &w4_gemm_avx512 : isa == Isa::kAvx2 ? &w4_gemm_avx2 : &w4_gemm_generic;
}

LlmAdapterFn llm_adapter_fn(Isa isa) {
  return isa == Isa::kAvx512 ? &llm_adapter_avx512 : isa == Isa::kAvx2 ? &llm_adapter_avx2 : &llm_adapter_scalar;
}

AttendFn attend_fn(Isa isa) {
  return isa == Isa::kAvx512 ? &attend_group_avx512 : isa == Isa::kAvx2 ? &attend_group_avx2 : &attend_group_generic;
}


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

// Descriptor of one prepared W4 linear (lavin_edge.kernels.w4.TiledW4.native).
struct W4Weights {
  W4Prepared w;
  int64_t nbytes = 0;  // packed weights + scales + zeros: what one product reads
};

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
  const Isa isa = parse_isa(isa_name);
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
    // The scalar backend runs the scalar quantizer too, so that tests can hold the SIMD one to it bit for bit.
    const auto quantize = isa == Isa::kScalar ? &quantize_activations_scalar : &quantize_activations;
    const XQuant xq = quantize(ptr<const float>(x), ldx, w, m, fmt, q.data(), d.data(), gsum.data());
    w4_gemm_fn(isa)(w, xq, ptr<float>(y), ldy, nt);
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

// ---- adapters ----------------------------------------------------------------------------------

// Descriptor of one prepared RMSNorm + folded routed adapter (lavin_edge.kernels.adapters.PreparedNormAdapter):
// g [dim], A [rank][dim], a [rank], U [2][dim][rank], u [2][dim], fp32.
struct NormAdapterWeights {
  DecodeNorm norm{};
  int64_t dim = 0;
  float eps = 0.0f;
};

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
  const Isa isa = parse_isa(isa_name);
  require(rows > 0, "llm_adapter: rows must be positive");
  require(x && y && row_modality, "llm_adapter: null pointer");
  const int32_t* mod = ptr<const int32_t>(row_modality);
  require(all_in_range(mod, rows, 0, 2), "llm_adapter: modality must be 0 or 1");
  const DecodeNorm& n = weights.norm;
  LlmAdapterArgs p{ptr<const float>(x), ptr<float>(y), rows, weights.dim, n.rank, n.g, n.A, n.a, n.U, n.u, mod,
                   weights.eps};
  const int nt = resolve_threads(threads);
  py::gil_scoped_release nogil;
  llm_adapter_fn(isa)(p, nt);
}

void py_vit_adapter(const std::string& isa_name, uintptr_t x, uintptr_t y, int64_t rows, int64_t dim, int64_t rank,
                    uintptr_t A, uintptr_t a, uintptr_t R, uintptr_t rb, uintptr_t B, uintptr_t b, uintptr_t Dw,
                    uintptr_t d, double temperature, double scale, int threads) {
  const Isa isa = parse_isa(isa_name);
  require(rows > 0 && dim > 0 && dim % 2 == 0, "vit_adapter: rows > 0 and an even dim > 0 required");
  require(rank >= 2 && rank <= kMaxAdapterRank && rank % 2 == 0, "vit_adapter: rank must be even, in [2, MAX_ADAPTER_RANK]");
  require(temperature > 0.0, "vit_adapter: temperature must be positive");
  VitAdapterArgs p{ptr<const float>(x), ptr<float>(y), rows, dim, rank, ptr<const float>(A), ptr<const float>(a),
                   ptr<const float>(R), ptr<const float>(rb), ptr<const float>(B), ptr<const float>(b),
                   ptr<const float>(Dw), ptr<const float>(d), static_cast<float>(temperature),
                   static_cast<float>(scale)};
  const int nt = resolve_threads(threads);
  py::gil_scoped_release nogil;
  switch (isa) {
    case Isa::kAvx512: vit_adapter_avx512(p, nt); break;
    case Isa::kAvx2: vit_adapter_avx2(p, nt); break;
    default: vit_adapter_scalar(p, nt); break;
  }
}

// ---- whole-decoder decode step ----------------------------------------------------------------

// One W4 part of a decode-step linear (lavin_edge.kernels.decode.linear_part): a prepared W4 linear, the first
// output column it writes, whether it adds into columns an earlier part wrote, and its GEMV thread count.
struct LinearPart {
  W4Weights weights;
  int64_t out_offset = 0;
  bool accumulate = false;
  int threads = 1;
};

// A linear as a list of parts, checked to map k_in inputs onto exactly n_out outputs.
std::vector<DecodeLinearPart> decode_linear(const char* what, const std::vector<LinearPart>& parts, int64_t k_in,
                                            int64_t n_out) {
  const std::string w(what);
  require(!parts.empty(), w + ": no parts");
  std::vector<DecodeLinearPart> out;
  int64_t covered = 0;
  for (const auto& part : parts) {
    DecodeLinearPart p;
    p.w = part.weights.w;
    p.out_offset = part.out_offset;
    p.accumulate = part.accumulate;
    p.threads = resolve_threads(part.threads);
    require(p.w.k == k_in, w + ": part input size does not match the model");
    require(p.out_offset >= 0 && p.out_offset + p.w.n <= n_out, w + ": part outputs outside the linear");
    if (p.accumulate) {
      require(p.out_offset + p.w.n <= covered, w + ": an accumulating part must follow the columns it adds to");
    } else {
      require(p.out_offset == covered, w + ": parts must write consecutive columns");
      covered += p.w.n;
    }
    out.push_back(p);
  }
  require(covered == n_out, w + ": parts do not cover the linear's outputs");
  return out;
}

class PyDecodeStack {
 public:
  PyDecodeStack(const std::string& isa, int64_t dim, int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t ffn,
                int64_t ctx, int64_t vocab, double eps, uintptr_t rope, int threads, int64_t slots)
      : shape_{dim, n_heads, n_kv, head_dim, ffn, ctx, vocab, static_cast<float>(eps), ptr<const float>(rope), slots} {
    const Isa i = parse_isa(isa);
    require(dim > 0 && n_heads > 0 && n_kv > 0 && head_dim > 0 && ffn > 0 && ctx > 0 && vocab > 0,
            "decode: sizes must be positive");
    require(slots > 0 && slots <= 4096, "decode: slots must be in [1, 4096]");
    require(n_heads % n_kv == 0 && head_dim % 2 == 0, "decode: n_heads must be a multiple of n_kv, head_dim even");
    require(rope != 0, "decode: null rope table");
    stack_ = std::make_unique<DecodeStack>(shape_, w4_gemm_fn(i), llm_adapter_fn(i), attend_fn(i),
                                           resolve_threads(threads));
  }

  void add_layer(const NormAdapterWeights& attn_in, const NormAdapterWeights& ffn_norm,
                 const std::vector<LinearPart>& wqkv, const std::vector<LinearPart>& wo,
                 const std::vector<LinearPart>& w13, const std::vector<LinearPart>& w2, uintptr_t k_cache,
                 uintptr_t v_cache) {
    const DecodeShape& s = shape_;
    require(k_cache && v_cache, "decode: null cache pointer");
    DecodeLayer l{decode_norm("decode attn_in", attn_in), decode_norm("decode ffn_norm", ffn_norm),
                  decode_linear("decode wqkv", wqkv, s.dim, (s.n_heads + 2 * s.n_kv) * s.head_dim),
                  decode_linear("decode wo", wo, s.n_heads * s.head_dim, s.dim),
                  decode_linear("decode w13", w13, s.dim, 2 * s.ffn), decode_linear("decode w2", w2, s.ffn, s.dim),
                  ptr<uint16_t>(k_cache), ptr<uint16_t>(v_cache)};
    stack_->add_layer(l);
  }

  // An empty head list: step() stops after the final norm and writes the normed state [dim]. rescore_weight:
  // the fp rows [vocab][dim] ("float32", "float16" or "bfloat16") whose rescore_top best logits are recomputed
  // after the 4-bit head (0: none).
  void set_head(const NormAdapterWeights& norm, const std::vector<LinearPart>& head, uintptr_t rescore_weight,
                const std::string& rescore_dtype, int64_t rescore_numel, int64_t rescore_top) {
    std::vector<DecodeLinearPart> parts;
    if (!head.empty()) parts = decode_linear("decode head", head, shape_.dim, shape_.vocab);
    DecodeRescore rs;
    if (rescore_weight) {
      require(!head.empty(), "decode: re-scoring needs a head");
      require(rescore_top > 0 && rescore_top <= kMaxRescore, "decode: rescore_top must be in [1, 64]");
      require(rescore_numel == shape_.vocab * shape_.dim, "decode: rescore weight must be [vocab][dim]");
      if (rescore_dtype == "float32") {
        rs.dtype = DecodeRescore::kF32;
      } else if (rescore_dtype == "float16") {
        rs.dtype = DecodeRescore::kF16;
      } else if (rescore_dtype == "bfloat16") {
        rs.dtype = DecodeRescore::kBF16;
      } else {
        throw std::invalid_argument("decode: rescore dtype must be float32, float16 or bfloat16");
      }
      rs.weight = ptr<const void>(rescore_weight);
      rs.top = rescore_top;
    }
    stack_->set_head(decode_norm("decode head norm", norm), parts, rs);
    has_head_ = true;
  }

  void step(uintptr_t x, int64_t pos, int modality, uintptr_t out) {
    require(has_head_, "decode: set_head before step");
    require(pos >= 0 && pos < shape_.ctx, "decode: position outside the cache");
    require(modality == 0 || modality == 1, "decode: modality must be 0 or 1");
    require(x && out, "decode: null pointer");
    py::gil_scoped_release nogil;
    stack_->step(ptr<float>(x), pos, modality, ptr<float>(out));
  }

  // m rows: x fp32 [m][dim], slot and pos int64 [m], modality int32 [m], out fp32 [m][vocab or dim].
  void step_rows(uintptr_t x, int64_t m, uintptr_t slot, uintptr_t pos, uintptr_t modality, uintptr_t out) {
    require(has_head_, "decode: set_head before step");
    require(m > 0 && m <= shape_.rows, "decode: rows must be in [1, slots]");
    require(x && slot && pos && modality && out, "decode: null pointer");
    const int64_t* sl = ptr<const int64_t>(slot);
    const int64_t* ps = ptr<const int64_t>(pos);
    const int32_t* md = ptr<const int32_t>(modality);
    require(all_in_range(sl, m, 0, shape_.rows), "decode: slot outside [0, slots)");
    require(all_in_range(ps, m, 0, shape_.ctx), "decode: position outside the cache");
    require(all_in_range(md, m, 0, 2), "decode: modality must be 0 or 1");
    std::vector<bool> seen(shape_.rows, false);
    for (int64_t r = 0; r < m; ++r) {
      require(!seen[sl[r]], "decode: slots must be distinct");
      seen[sl[r]] = true;
    }
    py::gil_scoped_release nogil;
    stack_->step_rows(ptr<float>(x), m, sl, ps, md, ptr<float>(out));
  }

  // A prompt of t positions in cache slot `slot` after `start` cached ones: x fp32 [t][dim], out as step().
  void prefill(uintptr_t x, int64_t t, int64_t slot, int64_t start, int modality, uintptr_t out) {
    require(has_head_, "decode: set_head before prefill");
    require(t > 0, "decode: prefill needs at least one position");
    require(slot >= 0 && slot < shape_.rows, "decode: slot outside [0, slots)");
    require(start >= 0 && start + t <= shape_.ctx, "decode: positions outside the cache");
    require(modality == 0 || modality == 1, "decode: modality must be 0 or 1");
    require(x && out, "decode: null pointer");
    py::gil_scoped_release nogil;
    stack_->prefill(ptr<float>(x), t, slot, start, modality, ptr<float>(out));
  }

  int64_t n_layers() const { return stack_->n_layers(); }

 private:
  // A norm of this stack: its width and eps must be the model's (the stack applies one eps to every norm).
  DecodeNorm decode_norm(const char* what, const NormAdapterWeights& n) const {
    const std::string w(what);
    require(n.dim == shape_.dim, w + ": norm width does not match the model");
    require(n.eps == shape_.eps, w + ": norm eps does not match the stack's");
    return n.norm;
  }

  DecodeShape shape_;
  std::unique_ptr<DecodeStack> stack_;
  bool has_head_ = false;
};

double py_read_bandwidth(uintptr_t buf, int64_t nbytes, int threads) {
  require(buf != 0 && nbytes >= 64, "read_bandwidth: need a buffer of at least 64 bytes");
  py::gil_scoped_release nogil;
  return read_bandwidth_kernel(ptr<const void>(buf), nbytes, resolve_threads(threads));
}

// ---- CUDA --------------------------------------------------------------------------------------
#ifdef LAVIN_EDGE_WITH_CUDA
void check_cuda(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("CUDA error: " + err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.attr("MAX_ADAPTER_RANK") = kMaxAdapterRank;
  m.doc() = "lavin-edge native kernels (CPU: scalar/AVX2/AVX-512 VNNI; CUDA when built with nvcc)";
  register_cuda(m);
  m.def("cpu_features", &py_cpu_features, "CPU features the kernels dispatch on, plus best_isa and build info");
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
  py::class_<LinearPart>(m, "LinearPart", "One W4 part of a DecodeStack linear (see decode_linear)")
      .def(py::init([](const W4Weights& w, int64_t out_offset, bool accumulate, int threads) {
             return LinearPart{w, out_offset, accumulate, threads};
           }),
           py::arg("weights"), py::arg("out_offset") = 0, py::arg("accumulate") = false, py::arg("threads") = 1)
      .def_readonly("out_offset", &LinearPart::out_offset)
      .def_readonly("accumulate", &LinearPart::accumulate)
      .def_readonly("threads", &LinearPart::threads);
  py::class_<PyDecodeStack>(m, "DecodeStack",
                            "One decode step of the whole decoder per call, one sequence or m batch rows (csrc/decode.cpp); holds "
                            "raw addresses, so the caller keeps every tensor alive")
      .def(py::init<const std::string&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double,
                    uintptr_t, int, int64_t>(),
           py::arg("isa"), py::arg("dim"), py::arg("n_heads"), py::arg("n_kv"), py::arg("head_dim"), py::arg("ffn"),
           py::arg("ctx"), py::arg("vocab"), py::arg("eps"), py::arg("rope"), py::arg("threads") = 0,
           py::arg("slots") = 1)
      .def("add_layer", &PyDecodeStack::add_layer, py::arg("attn_in"), py::arg("ffn_norm"), py::arg("wqkv"),
           py::arg("wo"), py::arg("w13"), py::arg("w2"), py::arg("k_cache"), py::arg("v_cache"))
      .def("set_head", &PyDecodeStack::set_head, py::arg("norm"), py::arg("head"), py::arg("rescore_weight") = 0,
           py::arg("rescore_dtype") = "float32", py::arg("rescore_numel") = 0, py::arg("rescore_top") = 0)
      .def("step", &PyDecodeStack::step, py::arg("x"), py::arg("pos"), py::arg("modality"), py::arg("out"))
      .def("step_rows", &PyDecodeStack::step_rows, py::arg("x"), py::arg("m"), py::arg("slot"), py::arg("pos"),
           py::arg("modality"), py::arg("out"))
      .def("prefill", &PyDecodeStack::prefill, py::arg("x"), py::arg("t"), py::arg("slot"), py::arg("start"),
           py::arg("modality"), py::arg("out"))
      .def_property_readonly("n_layers", &PyDecodeStack::n_layers);
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
  m.def("max_threads", []() { return omp_get_max_threads(); });
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
