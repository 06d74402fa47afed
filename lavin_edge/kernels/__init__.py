"""Kernels that make chat fast, with backend dispatch.

Public API
----------
``prepare_w4(qweight, qzeros, scales, g_idx=None, group_size=128, checkpoint_format="gptq")``
    One-time repack of a GPTQ linear (see ``gptq_format`` for the layout) into the native
    kernels' layout; returns a :class:`PreparedW4`. Keep the object: ``.matmul(x)`` computes
    ``x @ W^T`` for x [..., K] (fp32 on CPU, fp16 on CUDA) without ever materialising W.
    Act-order (non-monotonic ``g_idx``) is handled by permuting K once here and gathering x
    at run time. v1 ("gptq", stored zero - 1) and "gptq_v2" zeros are normalised here.
``dequantize_gptq(...)``
    Dense fp32 W [N, K] (reference; also the fallback).
``rmsnorm_adapter(x, g, A, a, U, u, modality, eps)``
    Fused RMSNorm + folded routed adapter of the LLM (x [B, T, D], per-sequence modality).
``vit_routed_adapter(x, A, a, R, rb, B, b, Dw, d, temperature, scale)``
    Per-token routed adapter of the ViT (x [..., D]).
``cpu_features()``, ``backend()``, ``available_backends()``
    What the dispatcher found (used by ``lavin-edge info``).

Backends: ``avx512`` (VNNI) > ``avx2`` > ``scalar`` (the C++ reference) > ``torch`` (pure
PyTorch, :mod:`lavin_edge.kernels.reference`), plus ``cuda`` for CUDA tensors. The fastest
available one is used; set ``LAVIN_EDGE_KERNELS=<name>`` to force one. Without the compiled
extension everything falls back to PyTorch, with one warning.

Accuracy of the CPU W4 path: x is quantized in blocks of 32 (one fp32 scale each) to 15-bit
integers (``$LAVIN_EDGE_W4_ACT=int16``, the default; csrc/kernels.h) or to int8 as llama.cpp's
Q8_0 (``int8``), the product is then exact in integers. The relative error this adds to y is
~1e-5 (int8: ~1e-3) relative to ||y|| typically; ``reference.quantize_activations_reference``
reproduces it exactly for tests.

Errors: wrong dtype -> TypeError; wrong device, non-contiguous input, mismatched shapes,
K not a multiple of 8 or of the group size, g_idx out of range -> ValueError.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import reference
from .gptq_format import (
    CHECKPOINT_FORMATS,
    pack_nibbles_rows,
    unpack_nibbles_cols,
    unpack_nibbles_rows,
    zero_offset,
)
from .reference import dequantize_gptq, resolve_group_size

__all__ = [
    "PreparedW4",
    "available_backends",
    "backend",
    "cpu_features",
    "dequantize_gptq",
    "gptq_matmul_scalar",
    "prepare_w4",
    "rmsnorm_adapter",
    "vit_routed_adapter",
]

try:  # the compiled extension is optional: PyTorch fallback without it
    from lavin_edge import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)

_WARNED = False
_AVAILABLE: dict[int, tuple[str, ...]] = {}
CPU_BACKENDS = ("avx512", "avx2", "scalar", "torch")
MAX_RANK = 64


def _warn_fallback() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"lavin_edge._C is not available ({_IMPORT_ERROR}); using the slow PyTorch reference kernels. "
            "Build it with `pip install .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def cpu_features() -> dict[str, Any]:
    """CPU features the native kernels dispatch on (empty flags without the extension)."""
    if _C is None:
        return {"extension": False, "error": _IMPORT_ERROR, "best_isa": "torch"}
    feats = dict(_C.cpu_features())
    feats["extension"] = True
    feats["cuda_devices"] = int(_C.cuda_device_count())
    return feats


def available_backends() -> list[str]:
    """CPU backends usable here, fastest first (always ends with "torch")."""
    if _C is None:
        return ["torch"]
    cached = _AVAILABLE.get(id(_C))  # on the hot path of every matmul: computed once
    if cached is None:
        best = _C.cpu_features()["best_isa"]
        order = ["avx512", "avx2", "scalar"]
        cached = _AVAILABLE[id(_C)] = tuple(order[order.index(best) :]) + ("torch",)
    return list(cached)


def backend() -> str:
    """The CPU backend in use: $LAVIN_EDGE_KERNELS if set (validated), else the fastest."""
    forced = os.environ.get("LAVIN_EDGE_KERNELS", "").strip().lower()
    avail = available_backends()
    if forced and forced != "auto":
        if forced not in CPU_BACKENDS:
            raise ValueError(f"LAVIN_EDGE_KERNELS={forced!r}: expected one of {CPU_BACKENDS} or 'auto'")
        if forced not in avail:
            raise ValueError(f"LAVIN_EDGE_KERNELS={forced!r} is not available here (available: {avail})")
        return forced
    if avail[0] == "torch":
        _warn_fallback()
    return avail[0]


def _resolve(backend_name: str | None) -> str:
    if backend_name is None:
        return backend()
    if backend_name not in CPU_BACKENDS:
        raise ValueError(f"backend must be one of {CPU_BACKENDS}, got {backend_name!r}")
    if backend_name not in available_backends():
        raise ValueError(f"backend {backend_name!r} not available here ({available_backends()})")
    return backend_name


def _cuda_kernels_ok() -> bool:
    return _C is not None and bool(_C.cuda_compiled) and torch.cuda.is_available()


# ---- validation helpers ----------------------------------------------------------------------


def _check(
    name: str,
    t: Any,
    dtype: torch.dtype | tuple[torch.dtype, ...],
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must be {want}, got {t.dtype}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == ts for s, ts in zip(shape, t.shape, strict=False))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return t


# ---- W4 --------------------------------------------------------------------------------------


@dataclass
class PreparedW4:
    """A GPTQ linear repacked once for the native kernels. Build it with :func:`prepare_w4`.

    ``matmul(x)`` returns ``x @ W^T``: x [..., k] -> [..., n]. On CPU x must be fp32 (the
    result is fp32), on CUDA fp16 (result fp16). ``nbytes`` is what one matmul reads of the
    weights (packed nibbles + scales + zeros), the figure the benchmark divides by time.

    Fields: ``mode`` is "tiled" (CPU int8-dot kernels, the fast path), "cuda", or "dense"
    (fallback for layouts the fast path does not take: group sizes that are not a multiple
    of 32 or act-order groups of unequal size; W is then kept dequantized in fp32).
    """

    n: int
    k: int
    group_size: int
    groups: int
    mode: str
    device: torch.device
    qw: torch.Tensor | None = None  # tiled: uint8 [Np/16, Kp/8, 16, 4]; cuda: int32 [K/8, N]
    scales: torch.Tensor | None = None  # tiled: fp16 [Np/16, G, 16]; cuda: fp16 [G, N]
    zeros: torch.Tensor | None = None  # tiled: uint8 [Np/16, G, 16]; cuda: uint8 [G, N]
    perm: torch.Tensor | None = None  # int32 [K] act-order gather, None when identity
    dense: torch.Tensor | None = None  # dense mode: fp32 [N, K]
    np_: int = 0
    kp: int = 0
    backend_name: str | None = None  # force a CPU backend for this object (tests/bench)

    @property
    def nbytes(self) -> int:
        if self.mode == "dense":
            assert self.dense is not None
            return self.dense.numel() * 4
        total = 0
        for t in (self.qw, self.scales, self.zeros):
            assert t is not None
            total += t.numel() * t.element_size()
        return total

    def matmul(self, x: torch.Tensor, *, threads: int | None = None) -> torch.Tensor:
        """``x @ W^T`` for x [..., k]; see the class docstring for dtypes."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.k:
            raise ValueError(f"x must have shape [..., {self.k}], got {list(x.shape)}")
        lead = x.shape[:-1]
        if self.mode == "cuda":
            _check("x", x, torch.float16, device=self.device)
            return self._matmul_cuda(x.reshape(-1, self.k)).reshape(*lead, self.n)
        _check("x", x, torch.float32, device=self.device)
        x2 = x.reshape(-1, self.k)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.n)
        if self.mode == "dense":
            assert self.dense is not None
            return (x2 @ self.dense.t()).reshape(*lead, self.n)
        name = _resolve(self.backend_name)
        if name == "torch":
            return (x2 @ self.dequantize().t()).reshape(*lead, self.n)
        assert _C is not None and self.qw is not None and self.scales is not None and self.zeros is not None
        m = x2.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float32)
        _C.w4_gemm(
            name,
            self.qw.data_ptr(),
            self.qw.numel(),
            self.scales.data_ptr(),
            self.scales.numel(),
            self.zeros.data_ptr(),
            self.zeros.numel(),
            self.perm.data_ptr() if self.perm is not None else 0,
            self.perm.numel() if self.perm is not None else 0,
            self.n,
            self.np_,
            self.k,
            self.kp,
            self.groups,
            x2.data_ptr(),
            m,
            self.k,
            y.data_ptr(),
            self.n,
            threads if threads is not None else torch.get_num_threads(),
        )
        return y.reshape(*lead, self.n)

    __call__ = matmul

    def _matmul_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        assert _C is not None and self.qw is not None
        m = x2.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float16, device=self.device)
        if m == 0:
            return y
        ws = torch.empty(m, self.n, dtype=torch.float32, device=self.device)
        _C.cuda_w4_gemm(
            x2.data_ptr(),
            self.k,
            self.perm.data_ptr() if self.perm is not None else 0,
            self.qw.data_ptr(),
            self.scales.data_ptr(),
            self.zeros.data_ptr(),
            m,
            self.n,
            self.k,
            self.groups,
            self.group_size,
            ws.data_ptr(),
            y.data_ptr(),
            torch.cuda.current_stream(self.device).cuda_stream,
        )
        return y

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 W [n, k] in the original row order (for tests and fallbacks)."""
        if self.mode == "dense":
            assert self.dense is not None
            return self.dense
        assert self.qw is not None and self.scales is not None and self.zeros is not None
        if self.mode == "cuda":
            q = unpack_nibbles_rows(self.qw).float()  # [K, N], group order
            gi = torch.arange(self.k, device=self.device) // self.group_size
            w_sorted = self.scales.float()[gi] * (q - self.zeros.float()[gi])
        else:
            t = self.np_ // 16
            qw = self.qw.view(t, self.kp // 8, 16, 4)
            lo, hi = (qw & 0xF), (qw >> 4)
            q = torch.stack([lo, hi], dim=-1)  # [t, c, i, b, h]
            q = q.permute(1, 4, 3, 0, 2).reshape(self.kp, self.np_)[: self.k, : self.n].float()
            s = self.scales.permute(1, 0, 2).reshape(self.groups, self.np_)[:, : self.n].float()
            z = self.zeros.permute(1, 0, 2).reshape(self.groups, self.np_)[:, : self.n].float()
            rows_per_group = self.kp // self.groups
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
        backend: force a CPU backend for this object ("avx512", "avx2", "scalar", "torch").
    The device of ``qweight`` decides the target: CPU -> tiled layout, CUDA -> CUDA kernels.
    """
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    _check("qweight", qweight, torch.int32, (None, None))
    dev = qweight.device
    kr, n = qweight.shape
    k = kr * 8
    if n == 0 or k == 0:
        raise ValueError("qweight must be non-empty")
    gs = resolve_group_size(group_size, k)
    if k % gs:
        raise ValueError(f"K={k} is not a multiple of group_size={gs}")
    groups = k // gs
    _check("qzeros", qzeros, torch.int32, (groups, (n + 7) // 8), dev)
    _check("scales", scales, (torch.float16, torch.float32), (groups, n), dev)
    if backend is not None:
        _resolve(backend)
    perm = None
    uniform = True
    if g_idx is not None:
        _check("g_idx", g_idx, (torch.int32, torch.int64), (k,), dev)
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= groups:
            raise ValueError(f"g_idx values must be in [0, {groups}), got range [{lo}, {hi}]")
        counts = torch.bincount(g_idx.long(), minlength=groups)
        uniform = bool((counts == gs).all())
        if uniform:
            perm = torch.argsort(g_idx.long(), stable=True)
            if bool((perm == torch.arange(k, device=dev)).all()):
                perm = None
    scales16 = scales.half()
    if g_idx is not None and not uniform:
        dense = dequantize_gptq(qweight, qzeros, scales16, g_idx, gs, checkpoint_format)
        return PreparedW4(n, k, gs, groups, "dense", dev, dense=dense, backend_name=backend)

    perm32 = perm.to(torch.int32).contiguous() if perm is not None else None
    needs_q = dev.type == "cuda" or _C is None or backend == "torch"
    q = unpack_nibbles_rows(qweight) if needs_q else None  # [K, N] uint8, original row order
    if q is not None and perm is not None:
        q = q[perm]
    zeros = unpack_nibbles_cols(qzeros, n).to(torch.int16) + zero_offset(checkpoint_format)
    zeros = zeros.to(torch.uint8)  # true zero points, 0..16 (v1's 0xF + 1 = 16 is kept)

    if dev.type == "cuda":
        assert q is not None
        if not _cuda_kernels_ok() or gs % 8:
            dense = dequantize_gptq(qweight, qzeros, scales16, g_idx, gs, checkpoint_format)
            return PreparedW4(n, k, gs, groups, "dense", dev, dense=dense)
        return PreparedW4(
            n, k, gs, groups, "cuda", dev,
            qw=pack_nibbles_rows(q), scales=scales16.contiguous(), zeros=zeros.contiguous(), perm=perm32,
        )  # fmt: skip
    if dev.type != "cpu":
        raise ValueError(f"unsupported device {dev}")
    if gs % reference.ACT_BLOCK and groups != 1:
        # The int8 blocks of 32 must not straddle groups; other group sizes take the dense path.
        dense = dequantize_gptq(qweight, qzeros, scales16, g_idx, gs, checkpoint_format)
        return PreparedW4(n, k, gs, groups, "dense", dev, dense=dense, backend_name=backend)

    kp = -(-k // 32) * 32
    np_ = -(-n // 16) * 16
    if _C is not None and (backend or "") != "torch":
        qw = torch.empty(np_ // 16, kp // 8, 16, 4, dtype=torch.uint8)
        _C.w4_repack(
            qweight.data_ptr(), qweight.numel(), n, k, perm32.data_ptr() if perm32 is not None else 0,
            perm32.numel() if perm32 is not None else 0, np_, kp, qw.data_ptr(), qw.numel(), torch.get_num_threads(),
        )  # fmt: skip
    else:
        assert q is not None
        qw = repack_tiled_reference(q, kp, np_)
    spad = torch.zeros(groups, np_, dtype=torch.float16)
    spad[:, :n] = scales16
    zpad = torch.zeros(groups, np_, dtype=torch.uint8)
    zpad[:, :n] = zeros
    return PreparedW4(
        n, k, gs, groups, "tiled", dev,
        qw=qw,
        scales=spad.view(groups, np_ // 16, 16).permute(1, 0, 2).contiguous(),
        zeros=zpad.view(groups, np_ // 16, 16).permute(1, 0, 2).contiguous(),
        perm=perm32, np_=np_, kp=kp, backend_name=backend,
    )  # fmt: skip


def repack_tiled_reference(q: torch.Tensor, kp: int, np_: int) -> torch.Tensor:
    """PyTorch version of the tiled repack (the C++ ``w4_repack`` is tested against it).

    q: uint8 [K, N] nibbles in group order -> uint8 [Np/16, Kp/8, 16, 4]: record (tile t,
    chunk c), lane i = column 16t+i, byte b = q[8c+b] | q[8c+b+4] << 4.
    """
    k, n = q.shape
    qpad = torch.zeros(kp, np_, dtype=torch.uint8)
    qpad[:k, :n] = q
    qv = qpad.view(kp // 8, 2, 4, np_ // 16, 16).permute(3, 0, 4, 2, 1)  # [t, c, i, b, h]
    return (qv[..., 0] | (qv[..., 1] << 4)).contiguous()


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
    if _C is None:
        _warn_fallback()
        return reference.w4_matmul_reference(x, qweight, qzeros, scales, g_idx, group_size, checkpoint_format)
    cpu = torch.device("cpu")
    _check("qweight", qweight, torch.int32, (None, None), cpu)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    gs = resolve_group_size(group_size, k)
    if k % gs:
        raise ValueError(f"K={k} is not a multiple of group_size={gs}")
    groups = k // gs
    _check("x", x, torch.float32, (None, k), cpu)
    _check("qzeros", qzeros, torch.int32, (groups, (n + 7) // 8), cpu)
    _check("scales", scales, torch.float16, (groups, n), cpu)
    if g_idx is not None:
        _check("g_idx", g_idx, torch.int32, (k,), cpu)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    _C.w4_gemm_gptq_reference(
        x.data_ptr(), x.shape[0], qweight.data_ptr(), qweight.numel(), qzeros.data_ptr(), qzeros.numel(),
        scales.data_ptr(), scales.numel(), g_idx.data_ptr() if g_idx is not None else 0,
        g_idx.numel() if g_idx is not None else 0, n, k, groups, gs, zero_offset(checkpoint_format),
        y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y


# ---- adapters --------------------------------------------------------------------------------


def _adapter_device_dtype(x: torch.Tensor) -> tuple[torch.device, torch.dtype, bool]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "cuda":
        return x.device, torch.float16, _cuda_kernels_ok()
    if x.device.type != "cpu":
        raise ValueError(f"unsupported device {x.device}")
    return x.device, torch.float32, True


def rmsnorm_adapter(
    x: torch.Tensor,
    g: torch.Tensor,
    A: torch.Tensor,
    a: torch.Tensor,
    U: torch.Tensor,
    u: torch.Tensor,
    modality: torch.Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused ``n = rmsnorm(x) * g; y = n + U_m (A n + a) + u_m`` (LLM attention-norm adapter).

    x [B, T, D] (fp32 on CPU, fp16 on CUDA); g [D], A [r, D], a [r], U [2, D, r], u [2, D]
    fp32 on x's device; modality [B] int (0 text, 1 image; a batch may mix them); r <= 64.
    """
    dev, xdt, native = _adapter_device_dtype(x)
    _check("x", x, xdt, (None, None, None), dev)
    bsz, t, dim = x.shape
    r = A.shape[0] if isinstance(A, torch.Tensor) and A.dim() == 2 else -1
    f32 = torch.float32
    _check("g", g, f32, (dim,), dev)
    _check("A", A, f32, (None, dim), dev)
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r = A.shape[0] must be in [1, {MAX_RANK}], got {r}")
    _check("a", a, f32, (r,), dev)
    _check("U", U, f32, (2, dim, r), dev)
    _check("u", u, f32, (2, dim), dev)
    _check("modality", modality, (torch.int32, torch.int64), (bsz,), dev)
    if bsz and bool(((modality != 0) & (modality != 1)).any()):
        raise ValueError("modality values must be 0 (text) or 1 (image)")
    if x.numel() == 0:
        return torch.empty_like(x)
    row_mod = modality.to(torch.int32).repeat_interleave(t).contiguous()
    y = torch.empty_like(x)
    if dev.type == "cuda":
        if not native:
            _warn_fallback()
            return reference.llm_adapter_reference(x, g, A, a, U, u, modality, eps)
        assert _C is not None
        _C.cuda_llm_adapter(
            x.data_ptr(), y.data_ptr(), bsz * t, dim, r, g.data_ptr(), A.data_ptr(), a.data_ptr(), U.data_ptr(),
            u.data_ptr(), row_mod.data_ptr(), float(eps), torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
        return y
    name = _resolve(backend)
    if name == "torch":
        return reference.llm_adapter_reference(x, g, A, a, U, u, modality, eps)
    assert _C is not None
    _C.llm_adapter(
        name, x.data_ptr(), y.data_ptr(), bsz * t, dim, r, g.data_ptr(), A.data_ptr(), a.data_ptr(), U.data_ptr(),
        u.data_ptr(), row_mod.data_ptr(), float(eps), torch.get_num_threads(),
    )  # fmt: skip
    return y


def vit_routed_adapter(
    x: torch.Tensor,
    A: torch.Tensor,
    a: torch.Tensor,
    R: torch.Tensor,
    rb: torch.Tensor,
    B: torch.Tensor,
    b: torch.Tensor,
    Dw: torch.Tensor,
    d: torch.Tensor,
    temperature: float,
    scale: float = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token routed adapter: ``z = A x + a; w = softmax((R x + rb)/t);
    y = x + s (w0 (B z + b) + w1 (Dw z + d))`` with B, Dw grouped (2 groups).

    x [..., D] (fp32 on CPU, fp16 on CUDA); A [r, D], a [r], R [2, D], rb [2], B and Dw
    [D, r/2], b and d [D], fp32; D and r even, r <= 64; temperature > 0.
    """
    dev, xdt, native = _adapter_device_dtype(x)
    _check("x", x, xdt, None, dev)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., D]")
    dim = x.shape[-1]
    f32 = torch.float32
    _check("A", A, f32, (None, dim), dev)
    r = A.shape[0]
    if r < 2 or r > MAX_RANK or r % 2 or dim % 2:
        raise ValueError(f"rank r must be even in [2, {MAX_RANK}] and D even, got r={r}, D={dim}")
    _check("a", a, f32, (r,), dev)
    _check("R", R, f32, (2, dim), dev)
    _check("rb", rb, f32, (2,), dev)
    _check("B", B, f32, (dim, r // 2), dev)
    _check("b", b, f32, (dim,), dev)
    _check("Dw", Dw, f32, (dim, r // 2), dev)
    _check("d", d, f32, (dim,), dev)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if x.numel() == 0:
        return torch.empty_like(x)
    rows = x.numel() // dim
    y = torch.empty_like(x)
    if dev.type == "cuda":
        if not native:
            _warn_fallback()
            return reference.vit_adapter_reference(x, A, a, R, rb, B, b, Dw, d, temperature, scale)
        assert _C is not None
        _C.cuda_vit_adapter(
            x.data_ptr(), y.data_ptr(), rows, dim, r, A.data_ptr(), a.data_ptr(), R.data_ptr(), rb.data_ptr(),
            B.data_ptr(), b.data_ptr(), Dw.data_ptr(), d.data_ptr(), float(temperature), float(scale),
            torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
        return y
    name = _resolve(backend)
    if name == "torch":
        return reference.vit_adapter_reference(x, A, a, R, rb, B, b, Dw, d, temperature, scale)
    assert _C is not None
    _C.vit_adapter(
        name, x.data_ptr(), y.data_ptr(), rows, dim, r, A.data_ptr(), a.data_ptr(), R.data_ptr(), rb.data_ptr(),
        B.data_ptr(), b.data_ptr(), Dw.data_ptr(), d.data_ptr(), float(temperature), float(scale),
        torch.get_num_threads(),
    )  # fmt: skip
    return y
