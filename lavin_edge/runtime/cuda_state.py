"""The CUDA engine's preallocated state (``lavin_edge.runtime.cuda_engine``): fp16 KV caches, the rotary table,
and the decode step's inputs held in device tensors, so that the step reads no Python number that changes from
one token to the next (a CUDA graph replays with whatever these buffers hold).

- ``kv``: per layer (keys, values), each fp16 [slots, n_kv, ctx, head_dim], zeroed: the step attends over a
  fixed span of positions and masks the unwritten ones, and a masked NaN from uninitialised memory would still
  reach the output through the weighted sum (0 * NaN);
- ``pos`` int64 [slots]: the position each row writes and attends up to; ``tok`` int64 [slots]: its input
  token; ``row_mod`` int32 [slots]: its modality (the adapter kernel routes per row);
- ``cos``, ``sin`` fp32 [ctx, head_dim / 2]: rotary angles of runtime slot p = absolute position p + offset,
  computed in fp64 as ``Engine``'s complex table.
"""

from __future__ import annotations

import torch

from lavin_edge.modality import IMAGE, TEXT

SPAN_MIN = 256  # the shortest attention span a decode graph is captured for (spans grow 4x up to the context)


class DecodeState:
    """Buffers of ``slots`` sequences over ``ctx`` positions on ``device``."""

    def __init__(self, n_layers: int, slots: int, n_kv: int, ctx: int, head_dim: int, rope_theta: float,
                 position_offset: int, device: torch.device) -> None:
        self.slots, self.ctx, self.device = slots, ctx, device
        shape = (slots, n_kv, ctx, head_dim)
        self.kv = [(torch.zeros(shape, dtype=torch.float16, device=device),
                    torch.zeros(shape, dtype=torch.float16, device=device)) for _ in range(n_layers)]
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.tok = torch.zeros(slots, dtype=torch.long, device=device)
        self.row_mod = torch.zeros(slots, dtype=torch.int32, device=device)
        self.rows = torch.arange(slots, device=device)
        self.heads = torch.arange(n_kv, device=device)
        self.positions = torch.arange(ctx, device=device)
        # Per-row modality of a prefill: a row range of one of these.
        self.prompt_mod = {m: torch.full((ctx,), m, dtype=torch.int32, device=device) for m in (TEXT, IMAGE)}
        inv = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        ang = torch.outer(torch.arange(position_offset, position_offset + ctx, dtype=torch.float64), inv)
        self.cos = torch.cos(ang).float().to(device)
        self.sin = torch.sin(ang).float().to(device)

    def span_for(self, length: int) -> int:
        """The attention span of a decode step writing position ``length``: the smallest of 256, 1024, 4096,
        ... that holds it, capped at the context. One graph per span, so a short conversation does not attend
        (masked) over the whole context."""
        span = SPAN_MIN
        while span <= length:
            span *= 4
        return min(span, self.ctx)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``t`` [..., head_dim] (pairs (2i, 2i+1) as complex numbers, ``Engine``'s layout) by
    angles with ``cos``/``sin`` [..., head_dim / 2] broadcastable; computed in fp32, returned in fp32."""
    p = t.float().unflatten(-1, (-1, 2))
    a, b = p[..., 0], p[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)
