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
from .gptq_format import (
    CHECKPOINT_FORMATS,
    GPTQTensors,
    pack_nibbles_rows,
    resolve_group_size,
    unpack_nibbles_cols,
    unpack_nibbles_rows,
    zero_offset,
)


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


@dataclass
class _Checked:
    """A validated GPTQ linear's sizes, and its act-order gather (``perm``, int32, None for the identity;
    ``uniform`` False when its groups are of unequal size: only the dense form takes it)."""

    n: int
    k: int
    group_size: int
    groups: int
    device: torch.device
    perm: torch.Tensor | None
    uniform: bool


def _check(t: GPTQTensors, backend: str | None) -> _Checked:
    if t.checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {t.checkpoint_format!r}")
    check_tensor("qweight", t.qweight, torch.int32, (None, None))
    dev = t.qweight.device
    kr, n = t.qweight.shape
    k = kr * 8
    if n == 0 or k == 0:
        raise ValueError("qweight must be non-empty")
    gs = resolve_group_size(t.group_size, k)
    if k % gs:
        raise ValueError(f"K={k} is not a multiple of group_size={gs}")
    groups = k // gs
    check_tensor("qzeros", t.qzeros, torch.int32, (groups, (n + 7) // 8), dev)
    check_tensor("scales", t.scales, (torch.float16, torch.float32), (groups, n), dev)
    if backend is not None:
        resolve_backend(backend)
    perm, uniform = None, True
    if t.g_idx is not None:
        check_tensor("g_idx", t.g_idx, (torch.int32, torch.int64), (k,), dev)
        uniform, order = tiling.act_order(t.g_idx.cpu().numpy(), groups, gs)
        perm = torch.from_numpy(order).to(dev).contiguous() if order is not None else None
    return _Checked(n, k, gs, groups, dev, perm, uniform)


def prepare_w4(t: GPTQTensors, *, backend: str | None = None) -> PreparedW4:
    """Validate a GPTQ linear and repack it for the native kernels (one time, at load).

    ``t``: qweight int32 [K/8, N], qzeros int32 [G, ceil(N/8)], scales fp16 (or fp32) [G, N], g_idx int32/int64
    [K] or None, its group size (-1/None/0 = all of K) and checkpoint format ("gptq", v1: stored zero - 1, or
    "gptq_v2"). ``backend`` forces a CPU backend for this object ("avx512", "avx2", "scalar", "torch").
    The device of ``qweight`` decides the target: CPU -> tiled layout (:func:`prepare_tiled`), CUDA -> the
    CUDA kernels (:func:`prepare_cuda`); what neither takes -> the dense form (:func:`prepare_dense`).
    """
    c = _check(t, backend)
    t = GPTQTensors(t.qweight, t.qzeros, t.scales.half(), t.g_idx, t.checkpoint_format, c.group_size)
    if not c.uniform:
        return prepare_dense(t, c, backend)
    if c.device.type == "cuda":
        return prepare_cuda(t, c, backend)
    if c.device.type != "cpu":
        raise ValueError(f"unsupported device {c.device}")
    return prepare_tiled(t, c, backend)


def prepare_dense(t: GPTQTensors, c: _Checked, backend: str | None) -> PreparedW4:
    """W dequantized to fp32 [N, K]: for what the fast paths do not take."""
    return PreparedW4(c.n, c.k, c.group_size, c.groups, "dense", c.device, dense=t.dequantize(), backend_name=backend)


def _true_zeros(t: GPTQTensors, n: int) -> torch.Tensor:
    """The true zero points uint8 [G, N], 0..16 (v1's 0xF + 1 = 16 is kept)."""
    return (unpack_nibbles_cols(t.qzeros, n).to(torch.int16) + zero_offset(t.checkpoint_format)).to(torch.uint8)


def _nibbles(t: GPTQTensors, perm: torch.Tensor | None) -> torch.Tensor:
    """uint8 [K, N], rows in group order."""
    q = unpack_nibbles_rows(t.qweight)
    return q[perm] if perm is not None else q


def prepare_cuda(t: GPTQTensors, c: _Checked, backend: str | None) -> PreparedW4:
    """The CUDA kernel's layout (``CudaW4``), or the dense form where the kernel is unusable."""
    if not cuda_kernels_ok() or c.group_size % 8:
        return prepare_dense(t, c, backend)
    cuda = CudaW4(pack_nibbles_rows(_nibbles(t, c.perm)), t.scales.contiguous(), _true_zeros(t, c.n).contiguous())
    return PreparedW4(c.n, c.k, c.group_size, c.groups, "cuda", c.device, perm=c.perm, cuda=cuda)


def prepare_tiled(t: GPTQTensors, c: _Checked, backend: str | None) -> PreparedW4:
    """The CPU kernels' tiled layout (``TiledW4``), built by ``lavin_edge.kernels.tiling.tile_linear`` (NumPy,
    shared with the engine without PyTorch; the PyTorch repack without the extension or for the torch
    backend); the dense form for group sizes the int8 blocks of 32 would straddle."""
    if c.group_size % reference.ACT_BLOCK and c.groups != 1:
        return prepare_dense(t, c, backend)
    ext = extension()
    np_, kp = tiling.padded_sizes(c.n, c.k)
    if ext is not None and (backend or "") != "torch":
        a = tiling.tile_linear(ext, t.qweight.numpy(), t.qzeros.numpy(), t.scales.numpy(),
                               None if t.g_idx is None else t.g_idx.numpy(), c.group_size, t.checkpoint_format,
                               torch.get_num_threads())
        assert a is not None  # _check and the group test above refuse what tile_linear refuses
        tiled = TiledW4(torch.from_numpy(a.qw), torch.from_numpy(a.scales), torch.from_numpy(a.zeros), np_, kp,
                        a.native)
        perm = None if a.perm is None else torch.from_numpy(a.perm)  # the array the descriptor points into
        return PreparedW4(c.n, c.k, c.group_size, c.groups, "tiled", c.device, perm=perm, tiled=tiled,
                          backend_name=backend)
    st, zt = tiling.tile_params(t.scales.numpy(), _true_zeros(t, c.n).numpy(), np_)
    tiled = TiledW4(repack_tiled_reference(_nibbles(t, c.perm), kp, np_), torch.from_numpy(st), torch.from_numpy(zt),
                    np_, kp)
    if ext is not None:
        tiled.native = tiling.descriptor(ext, tiled.qw, tiled.scales, tiled.zeros, c.perm, c.n, c.k, c.groups)
    return PreparedW4(c.n, c.k, c.group_size, c.groups, "tiled", c.device, perm=c.perm, tiled=tiled,
                      backend_name=backend)


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


def gptq_matmul_scalar(x: torch.Tensor, t: GPTQTensors) -> torch.Tensor:
    """C++ scalar oracle straight on the GPTQ layout (fp32 x [m, K], double accumulation)."""
    c = extension()
    if c is None:
        warn_fallback()
        return reference.w4_matmul_reference(x, t)
    cpu = torch.device("cpu")
    check_tensor("qweight", t.qweight, torch.int32, (None, None), cpu)
    k, n = t.qweight.shape[0] * 8, t.qweight.shape[1]
    gs = resolve_group_size(t.group_size, k)
    if k % gs:
        raise ValueError(f"K={k} is not a multiple of group_size={gs}")
    groups = k // gs
    check_tensor("x", x, torch.float32, (None, k), cpu)
    check_tensor("qzeros", t.qzeros, torch.int32, (groups, (n + 7) // 8), cpu)
    check_tensor("scales", t.scales, torch.float16, (groups, n), cpu)
    g_idx = t.g_idx
    if g_idx is not None:
        check_tensor("g_idx", g_idx, torch.int32, (k,), cpu)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    c.w4_gemm_gptq_reference(
        x.data_ptr(), x.shape[0], t.qweight.data_ptr(), t.qweight.numel(), t.qzeros.data_ptr(), t.qzeros.numel(),
        t.scales.data_ptr(), t.scales.numel(), g_idx.data_ptr() if g_idx is not None else 0,
        g_idx.numel() if g_idx is not None else 0, n, k, groups, gs, zero_offset(t.checkpoint_format),
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y
