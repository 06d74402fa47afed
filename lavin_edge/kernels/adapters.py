"""Adapter kernels: the LLM's fused RMSNorm + folded routed adapter, and the ViT's per-token routed adapter.

Shapes (fp32 weights on x's device; r <= 64):
  LLM: ``n = rmsnorm(x) * g; y = n + U_m (A n + a) + u_m`` with g [D], A [r, D], a [r], U [2, D, r],
  u [2, D]; m the row's modality (0 text, 1 image).
  ViT: ``z = A x + a; w = softmax((R x + rb) / t); y = x + s (w0 (B z + b) + w1 (Dw z + d))`` with
  A [r, D], a [r], R [2, D], rb [2], B and Dw [D, r/2] (grouped, 2 groups), b and d [D].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import reference
from .decode import norm_weights
from .dispatch import MAX_RANK, check_tensor, cuda_kernels_ok, extension, resolve_backend, warn_fallback


def _adapter_device_dtype(x: torch.Tensor) -> tuple[torch.device, torch.dtype, bool]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "cuda":
        return x.device, torch.float16, cuda_kernels_ok()
    if x.device.type != "cpu":
        raise ValueError(f"unsupported device {x.device}")
    return x.device, torch.float32, True


def _check_llm_weights(g: Any, A: Any, a: Any, U: Any, u: Any, dim: int | None, dev: torch.device | None) -> int:
    """Checks the LLM adapter's weights; returns the rank."""
    f32 = torch.float32
    check_tensor("g", g, f32, (dim,), dev)
    dim = g.shape[0]
    check_tensor("A", A, f32, (None, dim), dev)
    r = A.shape[0]
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r = A.shape[0] must be in [1, {MAX_RANK}], got {r}")
    check_tensor("a", a, f32, (r,), dev)
    check_tensor("U", U, f32, (2, dim, r), dev)
    check_tensor("u", u, f32, (2, dim), dev)
    return r


@dataclass
class PreparedNormAdapter:
    """An RMSNorm + folded routed adapter of the LLM, checked once (build with :func:`prepare_norm_adapter`).

    ``native`` is the extension's ``NormAdapterWeights`` descriptor of these tensors (None without the
    extension): the per-op call (:meth:`apply_rows`) and the one-call decode step both take it."""

    g: torch.Tensor
    A: torch.Tensor
    a: torch.Tensor
    U: torch.Tensor
    u: torch.Tensor
    eps: float
    native: Any = None

    @property
    def dim(self) -> int:
        return self.g.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def apply_rows(self, x: torch.Tensor, row_modality: torch.Tensor, isa: str, threads: int) -> torch.Tensor:
        """y for x fp32 [rows, D] contiguous on the CPU, ``row_modality`` int32 with at least ``rows`` entries
        (0/1), on the native ``isa``; unchecked (the runtime's per-op path)."""
        rows = x.shape[0]
        y = torch.empty_like(x)
        extension().llm_adapter(isa, self.native, x.data_ptr(), y.data_ptr(), rows,  # type: ignore[union-attr]
                                row_modality.data_ptr(), threads)
        return y

    def reference(self, x: torch.Tensor, modality: int) -> torch.Tensor:
        """The same maths in plain PyTorch for one modality (the reference backend's path)."""
        n = F.rms_norm(x, (x.shape[-1],), self.g, self.eps)
        return n + F.linear(F.linear(n, self.A, self.a), self.U[modality], self.u[modality])


def prepare_norm_adapter(g: torch.Tensor, A: torch.Tensor, a: torch.Tensor, U: torch.Tensor, u: torch.Tensor,
                         eps: float) -> PreparedNormAdapter:
    """Check an LLM norm + folded adapter (fp32 CPU tensors, shapes in the module docstring; they are made
    contiguous fp32 here) and build its native descriptor when the extension is present."""
    g, A, a, U, u = (t.float().contiguous() for t in (g, A, a, U, u))
    _check_llm_weights(g, A, a, U, u, None, torch.device("cpu"))
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    p = PreparedNormAdapter(g, A, a, U, u, float(eps))
    c = extension()
    if c is not None:
        p.native = norm_weights(g, A, a, U, u, eps)
    return p


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
    """Fused ``n = rmsnorm(x) * g; y = n + U_m (A n + a) + u_m`` (LLM attention-norm adapter), checked.

    x [B, T, D] (fp32 on CPU, fp16 on CUDA); g [D], A [r, D], a [r], U [2, D, r], u [2, D]
    fp32 on x's device; modality [B] int (0 text, 1 image; a batch may mix them); r <= 64.
    """
    dev, xdt, native = _adapter_device_dtype(x)
    check_tensor("x", x, xdt, (None, None, None), dev)
    bsz, t, dim = x.shape
    r = A.shape[0] if isinstance(A, torch.Tensor) and A.dim() == 2 else -1
    f32 = torch.float32
    check_tensor("g", g, f32, (dim,), dev)
    check_tensor("A", A, f32, (None, dim), dev)
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r = A.shape[0] must be in [1, {MAX_RANK}], got {r}")
    _check_llm_weights(g, A, a, U, u, dim, dev)
    check_tensor("modality", modality, (torch.int32, torch.int64), (bsz,), dev)
    if bsz and bool(((modality != 0) & (modality != 1)).any()):
        raise ValueError("modality values must be 0 (text) or 1 (image)")
    if x.numel() == 0:
        return torch.empty_like(x)
    row_mod = modality.to(torch.int32).repeat_interleave(t).contiguous()
    y = torch.empty_like(x)
    c = extension()
    if dev.type == "cuda":
        if not native:
            warn_fallback()
            return reference.llm_adapter_reference(x, g, A, a, U, u, modality, eps)
        assert c is not None
        c.cuda_llm_adapter(
            x.data_ptr(), y.data_ptr(), bsz * t, dim, r, g.data_ptr(), A.data_ptr(), a.data_ptr(), U.data_ptr(),
            u.data_ptr(), row_mod.data_ptr(), float(eps), torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
        return y
    name = resolve_backend(backend)
    if name == "torch":
        return reference.llm_adapter_reference(x, g, A, a, U, u, modality, eps)
    assert c is not None
    weights = norm_weights(g, A, a, U, u, eps)
    c.llm_adapter(name, weights, x.data_ptr(), y.data_ptr(), bsz * t, row_mod.data_ptr(), torch.get_num_threads())
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
    check_tensor("x", x, xdt, None, dev)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., D]")
    dim = x.shape[-1]
    f32 = torch.float32
    check_tensor("A", A, f32, (None, dim), dev)
    r = A.shape[0]
    if r < 2 or r > MAX_RANK or r % 2 or dim % 2:
        raise ValueError(f"rank r must be even in [2, {MAX_RANK}] and D even, got r={r}, D={dim}")
    check_tensor("a", a, f32, (r,), dev)
    check_tensor("R", R, f32, (2, dim), dev)
    check_tensor("rb", rb, f32, (2,), dev)
    check_tensor("B", B, f32, (dim, r // 2), dev)
    check_tensor("b", b, f32, (dim,), dev)
    check_tensor("Dw", Dw, f32, (dim, r // 2), dev)
    check_tensor("d", d, f32, (dim,), dev)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if x.numel() == 0:
        return torch.empty_like(x)
    rows = x.numel() // dim
    y = torch.empty_like(x)
    c = extension()
    if dev.type == "cuda":
        if not native:
            warn_fallback()
            return reference.vit_adapter_reference(x, A, a, R, rb, B, b, Dw, d, temperature, scale)
        assert c is not None
        c.cuda_vit_adapter(
            x.data_ptr(), y.data_ptr(), rows, dim, r, A.data_ptr(), a.data_ptr(), R.data_ptr(), rb.data_ptr(),
            B.data_ptr(), b.data_ptr(), Dw.data_ptr(), d.data_ptr(), float(temperature), float(scale),
            torch.cuda.current_stream(dev).cuda_stream,
        )  # fmt: skip
        return y
    name = resolve_backend(backend)
    if name == "torch":
        return reference.vit_adapter_reference(x, A, a, R, rb, B, b, Dw, d, temperature, scale)
    assert c is not None
    c.vit_adapter(
        name, x.data_ptr(), y.data_ptr(), rows, dim, r, A.data_ptr(), a.data_ptr(), R.data_ptr(), rb.data_ptr(),
        B.data_ptr(), b.data_ptr(), Dw.data_ptr(), d.data_ptr(), float(temperature), float(scale),
        torch.get_num_threads(),
    )  # fmt: skip
    return y
