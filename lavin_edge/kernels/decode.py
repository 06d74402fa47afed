"""The extension's one-call decode step (``DecodeStack``, csrc/decode.cpp) over prepared weights.

A decode-step linear is a list of parts (:func:`linear_part`): each a prepared W4 linear's descriptor,
the first output column it writes, whether it adds into columns an earlier part wrote (a weight stored
as a 4-bit value plus a 4-bit residual), and its GEMV thread count. Norms are the descriptors of
:class:`lavin_edge.kernels.adapters.PreparedNormAdapter`. The stack holds raw addresses: the caller
keeps every tensor behind a descriptor (weights, KV cache, rotary table) alive while it is used.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import PreparedNormAdapter
from .dispatch import extension
from .w4 import PreparedW4


def native_decode_available() -> bool:
    """The extension is built (with the decode step)."""
    c = extension()
    return c is not None and hasattr(c, "DecodeStack")


def linear_part(w: PreparedW4, out_offset: int = 0, accumulate: bool = False, threads: int = 1) -> Any:
    """One part of a decode-step linear; ``w`` must be tiled with the extension (``w.native`` set)."""
    if w.native is None:
        raise ValueError("linear_part needs a tiled W4 linear prepared with the extension")
    return extension().LinearPart(w.native, out_offset, accumulate, threads)  # type: ignore[union-attr]


def new_decode_stack(isa: str, dim: int, n_heads: int, n_kv: int, head_dim: int, ffn: int, ctx: int, vocab: int,
                     eps: float, rope: torch.Tensor, threads: int = 0, slots: int = 1) -> Any:
    """An empty ``DecodeStack`` (add layers with ``add_layer(attn_in, ffn_norm, wqkv, wo, w13, w2, k_cache_ptr,
    v_cache_ptr)``, then ``set_head(norm, parts[, rescore_weight_ptr, dtype, numel, top])``); ``rope`` fp32 [ctx,
    head_dim/2, 2] (cos, sin), kept alive by the caller. ``slots``: the fp16 caches' first dimension ([slots, n_kv,
    ctx, head_dim]) and the most rows one ``step_rows`` call takes."""
    c = extension()
    if c is None:
        raise RuntimeError("the native decode step needs the lavin_edge._C extension")
    return c.DecodeStack(isa, dim, n_heads, n_kv, head_dim, ffn, ctx, vocab, float(eps), rope.data_ptr(), threads,
                         slots)


def norm_descriptor(norm: PreparedNormAdapter) -> Any:
    """A prepared norm's descriptor for the stack (ValueError without the extension)."""
    if norm.native is None:
        raise ValueError("the norm was prepared without the extension")
    return norm.native
