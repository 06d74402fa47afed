"""The CPU W4 kernels' weight layout (``lavin_edge.kernels.w4`` documents it) built from a GPTQ linear's arrays
with NumPy and the extension, no PyTorch: the one implementation that ``prepare_w4`` (on its tensors' NumPy
views) and the engine without PyTorch (``lavin_edge.runtime.numpy_engine``) both call.

- ``act_order``: the row order the kernels read (GPTQ's ``g_idx`` sorted by group), or why the linear cannot be
  tiled (groups of unequal size: the dense fallback);
- ``zero_points``: the true zero points [G, N] of ``qzeros`` under the v1 / v2 convention of
  ``lavin_edge.kernels.gptq_format`` (v1 stores zero - 1; a stored 0xF is 16), its NumPy twin (tested equal);
- ``tile``: the unit-interleaved 4-bit records (csrc repacks them) and the per-tile scales and zero points;
- ``descriptor``: the extension's ``W4Weights`` over those arrays (the caller keeps them alive);
- ``tile_linear``: all of the above for one linear (``prepare_w4``'s tiled form, the engine without PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TILE = 16  # output columns per tile (csrc/kernels.h, kTile)
ACT_BLOCK = 32  # input rows per activation block (csrc/kernels.h, kBlock)


def act_order(g_idx: np.ndarray | None, groups: int, group_size: int) -> tuple[bool, np.ndarray | None]:
    """(tileable, perm): ``perm`` int32 [K] is the stable sort of the rows by group, None for the identity;
    ``tileable`` is False when the groups do not all hold ``group_size`` rows."""
    if g_idx is None:
        return True, None
    g = np.asarray(g_idx, dtype=np.int64)
    if g.size and (g.min() < 0 or g.max() >= groups):
        raise ValueError(f"g_idx values must be in [0, {groups}), got range [{g.min()}, {g.max()}]")
    if not (np.bincount(g, minlength=groups) == group_size).all():
        return False, None
    perm = np.argsort(g, kind="stable")
    if (perm == np.arange(g.size)).all():
        return True, None
    return True, perm.astype(np.int32)


def zero_points(qzeros: np.ndarray, n: int, checkpoint_format: str) -> np.ndarray:
    """qzeros int32 [G, ceil(N/8)] -> the true zero points uint8 [G, N] (0..16)."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be gptq or gptq_v2, got {checkpoint_format!r}")
    z = (qzeros.astype(np.int64)[:, :, None] >> np.arange(0, 32, 4)) & 0xF
    z = z.reshape(qzeros.shape[0], -1)[:, :n]
    return (z + (1 if checkpoint_format == "gptq" else 0)).astype(np.uint8)


def tile_params(scales: np.ndarray, zeros: np.ndarray, np_: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales (fp16) and zero points [G, N] padded to Np columns and laid out per tile [Np/16, G, 16]."""
    groups, n = scales.shape
    spad = np.zeros((groups, np_), dtype=np.float16)
    spad[:, :n] = scales
    zpad = np.zeros((groups, np_), dtype=np.uint8)
    zpad[:, :n] = zeros
    per_tile = (groups, np_ // TILE, TILE)
    return (np.ascontiguousarray(spad.reshape(per_tile).transpose(1, 0, 2)),
            np.ascontiguousarray(zpad.reshape(per_tile).transpose(1, 0, 2)))


def padded_sizes(n: int, k: int) -> tuple[int, int]:
    """(Np, Kp): N to a multiple of the tile, K to a multiple of the activation block."""
    return -(-n // TILE) * TILE, -(-k // ACT_BLOCK) * ACT_BLOCK


def repack(ext: Any, qweight: np.ndarray, n: int, k: int, perm: np.ndarray | None, threads: int) -> np.ndarray:
    """The 4-bit records [Np/16 * Kp/8, 16, 4] uint8 in the kernels' unit-interleaved order (csrc, w4_repack)."""
    np_, kp = padded_sizes(n, k)
    qweight = np.ascontiguousarray(qweight, dtype=np.int32)
    qw = np.empty((np_ // TILE * (kp // 8), TILE, 4), dtype=np.uint8)
    ext.w4_repack(qweight.ctypes.data, qweight.size, n, k, perm.ctypes.data if perm is not None else 0,
                  perm.size if perm is not None else 0, np_, kp, qw.ctypes.data, qw.size, threads)
    return qw


def descriptor(ext: Any, qw: Any, scales: Any, zeros: Any, perm: Any, n: int, k: int, groups: int) -> Any:
    """The extension's ``W4Weights`` over tiled arrays (NumPy arrays or tensors: anything with an address);
    its sizes are checked once there (csrc/bindings.cpp)."""
    np_, kp = padded_sizes(n, k)
    return ext.W4Weights(address(qw), size(qw), address(scales), size(scales), address(zeros), size(zeros),
                         address(perm) if perm is not None else 0, size(perm) if perm is not None else 0,
                         n, np_, k, kp, groups)


@dataclass
class TiledArrays:
    """One linear in the tiled layout: the arrays (kept alive by the holder) and their ``W4Weights``."""

    qw: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    perm: np.ndarray | None
    native: Any


def tile_linear(ext: Any, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
                group_size: int, checkpoint_format: str, threads: int) -> TiledArrays | None:
    """A GPTQ linear (qweight int32 [K/8, N], qzeros, fp16 scales [G, N], g_idx or None; ``group_size`` resolved)
    in the tiled layout; None when the tiled kernels do not take its groups (unequal act-order groups, or groups
    that the activation blocks of 32 would straddle)."""
    n, k = qweight.shape[1], qweight.shape[0] * 8
    groups = k // group_size
    tileable, perm = act_order(g_idx, groups, group_size)
    if not tileable or (group_size % ACT_BLOCK and groups != 1):
        return None
    np_, _ = padded_sizes(n, k)
    st, zt = tile_params(scales, zero_points(qzeros, n, checkpoint_format), np_)
    qw = repack(ext, qweight, n, k, perm, threads)
    return TiledArrays(qw, st, zt, perm, descriptor(ext, qw, st, zt, perm, n, k, groups))


def address(a: Any) -> int:
    """The data address of a NumPy array or a tensor."""
    return int(a.ctypes.data) if isinstance(a, np.ndarray) else int(a.data_ptr())


def size(a: Any) -> int:
    return int(a.size if isinstance(a, np.ndarray) else a.numel())
