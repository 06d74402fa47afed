"""GPTQ checkpoint layout: pack/unpack helpers and a round-to-nearest quantizer.

Layout (DESIGN.md section 4), for a linear with K inputs, N outputs, group size G:

* ``qweight`` int32 ``[K/8, N]``: bits ``4j..4j+3`` of ``qweight[r, n]`` hold input row ``8r + j``
  (least-significant nibble first).
* ``qzeros`` int32 ``[ceil(K/G), ceil(N/8)]``: bits ``4j..4j+3`` of ``qzeros[g, c]`` hold output
  column ``8c + j``. Checkpoint format ``"gptq"`` (v1) stores ``zero - 1``; ``"gptq_v2"`` stores
  the zero itself.
* ``scales`` fp16 ``[ceil(K/G), N]``; ``g_idx`` int32 ``[K]`` (group of each input row; with
  act-order it is non-monotonic and the rows stay in their original order).

``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.
"""

from __future__ import annotations

import torch

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def zero_offset(checkpoint_format: str) -> int:
    """What to add to a stored zero to get the true zero point (v1 stores zero - 1)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    return 1 if checkpoint_format == "gptq" else 0


def _to_int32_bits(v: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits (two's complement)."""
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_nibbles_rows(q: torch.Tensor) -> torch.Tensor:
    """q int [K, N] in 0..15 -> qweight int32 [K/8, N] (row 8r+j in nibble j)."""
    k, n = q.shape
    if k % 8:
        raise ValueError(f"K={k} is not a multiple of 8")
    q64 = q.to(torch.int64).reshape(k // 8, 8, n)
    return _to_int32_bits((q64 << _SHIFTS.to(q.device).view(1, 8, 1)).sum(dim=1))


def unpack_nibbles_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K/8, N] -> uint8 [K, N]."""
    kr, n = qweight.shape
    w = qweight.to(torch.int64).unsqueeze(1) >> _SHIFTS.to(qweight.device).view(1, 8, 1)
    return (w & 0xF).to(torch.uint8).reshape(kr * 8, n)


def pack_nibbles_cols(z: torch.Tensor) -> torch.Tensor:
    """z int [G, N] in 0..15 -> qzeros int32 [G, ceil(N/8)] (column 8c+j in nibble j)."""
    g, n = z.shape
    nc = (n + 7) // 8
    z64 = torch.zeros(g, nc * 8, dtype=torch.int64, device=z.device)
    z64[:, :n] = z.to(torch.int64)
    z64 = z64.reshape(g, nc, 8) << _SHIFTS.to(z.device).view(1, 1, 8)
    return _to_int32_bits(z64.sum(dim=2))


def unpack_nibbles_cols(qzeros: torch.Tensor, n: int) -> torch.Tensor:
    """qzeros int32 [G, ceil(N/8)] -> uint8 [G, N] (the stored values, no v1 offset)."""
    g, nc = qzeros.shape
    z = qzeros.to(torch.int64).unsqueeze(2) >> _SHIFTS.to(qzeros.device).view(1, 1, 8)
    return (z & 0xF).to(torch.uint8).reshape(g, nc * 8)[:, :n]


def quantize_rtn(
    w: torch.Tensor,
    group_size: int = 128,
    *,
    act_order: bool = False,
    sym: bool = False,
    checkpoint_format: str = "gptq",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of ``w`` [N, K] into the GPTQ layout.

    Not GPTQ's error-compensating algorithm (that lives in the quantizer): the same format,
    for tests, benchmarks and as a baseline. ``group_size`` <= 0 means one group over K.
    ``act_order`` mimics desc_act: a random row order (from ``generator``) decides which rows
    share a group, so ``g_idx`` is non-monotonic. Returns qweight, qzeros, scales (fp16),
    g_idx (int32) and the resolved group_size.
    """
    n, k = w.shape
    gs = k if group_size <= 0 else group_size
    if k % 8 or k % gs:
        raise ValueError(f"K={k} must be a multiple of 8 and of group_size={gs}")
    groups = k // gs
    w = w.float()
    if act_order:
        order = torch.randperm(k, generator=generator)
    else:
        order = torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    # Group statistics over the rows of each group (in the act-order sense).
    wg = w[:, order].reshape(n, groups, gs)
    if sym:
        amax = wg.abs().amax(dim=2).clamp_min(1e-8)
        scale = amax / 7.5
        zero = torch.full_like(scale, 8.0)
    else:
        lo = wg.amin(dim=2).clamp(max=0.0)
        hi = wg.amax(dim=2).clamp(min=0.0)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, 15)
    scale16 = scale.half()
    s_rows = scale16.float()[:, g_idx.long()]  # [N, K]
    z_rows = zero[:, g_idx.long()]
    q = torch.clamp(torch.round(w / s_rows + z_rows), 0, 15).to(torch.int64)
    stored_zero = (zero.to(torch.int64) - zero_offset(checkpoint_format)) & 0xF  # v1: zero - 1 (wraps)
    return {
        "qweight": pack_nibbles_rows(q.t().contiguous()),
        "qzeros": pack_nibbles_cols(stored_zero.t().contiguous()),
        "scales": scale16.t().contiguous(),
        "g_idx": g_idx,
        "group_size": torch.tensor(gs),
    }
