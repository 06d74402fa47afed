"""The GPTQ checkpoint format, 4-bit: the one definition that quantize, export, the kernels and the runtime use.

Layout, for a linear ``W [N, K]`` (N outputs, K inputs) with group size ``gs`` (G = K / gs groups):

* ``qweight`` int32 ``[K/8, N]``: bits ``4j..4j+3`` of ``qweight[r, n]`` hold input row ``8r + j``
  (least-significant nibble first).
* ``qzeros`` int32 ``[G, ceil(N/8)]``: bits ``4j..4j+3`` of ``qzeros[g, c]`` hold output column ``8c + j``'s
  zero point.
* ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]`` (group of each input row; with act-order it is
  non-monotonic and the rows stay in their original order).

``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.

Zero points: ``checkpoint_format = "gptq"`` (v1) stores ``zero - 1``, the historical convention every GPTQ
reader expects (symmetric 4-bit: ``0x77777777``); reading adds 1 without wrapping, so a stored nibble 0xF is
a zero point of 16 (what AutoGPTQ's and exllama's v1 readers compute). v1 therefore cannot store a zero of 0
(it would be -1): writing one is refused, and asymmetric models are written as ``"gptq_v2"``, which stores
the zero itself (0..15). See docs/model-format.md and docs/quantization.md.

Round-to-nearest (``rtn``) uses GPTQ's own grid (the range always holds 0; symmetric grids centre the zero at
8; an all-zero group gets the range [-1, 1]), so an RTN linear and a GPTQ linear differ only in the rounding
decisions GPTQ makes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
FORMATS = CHECKPOINT_FORMATS
BITS = 4
MAXQ = 2**BITS - 1
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def zero_offset(checkpoint_format: str) -> int:
    """What to add to a stored zero to get the true zero point (v1 stores zero - 1)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    return 1 if checkpoint_format == "gptq" else 0


def _check_bits(bits: int) -> None:
    if bits != BITS:
        raise ValueError(f"only {BITS}-bit GPTQ is supported, got {bits}")


# ----------------------------------------------------------------------------------------------- nibbles

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


# ----------------------------------------------------------------------------------------------- linears

class QuantizedInts(Protocol):
    """What ``pack_linear`` packs: ints ``q [N, K]``, ``scales``/``zeros [G, N]`` (true zero points), ``g_idx [K]``."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor


@dataclass
class UnpackedLinear:
    """The four tensors read back: ``q [N, K]`` int32, fp32 ``scales`` and true ``zeros [G, N]``, ``g_idx [K]``."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """W [N, K] = scale[g_idx[k], n] * (q[n, k] - zero[g_idx[k], n]), fp32."""
        g = self.g_idx.long()
        return (self.q.float() - self.zeros[g].T) * self.scales[g].T


def pack_linear(r: QuantizedInts, bits: int = BITS, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """A quantized linear (ints, scales, true zero points, g_idx) as the four standard tensors."""
    _check_bits(bits)
    off = zero_offset(checkpoint_format)
    zeros = r.zeros.round().to(torch.int64)
    if off and bool((zeros == 0).any()):
        raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1): use gptq_v2")
    if bool((zeros - off < 0).any()) or bool((zeros - off > MAXQ).any()):
        raise ValueError(f"zero points must lie in {off}..{MAXQ + off} for checkpoint_format {checkpoint_format!r}")
    return {
        "qweight": pack_nibbles_rows(r.q.T.contiguous()),
        "qzeros": pack_nibbles_cols((zeros - off).contiguous()),
        "scales": r.scales.to(torch.float16).contiguous(),
        "g_idx": r.g_idx.to(torch.int32).contiguous(),
    }


def unpack_linear(t: dict[str, torch.Tensor], bits: int = BITS, checkpoint_format: str = "gptq") -> UnpackedLinear:
    """The four tensors back to ints ``q [N, K]``, fp32 scales, true zero points (v1: stored + 1, 0xF -> 16)."""
    _check_bits(bits)
    n = t["scales"].shape[1]
    zeros = unpack_nibbles_cols(t["qzeros"], n).to(torch.int64) + zero_offset(checkpoint_format)
    return UnpackedLinear(unpack_nibbles_rows(t["qweight"]).T.to(torch.int32).contiguous(), t["scales"].float(),
                          zeros.float(), t["g_idx"].to(torch.int32))


def resolve_group_size(group_size: int | None, k: int) -> int:
    """GPTQ's group_size -1 (or None/0) means one group spanning all of K."""
    return k if group_size is None or group_size <= 0 else int(group_size)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None = None,
               group_size: int | None = None, checkpoint_format: str = "gptq") -> torch.Tensor:
    """GPTQ tensors -> dense fp32 ``W [N, K]`` (the one dequantizer).

    The group of row k is ``g_idx[k]`` when given, else ``k // group_size`` (``group_size`` -1/0/None: one
    group over K)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    q = unpack_nibbles_rows(qweight).float()  # [K, N]
    z = unpack_nibbles_cols(qzeros, n).float() + zero_offset(checkpoint_format)  # [G, N]
    if g_idx is not None:
        gi = g_idx.long()
    else:
        gi = torch.arange(k, device=qweight.device) // resolve_group_size(group_size, k)
    return (scales.float()[gi] * (q - z[gi])).t().contiguous()


def dequantize_packed(t: dict[str, torch.Tensor], bits: int = BITS, checkpoint_format: str = "gptq") -> torch.Tensor:
    """W [N, K] in fp32 from a dict of the four tensors (fp16 scales, as served)."""
    _check_bits(bits)
    return dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, checkpoint_format)


@dataclass
class GPTQTensors:
    """One linear in the standard layout, with the settings needed to read it: what every reader of a GPTQ linear
    takes (the kernels' ``prepare_w4``, their references, the runtime's ops)."""

    qweight: torch.Tensor  # int32 [K/8, N]
    qzeros: torch.Tensor  # int32 [G, N/8]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor | None = None  # int32/int64 [K]; None: row k is in group k // group_size
    checkpoint_format: str = "gptq"  # "gptq" (v1: stored zero - 1) or "gptq_v2"
    group_size: int | None = 128  # rows per group; -1/0/None: one group over K

    @classmethod
    def from_dict(cls, t: dict[str, torch.Tensor], checkpoint_format: str, group_size: int) -> GPTQTensors:
        return cls(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], checkpoint_format, group_size)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[1], self.qweight.shape[0] * 8

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 W [N, K] (the reference of every kernel, and their fallback)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.group_size, self.checkpoint_format)

    @staticmethod
    def concat(parts: list[GPTQTensors]) -> GPTQTensors | None:
        """Stack linears along N (one matmul for q|k|v) when that is exact: same K, same g_idx, same format,
        and every N a multiple of 8 (qzeros packs 8 columns per int32). None when not possible."""
        first = parts[0]
        for p in parts:
            if (p.qweight.shape[0] != first.qweight.shape[0] or p.checkpoint_format != first.checkpoint_format
                    or p.scales.shape[1] % 8 or not _same_order(p.g_idx, first.g_idx)):
                return None
        return GPTQTensors(torch.cat([p.qweight for p in parts], 1), torch.cat([p.qzeros for p in parts], 1),
                           torch.cat([p.scales for p in parts], 1), first.g_idx, first.checkpoint_format,
                           first.group_size)


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and torch.equal(a, b))


# ----------------------------------------------------------------------------------------------- RTN

def grid_range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's range of each row of ``w [N, g]`` -> (xmin [N], xmax [N]).

    The range always includes 0; a symmetric range is [-max|w|, max|w|], except that GPTQ keeps [0, max] for a
    row with no negative weight; an all-zero row gets [-1, 1] so its scale is never 0."""
    zero_t = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    xmin = torch.minimum(w.min(1).values, zero_t)
    xmax = torch.maximum(w.max(1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both0, torch.full_like(xmax, 1.0), xmax)
    return xmin, xmax


def grid(w: torch.Tensor, sym: bool, maxq: int = MAXQ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min/max grid of each row of ``w [N, g]`` -> (scale [N], zero [N]) for ints 0..maxq; symmetric
    grids centre the zero at (maxq + 1) / 2."""
    xmin, xmax = grid_range(w, sym)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def rtn(w: torch.Tensor, group_size: int = 128, sym: bool = True, order: torch.Tensor | None = None, *,
        maxq: int = MAXQ, grid_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        ) -> UnpackedLinear:
    """Round-to-nearest of ``w [N, K]`` on GPTQ's grid, 4-bit by default (fp32 scales; ``pack_linear`` stores
    them fp16). The project's one RTN: the quantizer's baseline (``quantize.gptq.rtn_quantize``) is this with
    its own ``grid_fn`` (other bit widths, MSE clipping) and ``maxq``.

    ``group_size`` -1/0: one group over K. ``order`` (a permutation of K, act-order style) decides which rows
    share a group: group j holds rows ``order[j*gs:(j+1)*gs]``, so ``g_idx`` is non-monotonic. ``grid_fn``
    maps a group's weights [N, g] to (scale [N], zero [N]); default ``grid(., sym, maxq)``."""
    n, k = w.shape
    gs = k if group_size <= 0 else group_size
    if k % gs:
        raise ValueError(f"K={k} must be a multiple of group_size={gs}")
    w = w.float()
    if grid_fn is None:
        def grid_fn(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return grid(g, sym, maxq)
    order = torch.arange(k) if order is None else order.long()
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    scales, zeros = [], []
    for s in range(0, k, gs):
        sc, z = grid_fn(w[:, order[s:s + gs]])
        scales.append(sc)
        zeros.append(z)
    scale, zero = torch.stack(scales), torch.stack(zeros)  # [G, N]
    gi = g_idx.long()
    q = torch.clamp(torch.round(w / scale[gi].T) + zero[gi].T, 0, maxq).to(torch.int32)
    return UnpackedLinear(q, scale, zero, g_idx)


def quantize_rtn(
    w: torch.Tensor,
    group_size: int = 128,
    *,
    act_order: bool = False,
    sym: bool = False,
    checkpoint_format: str = "gptq",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Round-to-nearest of ``w [N, K]`` packed in the layout (tests, benchmarks, a baseline).

    ``act_order`` mimics desc_act with a random row order from ``generator``. Returns qweight, qzeros, scales
    (fp16), g_idx (int32) and the resolved group_size. An asymmetric grid can have a zero point of 0, which
    v1 cannot store: asymmetric + ``"gptq"`` raises when that happens."""
    k = w.shape[1]
    if k % 8:
        raise ValueError(f"K={k} must be a multiple of 8 (eight 4-bit rows per int32)")
    order = torch.randperm(k, generator=generator) if act_order else None
    r = rtn(w, group_size, sym, order)
    t = pack_linear(r, BITS, checkpoint_format)
    t["group_size"] = torch.tensor(k if group_size <= 0 else group_size)
    return t


def residual_w4(w: torch.Tensor, group_size: int) -> tuple[GPTQTensors, GPTQTensors]:
    """``w`` as two symmetric 4-bit RTN passes, value and residual: ``W ~ hi + lo`` with ``lo = RTN(W - hi)``,
    ~8-bit accuracy at 1/4 of the fp32 bytes (the lm_head's served form, see docs/model-format.md)."""
    def one(x: torch.Tensor) -> GPTQTensors:
        return GPTQTensors.from_dict(pack_linear(rtn(x, group_size, True)), "gptq", group_size)

    hi = one(w)
    return hi, one(w.float() - hi.dequantize())
