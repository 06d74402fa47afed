"""The extension's one-call decode step (``DecodeStack``, csrc/decode.cpp) assembled from its pieces, without
PyTorch: the one builder that the engine (``lavin_edge.runtime.native_decode``, over PyTorch tensors and prepared
ops) and the engine without PyTorch (``lavin_edge.runtime.numpy_engine``, over NumPy arrays) both call.

A decode-step linear is a list of parts (:func:`linear_parts`): each a tiled W4 linear's ``W4Weights``
descriptor, the first output column it writes, whether it adds into columns an earlier part wrote (a weight
stored as a 4-bit value plus a 4-bit residual), and its GEMV thread count. Norms are ``NormAdapterWeights``
descriptors (:func:`norm_weights`). Anything with an address goes in (``tiling.address``: arrays or tensors);
the stack holds raw addresses, so the caller keeps everything behind a descriptor (weights, KV cache, rotary
table) alive while it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .dispatch import extension
from .tiling import address, size


def _ext() -> Any:
    c = extension()
    if c is None:
        raise RuntimeError("the native decode step needs the lavin_edge._C extension")
    return c


def native_decode_available() -> bool:
    """The extension is built (with the decode step)."""
    c = extension()
    return c is not None and hasattr(c, "DecodeStack")


def linear_parts(weights: Sequence[tuple[Any, int, int]], summed: bool = False) -> list[Any]:
    """(``W4Weights`` descriptor, outputs, GEMV threads) of linears reading one input -> the stack's parts: their
    outputs side by side (q|k|v, gate|up), or with ``summed`` added into the same columns (value + residual)."""
    parts, offset = [], 0
    for i, (w, n_out, threads) in enumerate(weights):
        parts.append(_ext().LinearPart(w, 0 if summed else offset, summed and i > 0, threads))
        offset += n_out
    return parts


def norm_weights(g: Any, A: Any, a: Any, U: Any, u: Any, eps: float) -> Any:
    """An RMSNorm + folded adapter's descriptor over fp32 contiguous g [D], A [r, D], a [r], U [2, D, r], u [2, D]."""
    return _ext().NormAdapterWeights(address(g), address(A), address(a), address(U), address(u), int(g.shape[0]),
                                     int(A.shape[0]), float(eps))


def new_decode_stack(isa: str, dim: int, n_heads: int, n_kv: int, head_dim: int, ffn: int, ctx: int, vocab: int,
                     eps: float, rope: Any, threads: int = 0, slots: int = 1) -> Any:
    """An empty ``DecodeStack`` (fill it with :func:`fill_stack`); ``rope`` fp32 [ctx, head_dim/2, 2] (cos, sin).
    ``slots``: the fp16 caches' first dimension ([slots, n_kv, ctx, head_dim]) and the most rows one
    ``step_rows`` call takes."""
    return _ext().DecodeStack(isa, dim, n_heads, n_kv, head_dim, ffn, ctx, vocab, float(eps), address(rope), threads,
                              slots)


def fill_stack(stack: Any, layers: Sequence[Sequence[Any]], caches: Sequence[tuple[Any, Any]], head_norm: Any,
               head: list[Any], rescore: tuple[Any, str, int] | None = None) -> Any:
    """Add each layer ((attn_in, ffn_norm, wqkv, wo, w13, w2): two norm descriptors, four part lists) over its
    (k, v) fp16 caches, then the head: its norm, its parts (empty: the caller applies the head) and, optionally,
    the exact re-scoring of its top logits ``(fp weight [vocab, dim], its dtype name, top)``."""
    for layer, (k, v) in zip(layers, caches, strict=True):
        stack.add_layer(*layer, address(k), address(v))
    if rescore is None:
        stack.set_head(head_norm, head)
    else:
        w, dtype, top = rescore
        stack.set_head(head_norm, head, address(w), dtype, size(w), top)
    return stack
