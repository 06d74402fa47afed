"""The serving engine: a merged (fp) or GPTQ-quantized LaVIN model dir -> prefill + decode, batch 1.

Runtime model (DESIGN.md section 1): LLM routing is a constant table after merge, so position 0 (the
modality token) is dropped; every layer applies ``n + U_m (A n + a) + u_m`` to its attention-input
RMSNorm output ``n``, m the sequence's modality (0 text, 1 image). Runtime position p keeps its
absolute index p + 1 for the rotary embedding, so logits equal the unmerged model's.

Backends: ``kernels`` runs the LLM linears through the extension's W4 GEMV/GEMM, the attention-input
RMSNorm + folded adapter through its fused kernel and the vision tower's adapters through its
per-token routed kernel; ``torch`` is plain PyTorch (quantized weights are dequantized at load).
``auto`` picks ``kernels`` when the extension imports, else falls back to ``torch`` with a warning.

The decode step runs in one native call when the kernels serve every op (``fused_decode.py``); the
PyTorch loop of ``_step`` is its reference and the path of the torch backend. That loop is written for low
dispatch: weights are fused where that is exact (q|k|v and gate|up share one matmul), the KV cache is
preallocated in SDPA's [1, heads, ctx, hd] layout so no per-step transpose or copy of the cache happens,
rotary uses one complex multiply for q and k together, and everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lavin_edge.chat.sampling import GenerationConfig, Sampler, StopStringStream
from lavin_edge.config import LavinConfig
from lavin_edge.merge import ModelDirError  # one error type for every model-dir problem

__all__ = ["ContextError", "Engine", "GenerationResult", "GenerationStats", "ModelDirError"]

HEAD_RESCORE_TOP = 8  # logits of the W4 head re-scored from the fp weight rows (RescoredHead)
SMALL_WEIGHTS = 1 << 22  # weights below which a decode GEMV stays on one thread (4M: 2 MB at 4 bits)
MERGED_FORMAT = "lavin-edge-merged"  # quantized dirs keep it and add quantization_config (lavin_edge.merge)
TEXT, IMAGE = 0, 1




class ContextError(ValueError):
    """A prompt that does not fit the context window."""


# ------------------------------------------------------------------------------------------- linears

class LinearOp:
    """y = x W^T for x [T, K] fp32 contiguous. ``nbytes`` counts the weight bytes one call reads."""

    n_out: int
    n_in: int
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class DenseLinear(LinearOp):
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.float().contiguous()
        self.n_out, self.n_in = self.weight.shape
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


@dataclass
class GPTQTensors:
    """One linear in the standard GPTQ layout (see ``lavin_edge.quantize.pack``)."""

    qweight: torch.Tensor  # int32 [K/8, N]
    qzeros: torch.Tensor  # int32 [G, N/8]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    checkpoint_format: str = "gptq"
    group_size: int = 128

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[1], self.qweight.shape[0] * 8

    def dequantize(self) -> torch.Tensor:
        from lavin_edge.quantize.pack import dequantize_packed

        return dequantize_packed({"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales,
                                  "g_idx": self.g_idx}, 4, self.checkpoint_format)

    @staticmethod
    def concat(parts: list[GPTQTensors]) -> GPTQTensors | None:
        """Stack linears along N (one matmul for q|k|v) when that is exact: same K, same g_idx, same format,
        and every N a multiple of 8 (qzeros packs 8 columns per int32). None when not possible."""
        first = parts[0]
        for p in parts:
            if (p.qweight.shape[0] != first.qweight.shape[0] or p.checkpoint_format != first.checkpoint_format
                    or p.scales.shape[1] % 8 or not torch.equal(p.g_idx, first.g_idx)):
                return None
        return GPTQTensors(torch.cat([p.qweight for p in parts], 1), torch.cat([p.qzeros for p in parts], 1),
                           torch.cat([p.scales for p in parts], 1), first.g_idx, first.checkpoint_format,
                           first.group_size)


class W4Linear(LinearOp):
    """A GPTQ linear on the extension's W4 kernel (``lavin_edge.kernels.prepare_w4``).

    The wrapper's ``matmul`` validates its input on every call (dtype, shape, contiguity, backend from the
    environment); in the decode loop that costs more than the 576-wide GEMV itself, so the validated,
    prepared arguments are bound once here and the hot path calls ``_C.w4_gemm`` directly. Inputs come
    from the engine only: fp32, contiguous, [T, K]."""

    def __init__(self, t: GPTQTensors, kernels: Any) -> None:
        self.n_out, self.n_in = t.shape
        p = kernels.prepare_w4(t.qweight, t.qzeros, t.scales, t.g_idx, t.group_size, t.checkpoint_format)
        self.prepared = p
        self.nbytes = int(p.nbytes)
        self._fast: tuple[Any, ...] | None = None
        isa = kernels.backend()
        if p.mode == "tiled" and isa != "torch":
            perm_ptr, perm_n = (p.perm.data_ptr(), p.perm.numel()) if p.perm is not None else (0, 0)
            self._c = kernels._C
            self._fast = (isa, p.qw.data_ptr(), p.qw.numel(), p.scales.data_ptr(), p.scales.numel(),
                          p.zeros.data_ptr(), p.zeros.numel(), perm_ptr, perm_n, p.n, p.np_, p.k, p.kp, p.groups)
            # Small GEMVs run on one thread: an OpenMP fork/join costs more than a < 2 MB weight read, and on
            # a shared machine a barrier waiting for a descheduled thread costs milliseconds.
            self._threads = 1 if self.n_out * self.n_in < SMALL_WEIGHTS else torch.get_num_threads()
            self._threads_big = torch.get_num_threads()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast is None:
            return self.prepared.matmul(x)
        if x.stride(-1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        y = torch.empty(m, self.n_out)
        # Row stride passed through: a column slice (the SwiGLU half of gate|up) needs no copy.
        self._c.w4_gemm(*self._fast, x.data_ptr(), m, x.stride(0) if m > 1 else self.n_in, y.data_ptr(),
                        self.n_out, self._threads if m == 1 else self._threads_big)
        return y


def _rtn_gptq(w: torch.Tensor, group_size: int) -> GPTQTensors:
    """Round-to-nearest 4-bit (symmetric, the GPTQ grid) of an fp weight, packed in the GPTQ layout."""
    from lavin_edge.quantize.gptq import rtn_quantize
    from lavin_edge.quantize.pack import pack_linear

    t = pack_linear(rtn_quantize(w, 4, group_size, True), 4, "gptq")
    return GPTQTensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], "gptq", group_size)


def make_linear(w: torch.Tensor | GPTQTensors, kernels: Any) -> LinearOp:
    if isinstance(w, torch.Tensor):
        return DenseLinear(w)
    if kernels is not None:
        return W4Linear(w, kernels)
    return DenseLinear(w.dequantize())


# ------------------------------------------------------------------------------------------- layers

@dataclass
class NormAdapter:
    """RMSNorm(x) * g followed by the folded routed adapter of one modality:
    n + U_m (A n + a) + u_m. ``U`` [2, D, r], ``u`` [2, D]. With the extension, one fused kernel call
    (bound once, as for W4Linear); ``row_modality`` is the engine's int32 buffer of per-row modality."""

    g: torch.Tensor
    A: torch.Tensor
    a: torch.Tensor
    U: torch.Tensor
    u: torch.Tensor
    eps: float
    kernels: Any = None
    plain: bool = False  # no adapter: a bare RMSNorm (zero rank-1 adapter for the kernel, exactly n)

    @classmethod
    def rmsnorm(cls, g: torch.Tensor, eps: float, kernels: Any) -> NormAdapter:
        """RMSNorm alone. With the kernels it runs through the fused kernel with a zero adapter: one C call,
        about half the time of F.rms_norm's several dispatched ops at D = 576, and exact."""
        d = g.shape[0]
        return cls(g.float().contiguous(), torch.zeros(1, d), torch.zeros(1), torch.zeros(2, d, 1),
                   torch.zeros(2, d), eps, kernels, plain=True)

    def __post_init__(self) -> None:
        self._fast: tuple[Any, ...] | None = None
        if self.kernels is not None and self.kernels.backend() != "torch":
            self._c = self.kernels._C
            self._isa = self.kernels.backend()
            self._threads = torch.get_num_threads()
            self._fast = (self.g.data_ptr(), self.A.data_ptr(), self.a.data_ptr(), self.U.data_ptr(),
                          self.u.data_ptr())

    def __call__(self, x: torch.Tensor, modality: int, row_modality: torch.Tensor) -> torch.Tensor:
        if self._fast is not None:
            rows, dim = x.shape
            y = torch.empty_like(x)
            g, A, a, U, u = self._fast
            self._c.llm_adapter(self._isa, x.data_ptr(), y.data_ptr(), rows, dim, self.A.shape[0], g, A, a, U, u,
                                row_modality.data_ptr(), self.eps, 1 if rows == 1 else self._threads)
            return y
        n = F.rms_norm(x, (x.shape[-1],), self.g, self.eps)
        if self.plain:
            return n
        return n + F.linear(F.linear(n, self.A, self.a), self.U[modality], self.u[modality])


@dataclass
class Layer:
    attn_in: NormAdapter
    wqkv: LinearOp
    wo: LinearOp
    ffn_norm: NormAdapter
    w13: LinearOp
    w2: LinearOp
    k_cache: torch.Tensor  # [1, n_kv, ctx, hd]
    v_cache: torch.Tensor


# ------------------------------------------------------------------------------------------- loading

def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelDirError(f"{path}: model directory not found")
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory (expected a merged or quantized model dir)")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelDirError(f"{path}: no config.json (not a lavin-edge model dir)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{cfg_path}: not valid JSON ({e})") from e
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt != MERGED_FORMAT:
        hint = " (trained adapters: run `lavin-edge merge` first)" if (path / "adapters.safetensors").exists() else ""
        raise ModelDirError(f"{path}: config.json format {fmt!r} is not a servable lavin-edge model "
                            f"(expected {MERGED_FORMAT!r}){hint}")
    version = cfg.get("format_version")
    if version != 1:
        raise ModelDirError(f"{path}: format_version {version!r} is not supported by this lavin-edge "
                            "(supports 1); re-run merge/quantize with this version")
    return cfg


def _lavin_config(cfg: dict[str, Any]) -> LavinConfig:
    try:
        return LavinConfig.from_dict(cfg["lavin_config"])
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"config.json does not describe a LaVIN model ({e})") from e


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"{path}: no .safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelDirError(f"{f}: unreadable safetensors file ({e})") from e
    return out


def _quant_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    q = cfg.get("quantization_config") or {}
    if q and int(q.get("bits", 4)) != 4:
        raise ModelDirError(f"quantization_config bits={q.get('bits')}: only 4-bit GPTQ is served")
    return {"checkpoint_format": q.get("checkpoint_format", "gptq"), "group_size": int(q.get("group_size", 128))}


def _take_linear(sd: Mapping[str, torch.Tensor], name: str, q: dict[str, Any]) -> torch.Tensor | GPTQTensors:
    if f"{name}.weight" in sd:
        return sd[f"{name}.weight"]
    keys = [f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")]
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ModelDirError(f"tensor {name}.weight (or its GPTQ tensors {missing}) missing from the model")
    return GPTQTensors(*(sd[k] for k in keys), q["checkpoint_format"], q["group_size"])  # type: ignore[arg-type]


def _fuse(parts: list[torch.Tensor | GPTQTensors], kernels: Any) -> LinearOp:
    """One op for several linears sharing the input (q|k|v, gate|up)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return DenseLinear(torch.cat(parts, 0))  # type: ignore[arg-type]
    if all(isinstance(p, GPTQTensors) for p in parts):
        if kernels is not None:
            cat = GPTQTensors.concat(parts)  # type: ignore[arg-type]
            if cat is not None:
                return W4Linear(cat, kernels)
            return _Concat([W4Linear(p, kernels) for p in parts])  # type: ignore[arg-type]
        return DenseLinear(torch.cat([p.dequantize() for p in parts], 0))  # type: ignore[union-attr]
    return _Concat([make_linear(p, kernels) for p in parts])


class _Sum(LinearOp):
    """y = sum of the parts' outputs (a weight stored as a 4-bit value plus a 4-bit residual)."""

    def __init__(self, ops: list[LinearOp]) -> None:
        self.ops = ops
        self.n_in, self.n_out = ops[0].n_in, ops[0].n_out
        self.nbytes = sum(o.nbytes for o in ops)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops[0](x)
        for o in self.ops[1:]:
            y += o(x)
        return y


class RescoredHead(LinearOp):
    """An approximate head (the 4-bit value + residual passes) whose ``top`` largest logits per row are then
    recomputed exactly from the fp weight rows ``weight`` [V, D] (any float dtype, read as fp32).

    The two W4 passes hold the weights to about 8 bits: enough for most logits, not for the near-ties that
    decide the next token. Re-scoring the top few from the fp rows reads ``top`` x D weights instead of V x D:
    on SmolLM2 the engine's top-1 agreement with the exact model rose from 98.9% to 99.95% and its perplexity
    rise from +1.3% to -0.03% (README, "Accuracy of the engine"); logits outside the top keep the W4 error."""

    def __init__(self, approx: LinearOp, weight: torch.Tensor, top: int) -> None:
        self.approx, self.weight, self.top = approx, weight, top
        self.n_in, self.n_out = approx.n_in, approx.n_out
        self.nbytes = approx.nbytes + top * self.n_in * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.approx(x)
        idx = y.topk(min(self.top, self.n_out), dim=-1).indices  # [T, top]
        rows = self.weight[idx].float()  # [T, top, D]
        y.scatter_(-1, idx, torch.bmm(rows, x.float()[:, :, None])[:, :, 0])
        return y


class _Concat(LinearOp):
    """Fallback when linears cannot share one weight (different act-order permutations)."""

    def __init__(self, ops: list[LinearOp]) -> None:
        self.ops = ops
        self.n_in = ops[0].n_in
        self.n_out = sum(o.n_out for o in ops)
        self.nbytes = sum(o.nbytes for o in ops)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([o(x) for o in self.ops], -1)


def load_kernels(backend: str) -> Any:
    """The kernel module for ``backend`` (None: plain PyTorch). ``auto`` warns when it falls back, since
    the wrapper's own torch fallback would dequantize W4 weights on every call."""
    if backend not in ("auto", "kernels", "torch"):
        raise ValueError(f"backend must be auto, kernels or torch, got {backend!r}")
    if backend == "torch":
        return None
    try:
        from lavin_edge import kernels as k

        if k._C is None:
            raise ImportError(k._IMPORT_ERROR or "lavin_edge._C not built")
    except ImportError as e:
        if backend == "kernels":
            raise ModelDirError(f"backend 'kernels' requested but the extension is unavailable ({e})") from e
        warnings.warn(f"lavin_edge extension unavailable ({e}); running the slower PyTorch fallback",
                      RuntimeWarning, stacklevel=2)
        return None
    return k


# ------------------------------------------------------------------------------------------- engine

@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    vision_s: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes out of the prefill; decode steps produce the rest.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
                "ttft_ms": round(self.ttft_s * 1000, 2), "vision_ms": round(self.vision_s * 1000, 2),
                "stop_reason": self.stop_reason}


@dataclass
class GenerationResult:
    ids: list[int]
    text: str
    stats: GenerationStats


class Engine:
    """Batch-1 inference on a merged/quantized LaVIN. The KV cache holds one conversation; ``length`` says
    how many runtime positions are filled, so a new turn can be appended without recomputing history."""

    def __init__(self, cfg: LavinConfig, sd: Mapping[str, torch.Tensor], quant: dict[str, Any] | None = None,
                 backend: str = "auto", max_context: int | None = None, tokenizer: Any = None,
                 position_offset: int = 1, head_w4: bool | None = None) -> None:
        self.cfg = cfg
        llm = cfg.llm
        self.kernels = load_kernels(backend)
        self.backend = "kernels" if self.kernels is not None else "torch"
        self.tokenizer = tokenizer
        quant = quant or {"checkpoint_format": "gptq", "group_size": 128}
        if any(k.startswith("llm.") for k in sd):  # module naming; the file naming has LLM names top level
            sd = {k.removeprefix("llm."): v for k, v in sd.items()}
        # Position 0 is gone at run time, so the usable context is what remains after the offset.
        capacity = llm.max_seq_len + 1 - position_offset
        self.max_context = min(max_context or capacity, capacity)
        self.n_heads, self.n_kv, self.hd, self.dim = llm.n_heads, llm.n_kv_heads, llm.head_dim, llm.dim
        try:
            # Kept in its stored dtype (a 16-bit table halves a 7B model's 0.5 GB); rows are cast on lookup.
            self.embed = sd["tok_embeddings.weight"].contiguous()
            self.norm = NormAdapter.rmsnorm(sd["norm.weight"], llm.norm_eps, self.kernels)
            out = sd.get("output.weight") if not llm.tie_embeddings else None
            head = _take_linear(sd, "output", quant) if (out is not None or "output.qweight" in sd) else self.embed
            if isinstance(head, torch.Tensor):
                head = head.float()
            # An fp32 vocab x dim head is the largest read of a small model's decode step (SmolLM2: 113 MB of
            # ~180 MB). With the kernels it runs as two 4-bit passes: RTN of W, then RTN of the residual
            # W - W4(W) (group 64), ~8-bit accuracy for 1/4 of the fp32 bytes. A single 4-bit pass flipped a
            # third of SmolLM2's top-1 predictions; the residual pass brings it back (see the bench notes).
            # head_w4=False keeps it exact fp32.
            # int32 packing of the zero points needs a vocab that is a multiple of 8.
            packable = isinstance(head, torch.Tensor) and head.shape[0] % 8 == 0
            self.head_w4 = (self.kernels is not None and packable) if head_w4 is None else head_w4
            if self.head_w4 and isinstance(head, torch.Tensor):
                if self.kernels is None:
                    raise ModelDirError("head_w4 needs the kernels backend")
                gs = next((g for g in (64, 32) if self.dim % g == 0), -1)
                hi = _rtn_gptq(head, gs)
                lo = _rtn_gptq(head - hi.dequantize(), gs)
                w4 = _Sum([W4Linear(hi, self.kernels), W4Linear(lo, self.kernels)])
                # The top candidates are re-scored from the fp weight rows (the stored tensor: the tied
                # embedding table costs no memory): no extra bytes per step, exact top-1 (issue 14).
                stored = self.embed if out is None else out
                self.lm_head: LinearOp = RescoredHead(w4, stored, HEAD_RESCORE_TOP)
            else:
                self.lm_head = make_linear(head, self.kernels)
            self.layers = [self._layer(sd, i, quant) for i in range(llm.n_layers)]
        except KeyError as e:
            raise ModelDirError(f"tensor {e} missing from the model") from e
        # Rotary as complex numbers for runtime slot p = absolute position p + offset.
        inv = 1.0 / llm.rope_theta ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd)
        pos = torch.arange(position_offset, position_offset + self.max_context, dtype=torch.float64)
        ang = torch.outer(pos, inv)
        self.rope = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)  # [ctx, hd/2]
        self.length = 0
        self.history: list[int] = []  # token ids in the cache (visual slots hold their placeholder ids)
        self.modality = TEXT
        # Per-row modality for the fused adapter kernel: a row range of one of these, never reallocated.
        self._row_mod = [torch.full((self.max_context,), m, dtype=torch.int32) for m in (TEXT, IMAGE)]
        self.vision, self.visual_proj = self._vision(sd)
        # The decode step in one native call when every op runs on the kernels (lavin_edge.chat.fused_decode);
        # None: the per-op loop of _step, the readable reference it is tested against.
        from lavin_edge.chat.fused_decode import build_fused_decode

        self.fused_decode = build_fused_decode(self)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", max_context: int | None = None,
             head_w4: bool | None = None) -> Engine:
        from lavin_edge.io.tokenizer import ByteTokenizer, load_tokenizer
        from lavin_edge.merge import tokenizer_path

        path = Path(path)
        raw = _read_config(path)
        cfg = _lavin_config(raw)
        try:
            tok_file = tokenizer_path(path, raw)
            # No tokenizer entry: the byte tokenizer, the only one a model can have without a vocab file.
            tok = ByteTokenizer() if tok_file is None else load_tokenizer(tok_file)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise ModelDirError(f"{path}: tokenizer: {e}") from e
        sd = _load_tensors(path)
        return cls(cfg, sd, _quant_settings(raw), backend, max_context, tok, int(raw.get("position_offset", 1)),
                   head_w4)

    def _layer(self, sd: Mapping[str, torch.Tensor], i: int, quant: dict[str, Any]) -> Layer:
        p = f"layers.{i}."
        ad = {k: sd[p + "adapter." + k].float().contiguous() for k in ("down.weight", "down.bias", "up.weight",
                                                                          "up.bias")}
        if ad["up.weight"].dim() != 3 or ad["up.weight"].shape[0] != 2:
            raise ModelDirError(f"{p}adapter.up.weight has shape {tuple(ad['up.weight'].shape)}, expected "
                                "[2, D, r] (routing folded per modality): not a merged model")
        attn_in = NormAdapter(sd[p + "attention_norm.weight"].float(), ad["down.weight"], ad["down.bias"],
                              ad["up.weight"], ad["up.bias"], self.cfg.llm.norm_eps, self.kernels)
        lin = {n: _take_linear(sd, p + n, quant) for n in ("attention.wq", "attention.wk", "attention.wv",
                                                            "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                                            "feed_forward.w3")}
        cache_shape = (1, self.n_kv, self.max_context, self.hd)
        return Layer(
            attn_in=attn_in,
            wqkv=_fuse([lin["attention.wq"], lin["attention.wk"], lin["attention.wv"]], self.kernels),
            wo=make_linear(lin["attention.wo"], self.kernels),
            ffn_norm=NormAdapter.rmsnorm(sd[p + "ffn_norm.weight"], self.cfg.llm.norm_eps, self.kernels),
            w13=_fuse([lin["feed_forward.w1"], lin["feed_forward.w3"]], self.kernels),
            w2=make_linear(lin["feed_forward.w2"], self.kernels),
            k_cache=torch.zeros(cache_shape),
            v_cache=torch.zeros(cache_shape),
        )

    def _vision(self, sd: Mapping[str, torch.Tensor]) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        # Iterate names, not items: a lazy mapping (the 7B benchmark) must not materialise every tensor.
        vis = {k.removeprefix("vision."): sd[k] for k in sd if k.startswith("vision.")}
        if not vis:
            return None, None  # a text-only export
        from lavin_edge.model.adapter import VisualProjection
        from lavin_edge.model.vision import build_vision_tower

        tower = build_vision_tower(self.cfg.vision, self.cfg.adapter)
        proj = VisualProjection(tower.token_dims, self.cfg.llm.dim, self.cfg.adapter.proj_hidden)
        try:
            tower.load_state_dict(vis, strict=True)
            proj.load_state_dict({k.removeprefix("visual_proj."): sd[k] for k in sd if k.startswith("visual_proj.")},
                                 strict=True)
        except RuntimeError as e:
            raise ModelDirError(f"vision tower tensors do not match the config: {str(e).splitlines()[0]}") from e
        tower.eval().float()
        proj.eval().float()
        if self.kernels is not None:
            _route_adapters_through_kernel(tower, self.kernels)
        return tower, proj

    @property
    def n_visual(self) -> int:
        return self.cfg.vision.n_tokens

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (linears + lm_head; embeddings read one row)."""
        per_layer = sum(op.nbytes for lyr in self.layers for op in (lyr.wqkv, lyr.wo, lyr.w13, lyr.w2))
        return per_layer + self.lm_head.nbytes

    # -- forward ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """A preprocessed image [3, S, S] -> the visual token embeddings [n_visual, D]."""
        if self.vision is None or self.visual_proj is None:
            raise ModelDirError("this model has no vision tower (text-only export)")
        return self.visual_proj(self.vision(image[None].float()))[0].float()

    def embed_prompt(self, ids: list[int], image_pos: int = -1, visual: torch.Tensor | None = None
                     ) -> torch.Tensor:
        h = self.embed[torch.tensor(ids, dtype=torch.long)].float()
        if image_pos >= 0:
            if visual is None:
                raise ValueError("image_pos given without visual tokens")
            h[image_pos:image_pos + visual.shape[0]] = visual
        return h

    def reset(self, modality: int = TEXT) -> None:
        self.length = 0
        self.history = []
        self.modality = modality

    def rewind(self, n: int) -> None:
        """Forget cache positions from ``n`` on (causal attention: the first n stay valid as they are)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot rewind to {n}: {self.length} positions cached")
        self.length = n
        del self.history[n:]

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Embeddings h [T, D] at runtime positions length..length+T-1 -> logits ([V] or [T, V])."""
        t = h.shape[0]
        start = self.length
        if start + t > self.max_context:
            raise ContextError(f"{start + t} positions exceed the context of {self.max_context}")
        if t == 1:
            return self._step(h)
        nh, nkv, hd, m = self.n_heads, self.n_kv, self.hd, self.modality
        row_mod = self._row_mod[m]
        qk_w = (nh + nkv) * hd
        rope = self.rope[start:start + t, None, :]
        end = start + t
        mask = None
        if start > 0:
            # Appending a turn: new queries see the whole history plus themselves causally.
            rows = torch.arange(start, end)[:, None]
            mask = torch.arange(end)[None, :] <= rows
        gqa = nkv != nh
        x = h.float().contiguous()
        for lyr in self.layers:
            n = lyr.attn_in(x, m, row_mod)
            qkv = lyr.wqkv(n)
            qk = torch.view_as_complex(qkv[:, :qk_w].reshape(t, nh + nkv, hd // 2, 2))
            qk = torch.view_as_real(qk * rope).reshape(t, nh + nkv, hd)
            q = qk[:, :nh].transpose(0, 1)[None]
            lyr.k_cache[0, :, start:end] = qk[:, nh:].transpose(0, 1)
            lyr.v_cache[0, :, start:end] = qkv[:, qk_w:].view(t, nkv, hd).transpose(0, 1)
            att = F.scaled_dot_product_attention(q, lyr.k_cache[:, :, :end], lyr.v_cache[:, :, :end],
                                                 attn_mask=mask, is_causal=start == 0, enable_gqa=gqa)
            x = x + lyr.wo(att[0].transpose(0, 1).reshape(t, nh * hd))
            g = lyr.w13(lyr.ffn_norm(x, m, row_mod))
            f = g.shape[-1] // 2
            x = x + lyr.w2(F.silu(g[:, :f]) * g[:, f:])
        self.length = end
        if last_only:
            x = x[-1:].contiguous()
        logits = self.lm_head(self.norm(x, m, row_mod))
        return logits[0] if last_only else logits

    def _step(self, h: torch.Tensor) -> torch.Tensor:
        """One decode step (h [1, D]): the hot loop, written for few dispatched ops per layer. All views are
        plain reshapes of contiguous [1, N] rows; SwiGLU runs in place on the gate half. With the kernels the
        same step runs in one native call (``fused_decode``); this loop is its reference."""
        if self.fused_decode is not None:
            logits = self.fused_decode.step(h, self.length, self.modality)
            self.length += 1
            return logits
        nh, nkv, hd, m = self.n_heads, self.n_kv, self.hd, self.modality
        pos = self.length
        end = pos + 1
        row_mod = self._row_mod[m]
        qk_w = (nh + nkv) * hd
        rope = self.rope[pos]  # [hd/2] complex
        gqa = nkv != nh
        f = self.layers[0].w13.n_out // 2
        x = h.float()
        for lyr in self.layers:
            qkv = lyr.wqkv(lyr.attn_in(x, m, row_mod))[0]
            qk = torch.view_as_real(torch.view_as_complex(qkv[:qk_w].view(nh + nkv, hd // 2, 2)) * rope)
            lyr.k_cache[0, :, pos] = qk[nh:].view(nkv, hd)
            lyr.v_cache[0, :, pos] = qkv[qk_w:].view(nkv, hd)
            att = F.scaled_dot_product_attention(qk[:nh].view(1, nh, 1, hd), lyr.k_cache[:, :, :end],
                                                 lyr.v_cache[:, :, :end], enable_gqa=gqa)
            x = x + lyr.wo(att.view(1, nh * hd))
            g = lyr.w13(lyr.ffn_norm(x, m, row_mod))
            a = g[:, :f]
            x = x + lyr.w2(F.silu(a, inplace=True).mul_(g[:, f:]))
        self.length = end
        return self.lm_head(self.norm(x, m, row_mod))[0]

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, new_ids: list[int], gen: GenerationConfig, image_pos: int = -1,
                 visual: torch.Tensor | None = None, on_text: Callable[[str], None] | None = None,
                 stats: GenerationStats | None = None, stop_ids: set[int] | None = None) -> GenerationResult:
        """Prefill ``new_ids`` after the cached history (``length`` positions), then decode.

        The stop token (EOS / end-of-turn) is fed to the cache too, so the next turn can append.
        ``stop_ids`` overrides the tokenizer's (an empty set makes benchmarks produce exactly N tokens)."""
        gen.validate()
        tok = self.tokenizer
        if stop_ids is None:
            stop_ids = set(getattr(tok, "stop_ids", {tok.eos_id}))
        stats = stats or GenerationStats()
        room = self.max_context - self.length - len(new_ids)
        if room < 1:
            raise ContextError(f"prompt of {len(new_ids)} tokens does not fit: {self.length} in history, "
                               f"context {self.max_context}")
        budget = min(gen.max_new_tokens, room)
        sampler = Sampler(gen, self.embed.shape[0])
        sampler.observe(new_ids)
        stream = StopStringStream(tok.decode, gen.stop_strings)
        t0 = time.perf_counter()
        logits = self.forward(self.embed_prompt(new_ids, image_pos, visual))
        self.history.extend(new_ids)
        nxt = sampler(logits)
        t1 = time.perf_counter()
        stats.prompt_tokens, stats.prefill_s, stats.ttft_s = len(new_ids), t1 - t0, t1 - t0 + stats.vision_s
        out: list[int] = []
        reason = "length"
        step_in = torch.empty(1, dtype=torch.long)
        with torch.inference_mode():
            while True:
                if nxt in stop_ids:
                    reason = "eos"
                    if self.length < self.max_context:
                        step_in[0] = nxt
                        self.forward(self.embed[step_in].float())  # keep the end of turn in the history
                        self.history.append(nxt)
                    break
                out.append(nxt)
                piece = stream.push(nxt)
                if piece and on_text is not None:
                    on_text(piece)
                if stream.stopped:
                    reason = "stop_string"
                    break
                if len(out) >= budget:
                    break
                step_in[0] = nxt
                nxt = sampler(self.forward(self.embed[step_in].float()))
                self.history.append(step_in.item())
        rest = stream.finish()
        if rest and on_text is not None:
            on_text(rest)
        stats.decode_s = time.perf_counter() - t1
        stats.new_tokens = len(out)
        stats.stop_reason = reason
        return GenerationResult(out, stream.text, stats)


# ------------------------------------------------------------------------------------------- vision

def _route_adapters_through_kernel(tower: torch.nn.Module, kernels: Any) -> None:
    """Point every routed adapter of the (frozen, eval-mode) tower at the per-token routed kernel."""
    from lavin_edge.model.adapter import RoutedAdapter

    for mod in tower.modules():
        if isinstance(mod, RoutedAdapter):
            mod.forward = _kernel_adapter_forward(mod, kernels)  # type: ignore[method-assign]


def _kernel_adapter_forward(mod: Any, kernels: Any) -> Callable[..., torch.Tensor]:
    r = mod.up_b
    d = mod.up_d

    def forward(x: torch.Tensor, route_x: torch.Tensor | None = None) -> torch.Tensor:
        if route_x is not None:  # not per-token routing: keep the module's own maths
            return type(mod).forward(mod, x, route_x)
        shape = x.shape
        y = kernels.vit_routed_adapter(
            x.reshape(-1, shape[-1]).float().contiguous(), mod.down.weight, mod.down.bias, mod.router.weight,
            mod.router.bias, r.weight, r.bias, d.weight, d.bias, float(mod.temperature), float(mod.scale))
        return y.view(shape).to(x.dtype)
    return forward


def top1_agreement(ref: Engine, other: Engine, prompts: list[tuple[list[int], int, torch.Tensor | None]],
                   answer_tokens: int = 8, all_positions: bool = False) -> float:
    """Top-1 agreement of ``other``'s next-token predictions with ``ref``'s on ``prompts`` ((ids, image_pos,
    image or None) each).

    Default: where the model answers. ``ref`` greedily continues each prompt (up to ``answer_tokens``, stop
    token included); both engines then read prompt + that continuation in one pass (teacher forcing) and
    their argmax is compared at every position that predicts an answer token. ``all_positions`` compares
    every prompt position instead (harsher: inside a prompt the next token is often a near tie)."""
    from lavin_edge.chat.sampling import GenerationConfig

    same = total = 0
    for ids, pos, image in prompts:
        mod = IMAGE if pos >= 0 else TEXT
        seq, first, last = ids, 0, len(ids)
        if not all_positions:
            ref.reset(mod)
            visual = ref.encode_image(image) if image is not None else None
            res = ref.generate(ids, GenerationConfig(max_new_tokens=answer_tokens), pos, visual)
            stop = [ref.history[-1]] if res.stats.stop_reason == "eos" else []
            seq = ids + res.ids + stop
            first, last = len(ids) - 1, len(seq) - 1
        preds = []
        for e in (ref, other):
            e.reset(mod)
            visual = e.encode_image(image) if image is not None else None
            logits = e.forward(e.embed_prompt(seq, pos, visual), last_only=False)
            preds.append(logits[first:last].argmax(-1))
        same += int((preds[0] == preds[1]).sum())
        total += preds[0].numel()
    return same / max(total, 1)
