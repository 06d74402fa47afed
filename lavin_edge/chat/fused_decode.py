"""The whole decode step in one native call (``lavin_edge._C.DecodeStack``, csrc/decode.cpp).

``Engine._step`` is the reference: ~20 PyTorch ops and kernel calls per layer. On a small model each costs
more in Python dispatch than its arithmetic (SmolLM2-135M: ~7.6 ms per token of which ~2.5 ms is reading
the weights), so when every linear of the model runs on the extension's W4 kernel the engine hands the step to
``DecodeStack``, which runs the same ops (norm + folded adapter, q|k|v, rotary, cache write, GQA attention,
o, norm, gate|up, SwiGLU, down, final norm, head) back to back in C++ on preallocated buffers.

The stack keeps raw addresses of the engine's tensors (weights, KV cache, rotary table), so this object
holds references to all of them for as long as it lives."""

from __future__ import annotations

from typing import Any

import torch

from lavin_edge.chat.engine import LinearOp, NormAdapter, W4Linear, _Concat, _Sum

Part = tuple[Any, ...]


def linear_parts(op: LinearOp, keep: list[Any]) -> list[Part] | None:
    """The stack's part tuples for one linear (see ``decode_linear`` in csrc/bindings.cpp), or None when any
    piece does not run on the tiled W4 kernel (an fp weight, the torch backend)."""
    if isinstance(op, W4Linear):
        if op._fast is None:
            return None
        keep.append(op.prepared)
        # The GEMV's own thread choice (one thread below SMALL_WEIGHTS): measured on 2 cores, giving every
        # SmolLM2 GEMV both threads inside the stack was no faster (5.7 vs 5.4 ms per token).
        return [(*op._fast[1:], 0, False, op._threads)]
    if isinstance(op, (_Concat, _Sum)):
        out: list[Part] = []
        offset = 0
        for i, sub in enumerate(op.ops):
            parts = linear_parts(sub, keep)
            if parts is None or len(parts) != 1:
                return None
            (*w, _, _, threads) = parts[0]
            accumulate = isinstance(op, _Sum) and i > 0
            out.append((*w, 0 if isinstance(op, _Sum) else offset, accumulate, threads))
            offset += sub.n_out
        return out
    return None


def norm_args(norm: NormAdapter, keep: list[Any]) -> tuple[int, ...] | None:
    if norm._fast is None:
        return None
    keep.append(norm)
    return (*norm._fast, norm.A.shape[0])


class FusedDecode:
    """``step(h, pos, modality)`` -> logits [vocab], the same as ``Engine._step`` up to float rounding.
    ``head`` is None when the stack runs the head too, else the op applied here to the normed state (an fp
    head the kernels do not cover, e.g. a vocabulary that W4 cannot pack)."""

    def __init__(self, stack: Any, dim: int, vocab: int, head: LinearOp | None, keep: list[Any]) -> None:
        self.stack, self.dim, self.vocab, self.head, self._keep = stack, dim, vocab, head, keep

    def step(self, h: torch.Tensor, pos: int, modality: int) -> torch.Tensor:
        x = torch.empty(self.dim)
        x.copy_(h.reshape(-1))  # the stack overwrites x with the last hidden state
        out = torch.empty(self.vocab if self.head is None else self.dim)
        self.stack.step(x.data_ptr(), pos, modality, out.data_ptr())
        return out if self.head is None else self.head(out[None])[0]


def build_fused_decode(engine: Any) -> FusedDecode | None:
    """A FusedDecode over ``engine``'s layers, or None when some op is not on the extension's kernels."""
    kernels = engine.kernels
    if kernels is None or kernels.backend() == "torch" or not hasattr(kernels._C, "DecodeStack"):
        return None
    keep: list[Any] = []
    rope = torch.view_as_real(engine.rope).contiguous()
    keep.append(rope)
    head = linear_parts(engine.lm_head, keep)
    head_norm = norm_args(engine.norm, keep)
    if head_norm is None:
        return None
    first = engine.layers[0]
    vocab = engine.lm_head.n_out
    stack = kernels._C.DecodeStack(kernels.backend(), engine.dim, engine.n_heads, engine.n_kv, engine.hd,
                                   first.w13.n_out // 2, engine.max_context, vocab, float(engine.norm.eps),
                                   rope.data_ptr(), torch.get_num_threads())
    for lyr in engine.layers:
        pieces = [linear_parts(op, keep) for op in (lyr.wqkv, lyr.wo, lyr.w13, lyr.w2)]
        norms = [norm_args(n, keep) for n in (lyr.attn_in, lyr.ffn_norm)]
        if any(p is None for p in pieces) or any(n is None for n in norms):
            return None
        for cache in (lyr.k_cache, lyr.v_cache):
            if not cache.is_contiguous() or cache.dtype != torch.float32:
                return None
            keep.append(cache)
        stack.add_layer(*norms, *pieces, lyr.k_cache.data_ptr(), lyr.v_cache.data_ptr())
    stack.set_head(head_norm, head or [])
    return FusedDecode(stack, engine.dim, vocab, None if head else engine.lm_head, keep)
