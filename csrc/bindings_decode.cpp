// lavin_edge._C: the whole-decoder decode step (DecodeStack, csrc/decode.cpp) and its linear parts.
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings_common.h"

namespace lavin_bind {

namespace {

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
    const Backend& be = backend_named(isa);
    require(dim > 0 && n_heads > 0 && n_kv > 0 && head_dim > 0 && ffn > 0 && ctx > 0 && vocab > 0,
            "decode: sizes must be positive");
    require(slots > 0 && slots <= 4096, "decode: slots must be in [1, 4096]");
    require(n_heads % n_kv == 0 && head_dim % 2 == 0, "decode: n_heads must be a multiple of n_kv, head_dim even");
    require(rope != 0, "decode: null rope table");
    stack_ = std::make_unique<DecodeStack>(shape_, be.gemm, be.llm_adapter, be.attend,
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

}  // namespace

void register_decode(py::module_& m) {
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
}

}  // namespace lavin_bind
