"""4-bit GPTQ linears on the native kernels: prepare once at load, multiply many times.

Weight layouts (the one place they are documented on the Python side; csrc/kernels.h has the C view)
---------------------------------------------------------------------------------------------------
A checkpoint stores a linear in the GPTQ layout (:mod:`lavin_edge.kernels.gptq_format`): ``qweight``
int32 [K/8, N], ``qzeros`` int32 [G, N/8], ``scales`` fp16 [G, N], ``g_idx`` [K].
:func:`prepare_w4` turns it into one of three prepared forms, chosen by device and group shape:

``TiledW4`` (CPU, ``mode == "tiled"``): the int8-dot kernels' layout.
    Act-order rows are permuted once so that every group is a contiguous run of K rows (``perm``,
    int32 [K], gathers x at run time; None when the identity). K is zero-padded to ``kp`` (a multiple
    of 32, the activation block), N to ``np_`` (a multiple of 16, one tile of output columns).
    ``qw`` uint8 [Np/16 * Kp/8, 16, 4]: for tile t and k-chunk c one 64-byte record, lane i = column
    16t+i, byte b = q[8c+b] | q[8c+b+4] << 4; records interleaved by units of 4 tiles (unit u: chunk 0 of
    tiles 4u..4u+3, then chunk 1, ...; a last partial unit likewise with its tiles), so that the kernels'
    4-tile passes read one contiguous stream (:func:`units_from_tiles`). ``scales`` fp16 [Np/16, G, 16]; ``zeros`` uint8
    [Np/16, G, 16], the true zero point 0..16 (v1's stored zero - 1 normalised here; v1's 0xF + 1 = 16
    is kept). ``native`` is the extension's ``W4Weights`` descriptor of these tensors, built once: the
    per-call product and the one-call decode step (``lavin_edge.kernels.decode``) both take it.
``CudaW4`` (CUDA, ``mode == "cuda"``): ``qw`` int32 [K/8, N] (GPTQ packing, rows in group order),
    ``scales`` fp16 [G, N], ``zeros`` uint8 [G, N] (true zero points), ``perm`` as above.
``dense`` (``mode == "dense"``): W dequantized to fp32 [N, K], for what the fast paths do not take
    (group sizes that are not a multiple of 32 on CPU, act-order groups of unequal size).

Accuracy of the CPU path: x is quantized in blocks of 32 (one fp32 scale each) to 15-bit integers (the default)
or to int8 as llama.cpp's Q8_0 (``$LAVIN_EDGE_W4_ACT=int8``, the CLI's ``--activations int8``); the product is
then exact in integers; ~1e-5 (int8: ~1e-3) relative to ||y|| typically
(``reference.quantize_activations_reference`` reproduces it exactly for tests). The format is read at every
per-call product and when a native decode step is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import reference, tiling
from .dispatch import check_tensor, cuda_kernels_ok, extension, resolve_backend, warn_fallback
from .gptq_format import CHECKPOINT_FORMATS, pack_nibbles_rows, unpack_nibbles_cols, unpack_nibbles_rows, zero_offset
from .reference import dequantize_gptq, resolve_group_size


@dataclass
class TiledW4:
    """The CPU kernels' layout (see the module docstring). ``native``: the extension's descriptor, or None when
    the extension is missing (the torch fallback reads the tensors)."""

    qw: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    np_: int
    kp: int
    native: Any = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.scales, self.zeros))


@dataclass
class CudaW4:
    """The CUDA kernel's layout (see the module docstring)."""

    qw: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qw, self.scales, self.zeros))


@dataclass
class PreparedW4:
    """A GPTQ linear repacked once for the native kernels. Build it with :func:`prepare_w4`.

    ``matmul(x)`` returns ``x @ W^T``: x [..., k] -> [..., n], checked on every call. On CPU x must be fp32
    (the result is fp32), on CUDA fp16 (result fp16). ``gemm_rows`` is the unchecked per-call path of the
    runtime. ``nbytes`` is what one product reads of the weights (packed nibbles + scales + zeros).
    ``mode``: "tiled" (``tiled`` set), "cuda" (``cuda`` set) or "dense" (``dense`` set).
    """

    n: int
    k: int
    group_size: int
    groups: int
    mode: str
    device: torch.device
    perm: torch.Tensor | None = None  # int32 [K] act-order gather, None when identity
    tiled: TiledW4 | None = None
    cuda: CudaW4 | None = None
    dense: torch.Tensor | None = None  # fp32 [N, K]
    backend_name: str | None = None  # force a CPU backend for this object (tests/bench)

    @property
    def nbytes(self) -> int:
        if self.dense is not None:
            return self.dense.numel() * 4
        layout = self.tiled if self.tiled is not None else self.cuda
        assert layout is not None
        return layout.nbytes

    @property
    def native(self) -> Any:
        """The extension's ``W4Weights`` descriptor (tiled mode with the extension), else None."""
        return self.tiled.native if self.tiled is not None else None

    def matmul(self, x: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        """``x @ W^T`` for x [..., k]; see the class docstring for dtypes."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.k:
            raise ValueError(f"x must have shape [..., {self.k}], got {list(x.shape)}")
        lead = x.shape[:-1]
        if self.mode == "cuda":
            check_tensor("x", x, torch.float16, device=self.device)
            return self._matmul_cuda(x.reshape(-1, self.k)).reshape(*lead, self.n)
        check_tensor("x", x, torch.float32, device=self.device)
        x2 = x.reshape(-1, self.k)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.n)
        if self.dense is not None:
            return (x2 @ self.dense.t()).reshape(*lead, self.n)
        name = resolve_backend(self.backend_name)
        if name == "torch" or self.native is None:
            return (x2 @ self.dequantize().t()).reshape(*lead, self.n)
        return self.gemm_rows(x2, name, threads if threads is not None else torch.get_num_threads()).reshape(
            *lead, self.n)

    __call__ = matmul

    def gemm_rows(self, x: torch.Tensor, isa: str, threads: int) -> torch.Tensor:
        """``x @ W^T`` on the tiled kernel without the checks of :meth:`matmul`: x fp32 [m, k] on the CPU with
        unit column stride (a column slice of a wider row is fine), ``isa`` a native backend name, tiled mode
        with the extension (``native`` set). The runtime's per-op path."""
        m = x.shape[0]
        y = torch.empty(m, self.n)
        extension().w4_gemm(isa, self.tiled.native, x.data_ptr(), m,  # type: ignore[union-attr]
                            x.stride(0) if m > 1 else self.k, y.data_ptr(), self.n, threads)
        return y

    def _matmul_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        c = extension()
        assert c is not None and self.cuda is not None
        m = x2.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float16, device=self.device)
        if m == 0:
            return y
        ws = torch.empty(m, self.n, dtype=torch.float32, device=self.device)
        c.cuda_w4_gemm(
            x2.data_ptr(), self.k, self.perm.data_ptr() if self.perm is not None else 0, self.cuda.qw.data_ptr(),
            self.cuda.scales.data_ptr(), self.cuda.zeros.data_ptr(), m, self.n, self.k, self.groups,
            self.group_size, ws.data_ptr(), y.data_ptr(), torch.cuda.current_stream(self.device).cuda_stream,
        )  # fmt: skip
        return y

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 W [n, k] in the original row order (for tests and fallbacks)."""
        if self.dense is not None:
            return self.dense
        if self.cuda is not None:
            q = unpack_nibbles_rows(self.cuda.qw).float()  # [K, N], group order
            gi = torch.arange(self.k, device=self.device) // self.group_size
            w_sorted = self.cuda.scales.float()[gi] * (q - self.cuda.zeros.float()[gi])
        else:
            tl = self.tiled
            assert tl is not None
            t = tl.np_ // 16
            qw = tiles_from_units(tl.qw, t, tl.kp // 8)
            lo, hi = (qw & 0xF), (qw >> 4)
            q = torch.stack([lo, hi], dim=-1)  # [t, c, i, b, h]
            q = q.permute(1, 4, 3, 0, 2).reshape(tl.kp, tl.np_)[: self.k, : self.n].float()
            s = tl.scales.permute(1, 0, 2).reshape(self.groups, tl.np_)[:, : self.n].float()
            z = tl.zeros.permute(1, 0, 2).reshape(self.groups, tl.np_)[:, : self.n].float()
            rows_per_group = tl.kp // self.groups
            gi = torch.arange(self.k) // rows_per_group
            w_sorted = s[gi] * (q - z[gi])
        w = torch.empty_like(w_sorted)
        if self.perm is not None:
            w[self.perm.long()] = w_sorted
        else:
            w = w_sorted
        return w.t().contiguous()


def prepare_w4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    group_size: int | None = 128,
    checkpoint_format: str = "gptq",
    *,
    backend: str | None = None,
) -> PreparedW4:
    """Validate a GPTQ linear and repack it for the native kernels (one time, at load).

    Args:
        qweight: int32 [K/8, N]; qzeros: int32 [G, ceil(N/8)]; scales: fp16 (or fp32) [G, N];
        g_idx: int32/int64 [K] or None; group_size: rows per group, -1/None/0 = all of K;
        checkpoint_format: "gptq" (v1, stored zero - 1) or "gptq_v2".
        backend: force a CPU backend for this object (a name of ``dispatch.CPU_BACKENDS`` built here).
    The device of ``qweight`` decides the target: CPU -> tiled layout, CUDA -> CUDA kernels.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    check_tensor("qweight", qweight, torch.int32, (None, None))
    dev = qweight.device
    kr, n = qweight.shape
    k = kr * 8
    if n == 0 or k == 0:
        raise ValueError("qweight must be non-empty")
    gs = resolve_group_size(group_size, k)
    if k % gs:
        raise ValueError(f"K={k} is not a multiple of group_size={gs}")
    groups = k // gs
    check_tensor("qzeros", qzeros, torch.int32, (groups, (n + 7) // 8), dev)
    check_tensor("scales", scales, (torch.float16, torch.float32), (groups, n), dev)
    if backend is not None:
        resolve_backend(backend)
    perm = None
    uniform = True
    if g_idx is not None:
        check_tensor("g_idx", g_idx, (torch.int32, torch.int64), (k,), dev)
        uniform, order = tiling.act_order(g_idx.cpu().numpy(), groups, gs)
        perm = torch.from_numpy(order).to(dev) if order is not None else None
    scales16 = scales.half()

    def dense() -> PreparedW4:
        w = dequantize_gptq(qweight, qzeros, scales16, g_idx, gs, checkpoint_format)
        return PreparedW4(n, k, gs, groups, "dense", dev, dense=w, backend_name=backend)

    if g_idx is not None and not uniform:
        return dense()
    c = extension()
    perm32 = perm.contiguous() if perm is not None else None  # int32
    needs_q = dev.type == "cuda" or c is None or backend == "torch"
    q = unpack_nibbles_rows(qweight) if needs_q else None  # [K, N] uint8, original row order
    if q is not None and perm is not None:
        q = q[perm]
    zeros = unpack_nibbles_cols(qzeros, n).to(torch.int16) + zero_offset(checkpoint_format)
    zeros = zeros.to(torch.uint8)  # true zero points, 0..16 (v1's 0xF + 1 = 16 is kept)

    if dev.type == "cuda":
        assert q is not None
        if not cuda_kernels_ok() or gs % 8:
            return dense()
        return PreparedW4(n, k, gs, groups, "cuda", dev, perm=perm32,
                          cuda=CudaW4(pack_nibbles_rows(q), scales16.contiguous(), zeros.contiguous()))
    if dev.type != "cpu":
        raise ValueError(f"unsupported device {dev}")
    if gs % reference.ACT_BLOCK and groups != 1:
        # The int8 blocks of 32 must not straddle groups; other group sizes take the dense path.
        return dense()

    # The layout itself is built by lavin_edge.kernels.tiling (NumPy, shared with the engine without PyTorch).
    np_, kp = tiling.padded_sizes(n, k)
    if c is not None and (backend or "") != "torch":
        qw = torch.from_numpy(tiling.repack(c, qweight.numpy(), n, k, None if perm32 is None else perm32.numpy(),
                                            torch.get_num_threads()))
    else:
        assert q is not None
        qw = repack_tiled_reference(q, kp, np_)
    st, zt = tiling.tile_params(scales16.numpy(), zeros.numpy(), np_)
    tiled = TiledW4(qw, torch.from_numpy(st), torch.from_numpy(zt), np_, kp)
    if c is not None:
        tiled.native = tiling.descriptor(c, tiled.qw, tiled.scales, tiled.zeros, perm32, n, k, groups)
    return PreparedW4(n, k, gs, groups, "tiled", dev, perm=perm32, tiled=tiled, backend_name=backend)


TILE_UNIT = 4  # tiles whose records are interleaved (csrc/kernels.h, kUnit)


def units_from_tiles(rec: torch.Tensor) -> torch.Tensor:
    """Records [T, C, 16, 4] (tile-major) -> the kernels' order [T * C, 16, 4]: per unit of 4 tiles, chunk by
    chunk, the unit's tiles side by side; a last unit of T % 4 tiles likewise."""
    t, c = rec.shape[:2]
    full = t - t % TILE_UNIT
    head = rec[:full].reshape(full // TILE_UNIT, TILE_UNIT, c, 16, 4).transpose(1, 2).reshape(-1, 16, 4)
    tail = rec[full:].transpose(0, 1).reshape(-1, 16, 4)
    return torch.cat([head, tail]).contiguous()


def tiles_from_units(qw: torch.Tensor, t: int, c: int) -> torch.Tensor:
    """Inverse of :func:`units_from_tiles`: the kernels' records -> [T, C, 16, 4], tile-major."""
    full = t - t % TILE_UNIT
    flat = qw.reshape(t * c, 16, 4)
    head = flat[: full * c].reshape(full // TILE_UNIT, c, TILE_UNIT, 16, 4).transpose(1, 2).reshape(full, c, 16, 4)
    tail = flat[full * c :].reshape(c, t - full, 16, 4).transpose(0, 1)
    return torch.cat([head, tail])


def repack_tiled_reference(q: torch.Tensor, kp: int, np_: int) -> torch.Tensor:
    """PyTorch version of the tiled repack (the C++ ``w4_repack`` is tested against it).

    q: uint8 [K, N] nibbles in group order -> uint8 [Np/16 * Kp/8, 16, 4]: record (tile t, chunk c), lane
    i = column 16t+i, byte b = q[8c+b] | q[8c+b+4] << 4, in the unit-interleaved order of
    :func:`units_from_tiles`.
    """
    k, n = q.shape
    qpad = torch.zeros(kp, np_, dtype=torch.uint8)
    qpad[:k, :n] = q
    qv = qpad.view(kp // 8, 2, 4, np_ // 16, 16).permute(3, 0, 4, 2, 1)  # [t, c, i, b, h]
    return units_from_tiles(qv[..., 0] | (qv[..., 1] << 4))


def gptq_matmul_scalar(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    group_size: int | None = 128,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """C++ scalar oracle straight on the GPTQ layout (fp32 x [m, K], double accumulation)."""
    c = extension()
    if c is None:
        warn_fallback()
        return reference.w4_matmul_reference(x, qweight, qzeros, scales, g_idx, group_size, checkpoint_format)
    cpu = torch.device("cpu")
    check_tensor("qweight", qweight, torch.int32, (None, None), cpu)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    gs = resolve_group_size(group_size, k)
    if k % gs:
        raise ValueError(f"K={k} is not a multiple of group_size={gs}")
    groups = k // gs
    check_tensor("x", x, torch.float32, (None, k), cpu)
    check_tensor("qzeros", qzeros, torch.int32, (groups, (n + 7) // 8), cpu)
    check_tensor("scales", scales, torch.float16, (groups, n), cpu)
    if g_idx is not None:
        check_tensor("g_idx", g_idx, torch.int32, (k,), cpu)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    c.w4_gemm_gptq_reference(
        x.data_ptr(), x.shape[0], qweight.data_ptr(), qweight.numel(), qzeros.data_ptr(), qzeros.numel(),
        scales.data_ptr(), scales.numel(), g_idx.data_ptr() if g_idx is not None else 0,
        g_idx.numel() if g_idx is not None else 0, n, k, groups, gs, zero_offset(checkpoint_format),
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y
