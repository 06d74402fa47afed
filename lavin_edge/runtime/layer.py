"""One decoder layer of the runtime LLaMA, op by op in PyTorch: the reference step that ``Engine.prefill_reference``
(T new positions), ``Engine.decode_step_reference`` (one) and ``BatchDecoder.step_reference`` (one per row, each
row its own sequence) share. They differ only in how a row is normed (one modality, or rows of mixed modality)
and in where keys and values go and which cached positions a query attends to: the ``attend`` they pass.

Fused where exact: q|k|v and gate|up are one matmul each; rotary is one complex multiply for q and k together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lavin_edge.runtime.loader import RuntimeLayer
from lavin_edge.runtime.ops import NormAdapter

# norm(op, x) -> the normed rows; attend(q [T, nh, hd], k [T, nkv, hd], v [T, nkv, hd]) -> attention [T, nh * hd]
# (it stores k and v in its cache first).
Norm = Callable[[NormAdapter, torch.Tensor], torch.Tensor]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rotate(qk: torch.Tensor, rope: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """q|k rows [T, heads * hd] rotated by ``rope`` [T, 1, hd / 2] (complex, each row's position) -> [T, heads, hd]."""
    t = qk.shape[0]
    return torch.view_as_real(torch.view_as_complex(qk.reshape(t, heads, hd // 2, 2)) * rope).reshape(t, heads, hd)


def layer_step(lyr: RuntimeLayer, x: torch.Tensor, rope: torch.Tensor, norm: Norm, attend: Attend, n_heads: int,
               n_kv: int, hd: int) -> torch.Tensor:
    """x [T, D] -> x after the layer: attention (pre-norm with the folded adapter), then SwiGLU."""
    t, qk_w = x.shape[0], (n_heads + n_kv) * hd
    qkv = lyr.wqkv(norm(lyr.attn_in, x))
    qk = rotate(qkv[:, :qk_w], rope, n_heads + n_kv, hd)
    x = x + lyr.wo(attend(qk[:, :n_heads], qk[:, n_heads:], qkv[:, qk_w:].view(t, n_kv, hd)))
    g = lyr.w13(norm(lyr.ffn_norm, x))
    f = g.shape[-1] // 2
    return x + lyr.w2(F.silu(g[:, :f]) * g[:, f:])
