"""The CUDA engine's kernels: a 4-bit GPTQ linear repacked once at load for the decode GEMV, and the fused
RMSNorm + routed adapter in fp16, each with the PyTorch reference the engine runs on CPU tensors.

``KERNELS`` maps each CUDA kernel's name to ``(cuda implementation, PyTorch reference)``; the public functions
(:func:`w4_linear`, :func:`dequantize_w4`, :func:`norm_adapter`) pick the CUDA side for CUDA tensors when the
extension has its CUDA kernels, else the reference, so the same engine code runs in CI on CPU tensors.

Arithmetic (the kernels', csrc/cuda/w4_lane.h): a weight is dequantized in fp16 as ``fp16(s * (q - z))``
(``q - z`` is exact, one rounding); on the GPU (m <= 8) each 8-input word's four fp16 products are summed by
``hfma2`` in fp16 and every word's sum is added in fp32. The references dequantize exactly as the kernel does
and sum in fp32 (close, not bit-equal); the bit-exact oracle of the GPU kernel is the lane-by-lane emulation
in the CPU extension (:func:`w4_linear_lanes`). Layout of :class:`CudaW4`: see csrc/cuda/README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .dispatch import cuda_kernels_ok, extension
from .gptq_format import GPTQTensors, unpack_nibbles_cols, zero_offset

GEMV_MAX_M = 8  # rows the decode GEMV takes; more go through dequantize + torch.matmul
CHUNK = 32  # inputs per 128-bit weight load (the kernel's unit; K and the group size are multiples of it)
# Nibble slot s of a repacked word holds input 2s (s < 4) or 2(s-4)+1: `(w >> 4j) & 0x000f000f` then yields
# inputs 2j and 2j+1 as the low and high fp16 of a half2 (the lop3 trick, see csrc/cuda/README.md).
_SLOT_INPUT = (0, 2, 4, 6, 1, 3, 5, 7)
_OUT_KIND = {None: 0, torch.float16: 1, torch.float32: 2}  # store fp16 / add into fp16 / add into fp32


@dataclass
class CudaW4:
    """A GPTQ linear ``W [n, k]`` in the CUDA GEMV's layout (csrc/cuda/README.md), on ``qw``'s device.

    ``qw`` int32 [n, k/8]: row n's inputs in group order, 32 per 128-bit chunk, nibbles interleaved as
    ``_SLOT_INPUT``; ``sz`` fp16 [n, G, 2]: (scale, 1024 + zero point) of each group; ``perm`` int64 [k] or
    None: input j of the group order is x's column ``perm[j]`` (act-order), None when already in order.
    ``dense``: on CPU tensors only, the dequantized weights in group order as fp32 [n, k], built at prepare time
    so that the reference's step is one F.linear (no lazy state: it traces as one graph)."""

    n: int
    k: int
    group_size: int
    qw: torch.Tensor
    sz: torch.Tensor
    perm: torch.Tensor | None
    dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.qw.device

    @property
    def groups(self) -> int:
        return self.k // self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes one GEMV call reads of the weights."""
        return self.qw.numel() * 4 + self.sz.numel() * 2


def _group_order(g_idx: torch.Tensor, k: int, gs: int) -> torch.Tensor | None:
    """The input order that makes every group contiguous (None when it already is); ValueError when the
    groups are not ``k / gs`` groups of ``gs`` inputs."""
    gi = g_idx.long().cpu()
    want = torch.arange(k) // gs
    if torch.equal(gi, want):
        return None
    perm = torch.argsort(gi, stable=True)
    if not torch.equal(gi[perm], want):
        raise ValueError(f"g_idx does not split K={k} into groups of {gs} inputs")
    return perm


def _repack_words(qweight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """GPTQ qweight int32 [k/8, n] -> the kernel's words int32 [n, k/8]: inputs in group order (``perm``),
    nibble slots in ``_SLOT_INPUT`` order. Byte operations on qweight's device (one byte per weight), so a
    GPU repacks a 7B linear at once and a CPU in a fraction of a second."""
    kr, n = qweight.shape
    b = qweight.contiguous().view(torch.uint8).reshape(kr, n, 4)  # little-endian: byte j = inputs 2j, 2j+1
    lo, hi = b & 0xF, b >> 4
    inp = torch.stack([t[:, :, j] for j in range(4) for t in (lo, hi)], dim=1)  # [k/8, 8, n]: input 8r+i
    if perm is not None:
        inp = inp.reshape(kr * 8, n)[perm.to(inp.device)].reshape(kr, 8, n)
    out = torch.stack([inp[:, _SLOT_INPUT[2 * t]] | (inp[:, _SLOT_INPUT[2 * t + 1]] << 4) for t in range(4)], dim=2)
    return out.view(torch.int32).reshape(kr, n).t().contiguous()


def prepare_w4_cuda(g: GPTQTensors, device: torch.device | str) -> CudaW4:
    """Repack a GPTQ linear once for the CUDA GEMV, on ``device`` (the checkpoint's tensors are moved there
    first, so a GPU does the repacking).

    K and the group size (-1: all of K) must be multiples of 32; act-order (non-monotonic ``g_idx``) is kept
    as a permutation of x's columns. ValueError otherwise."""
    n, k = g.shape
    gs = k if g.group_size is None or g.group_size <= 0 else int(g.group_size)
    if k % CHUNK or gs % CHUNK or k % gs:
        raise ValueError(f"the CUDA W4 layout needs K ({k}) and group_size ({gs}) multiples of {CHUNK}, "
                         f"K a multiple of group_size")
    dev = torch.device(device)
    perm = _group_order(g.g_idx, k, gs)
    qw = _repack_words(g.qweight.to(dev), perm)
    gorder = torch.arange(k // gs) if perm is None else g.g_idx.long().cpu()[perm[::gs]]
    zeros = unpack_nibbles_cols(g.qzeros.to(dev), n).float() + zero_offset(g.checkpoint_format)  # [G, n]
    gorder = gorder.to(dev)
    sz = torch.stack([g.scales.to(dev).float()[gorder].t(), zeros[gorder].t() + 1024.0], dim=2)
    w = CudaW4(n, k, gs, qw, sz.to(torch.float16).contiguous(), None if perm is None else perm.to(dev))
    if dev.type == "cpu":
        w.dense = _dequantize_sorted(w).float()
    return w


# ----------------------------------------------------------------------------------------------- references

def _dequantize_sorted(w: CudaW4) -> torch.Tensor:
    """fp16 [n, k] in the group (stored) order: ``fp16(s * (q - z))``, as the kernel dequantizes."""
    b = w.qw.view(torch.uint8).reshape(w.n, w.k // 8, 4)  # byte t: nibble slots 2t (low), 2t + 1 (high)
    lo, hi = b & 0xF, b >> 4
    slots = [t[:, :, j] for j in range(4) for t in (lo, hi)]
    q = torch.stack([slots[_SLOT_INPUT.index(i)] for i in range(8)], dim=2).to(torch.float16)
    q = q.reshape(w.n, w.groups, w.group_size)
    s, z = w.sz[:, :, 0:1], w.sz[:, :, 1:2]
    return ((q + 1024.0) - z).mul(s).reshape(w.n, w.k)  # fp16 ops: q - z exact, one rounding


def _dequantize_ref(w: CudaW4, out: torch.Tensor | None = None) -> torch.Tensor:
    ws = _dequantize_sorted(w)
    if out is None:
        out = torch.empty(w.n, w.k, dtype=torch.float16, device=w.device)
    if w.perm is None:
        out.copy_(ws)
    else:
        out[:, w.perm] = ws
    return out


def _gather(x: torch.Tensor, w: CudaW4) -> torch.Tensor:
    return x if w.perm is None else x.index_select(1, w.perm)


def _epilogue(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """fp32 product -> fp16 result, or added into ``out`` (fp16: rounded once after the fp32 add)."""
    if out is None:
        return y.to(torch.float16)
    out.copy_(out.float() + y)
    return out


def _w4_linear_ref(x: torch.Tensor, w: CudaW4, out: torch.Tensor | None = None) -> torch.Tensor:
    dense = w.dense if w.dense is not None else _dequantize_sorted(w).float()
    return _epilogue(F.linear(_gather(x, w).float(), dense), out)


def _norm_adapter_ref(x: torch.Tensor, w: CudaNormAdapter, row_modality: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + w.eps) * w.g.float()
    if w.plain:
        return n.to(torch.float16)
    z = F.linear(n, w.A.float(), w.a.float())
    up0 = F.linear(z, w.U[0].float(), w.u[0].float())
    up1 = F.linear(z, w.U[1].float(), w.u[1].float())
    img = (row_modality[: x.shape[0]] != 0).unsqueeze(1)
    return (n + torch.where(img, up1, up0)).to(torch.float16)


# ----------------------------------------------------------------------------------------------- CUDA side

def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _w4_linear_cuda(x: torch.Tensor, w: CudaW4, out: torch.Tensor | None = None) -> torch.Tensor:
    m = x.shape[0]
    if m > GEMV_MAX_M:
        ws = _dequantize_sorted_cuda(w, torch.empty(w.n, w.k, dtype=torch.float16, device=w.device))
        y = torch.matmul(_gather(x, w), ws.t())
        if out is None:
            return y
        out.add_(y)
        return out
    kind = _OUT_KIND[None if out is None else out.dtype]
    if out is None:
        out = torch.empty(m, w.n, dtype=torch.float16, device=x.device)
    if m == 0:
        return out
    xg = _gather(x, w).contiguous()
    if xg.data_ptr() % 16:  # the kernel reads x 128 bits at a time
        xg = xg.clone()
    extension().cuda_w4_gemv(  # type: ignore[union-attr]
        xg.data_ptr(), m, w.qw.data_ptr(), w.sz.data_ptr(), out.data_ptr(), _ldo(out, w.n), kind, w.n, w.k,
        w.group_size, _stream(x))
    return out


def _ldo(out: torch.Tensor, n: int) -> int:
    """out's row stride; a single row's stride is never read (and may be anything in a view)."""
    return out.stride(0) if out.shape[0] > 1 else n


def _dequantize_sorted_cuda(w: CudaW4, out: torch.Tensor) -> torch.Tensor:
    if not out.is_contiguous() or out.data_ptr() % 16:  # the kernel writes whole rows, 128 bits at a time
        return out.copy_(_dequantize_sorted_cuda(w, torch.empty_like(out, memory_format=torch.contiguous_format)))
    extension().cuda_w4_dequant(w.qw.data_ptr(), w.sz.data_ptr(), out.data_ptr(), w.n, w.k,  # type: ignore
                                w.group_size, _stream(out))
    return out


def _dequantize_cuda(w: CudaW4, out: torch.Tensor | None = None) -> torch.Tensor:
    if w.perm is None:
        out = torch.empty(w.n, w.k, dtype=torch.float16, device=w.device) if out is None else out
        return _dequantize_sorted_cuda(w, out)
    ws = _dequantize_sorted_cuda(w, torch.empty(w.n, w.k, dtype=torch.float16, device=w.device))
    out = torch.empty_like(ws) if out is None else out
    out[:, w.perm] = ws
    return out


def _norm_adapter_cuda(x: torch.Tensor, w: CudaNormAdapter, row_modality: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0]
    if row_modality.dtype != torch.int32 or not row_modality.is_contiguous():
        row_modality = row_modality.to(torch.int32).contiguous()
    y = torch.empty(rows, w.dim, dtype=torch.float16, device=x.device)
    extension().cuda_norm_adapter(  # type: ignore[union-attr]
        x.data_ptr(), x.dtype == torch.float32, y.data_ptr(), rows, w.dim, w.rank, w.g.data_ptr(),
        w.A.data_ptr(), w.a.data_ptr(), w.U.data_ptr(), w.u.data_ptr(), row_modality.data_ptr(), w.eps,
        _stream(x))
    return y


# ----------------------------------------------------------------------------------------------- public API

Kernel = Callable[..., torch.Tensor]
KERNELS: dict[str, tuple[Kernel, Kernel]] = {
    "w4_gemv": (_w4_linear_cuda, _w4_linear_ref),
    "w4_dequant": (_dequantize_cuda, _dequantize_ref),
    "norm_adapter": (_norm_adapter_cuda, _norm_adapter_ref),
}


def _pick(name: str, t: torch.Tensor) -> Kernel:
    cuda_impl, ref = KERNELS[name]
    return cuda_impl if t.device.type == "cuda" and cuda_kernels_ok() else ref


def w4_linear(x: torch.Tensor, w: CudaW4, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T`` for x fp16 [m, k] on w's device: fp16 [m, n], or added into ``out`` ([m, n] fp16 or fp32,
    unit column stride: a column slice of a wider buffer works), which is returned."""
    if x.dim() != 2 or x.shape[1] != w.k or x.dtype != torch.float16:
        raise ValueError(f"x must be fp16 [m, {w.k}], got {x.dtype} {list(x.shape)}")
    if out is not None and (out.shape != (x.shape[0], w.n) or out.dtype not in (torch.float16, torch.float32)
                            or out.stride(1) != 1):
        raise ValueError(f"out must be fp16/fp32 [{x.shape[0]}, {w.n}] with unit column stride")
    return _pick("w4_gemv", x)(x, w, out)


def dequantize_w4(w: CudaW4, out: torch.Tensor | None = None) -> torch.Tensor:
    """W as fp16 [n, k] in x's column order (prefill: ``x @ W^T`` by torch.matmul), into ``out`` if given."""
    return _pick("w4_dequant", w.qw)(w, out)


@dataclass
class CudaNormAdapter:
    """RMSNorm(x) * g followed by the folded routed adapter n + U_m (A n + a) + u_m (m the row's modality),
    fp16 weights on one device: g [D], A [r, D], a [r], U [2, D, r], u [2, D]. ``plain``: a bare RMSNorm
    (a zero rank-1 adapter for the kernel)."""

    g: torch.Tensor
    A: torch.Tensor
    a: torch.Tensor
    U: torch.Tensor
    u: torch.Tensor
    eps: float
    plain: bool = False

    @property
    def dim(self) -> int:
        return self.g.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[0]


MAX_NORM_DIM = 12288  # the kernel keeps a row's fp32 normed values in 48 KB of shared memory
MAX_RANK = 64


def prepare_norm_adapter_cuda(g: torch.Tensor, A: torch.Tensor | None, a: torch.Tensor | None,
                              U: torch.Tensor | None, u: torch.Tensor | None, eps: float,
                              device: torch.device | str) -> CudaNormAdapter:
    """The weights (any float dtype; shapes above) as fp16 on ``device``; A (and the rest) None: RMSNorm only."""
    d = g.shape[0]
    plain = A is None
    if plain:
        A, a, U, u = torch.zeros(1, d), torch.zeros(1), torch.zeros(2, d, 1), torch.zeros(2, d)
    assert A is not None and a is not None and U is not None and u is not None
    r = A.shape[0]
    if not (1 <= r <= MAX_RANK and d <= MAX_NORM_DIM and A.shape == (r, d) and a.shape == (r,)
            and U.shape == (2, d, r) and u.shape == (2, d)):
        raise ValueError(f"bad norm-adapter shapes: g {list(g.shape)}, A {list(A.shape)}, U {list(U.shape)} "
                         f"(rank <= {MAX_RANK}, D <= {MAX_NORM_DIM})")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    dev = torch.device(device)
    g, A, a, U, u = (t.detach().to(dev, torch.float16).contiguous() for t in (g, A, a, U, u))
    return CudaNormAdapter(g, A, a, U, u, float(eps), plain)


def norm_adapter(x: torch.Tensor, w: CudaNormAdapter, row_modality: torch.Tensor) -> torch.Tensor:
    """fp16 [rows, D] for x fp32 or fp16 [rows, D] (contiguous) and ``row_modality`` int32 with at least
    ``rows`` entries (0 text, 1 image)."""
    if x.dim() != 2 or x.shape[1] != w.dim or x.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"x must be fp16/fp32 [rows, {w.dim}], got {x.dtype} {list(x.shape)}")
    return _pick("norm_adapter", x)(x.contiguous(), w, row_modality)


def w4_linear_lanes(x: torch.Tensor, w: CudaW4, out: torch.Tensor | None = None) -> torch.Tensor:
    """The GPU GEMV emulated lane by lane on the CPU by the extension (same per-lane code, same fp16
    rounding, same warp reduction order): what the kernel must produce bit for bit. CPU tensors, m <= 8."""
    c = extension()
    if c is None:
        raise RuntimeError("the lane emulation needs the compiled extension lavin_edge._C")
    m = x.shape[0]
    if not 1 <= m <= GEMV_MAX_M or x.shape[1] != w.k or x.dtype != torch.float16:
        raise ValueError(f"x must be fp16 [m <= {GEMV_MAX_M}, {w.k}]")
    xg = _gather(x.cpu(), _on_cpu(w)).contiguous().clone()
    kind = _OUT_KIND[None if out is None else out.dtype]
    if out is None:
        out = torch.empty(m, w.n, dtype=torch.float16)
    qw, sz = w.qw.cpu().contiguous(), w.sz.cpu().contiguous()
    c.w4_gemv_emulate(xg.data_ptr(), m, qw.data_ptr(), sz.data_ptr(), out.data_ptr(), _ldo(out, w.n), kind, w.n,
                      w.k, w.group_size)
    return out


def _on_cpu(w: CudaW4) -> CudaW4:
    return w if w.device.type == "cpu" else CudaW4(w.n, w.k, w.group_size, w.qw.cpu(), w.sz.cpu(),
                                                   None if w.perm is None else w.perm.cpu())
