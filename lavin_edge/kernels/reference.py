"""Pure-PyTorch references of the native kernels (the fallback backend and the test oracles).

Everything here is written for clarity, in fp32 (or float64 where noted), on whatever device
the inputs are on.
"""

from __future__ import annotations

import os

import torch

from .gptq_format import GPTQTensors

ACT_BLOCK = 32  # rows per activation block (one fp32 scale each) in the native CPU W4 kernels
# Activation formats of the CPU W4 kernels (csrc/kernels.h): the largest integer of a block.
ACT_FORMATS = {"int16": 127 * 256 + 127, "int8": 127}
ACT_ENV = "LAVIN_EDGE_W4_ACT"
# The CLI's ``--activations`` values (lavin_edge/commands/options.py) -> the values of $LAVIN_EDGE_W4_ACT.
ACT_OPTION_VALUES = {"15bit": "int16", "int8": "int8"}


def act_format() -> str:
    """The CPU W4 kernels' activation format, as the extension reads it: $LAVIN_EDGE_W4_ACT, "int16" (the
    default: 15-bit integers, kept as two int8 planes) or "int8" (llama.cpp's Q8_0-style blocks)."""
    v = os.environ.get(ACT_ENV, "").strip()
    if not v:
        return "int16"
    if v not in ACT_FORMATS:
        raise ValueError(f"{ACT_ENV}={v!r}: expected one of {', '.join(ACT_FORMATS)}")
    return v


def w4_matmul_reference(x: torch.Tensor, t: GPTQTensors) -> torch.Tensor:
    """``x @ W^T`` in float64 (the oracle), returned as fp32. x: [..., K]."""
    return (x.double() @ t.dequantize().double().t()).float()


def quantize_activations_reference(x: torch.Tensor, perm: torch.Tensor | None = None,
                                   fmt: str | None = None) -> torch.Tensor:
    """What the native CPU W4 kernels see of x: each 32-row block round-tripped through integers.

    Rows are gathered by ``perm`` (act-order), zero-padded to a multiple of 32, quantized per block to
    ``round(x * qmax/amax)`` (round half to even, like the C++ side; qmax 32639 for "int16", 127 for "int8",
    ``fmt`` None: :func:`act_format`) and dequantized with ``amax/qmax``; the result is scattered back to the
    original row order. The kernels' int16 values are split into two int8 planes whose integer sums are
    recombined exactly, so this is their input to the last bit. Comparing a kernel with
    ``dequantized x @ W^T`` isolates kernel bugs from the (intended) activation rounding.
    """
    qmax = torch.tensor(float(ACT_FORMATS[fmt or act_format()]))
    m, k = x.shape
    xp = x.float()[:, perm.long()] if perm is not None else x.float()
    kp = -(-k // ACT_BLOCK) * ACT_BLOCK
    xp = torch.nn.functional.pad(xp, (0, kp - k)).reshape(m, kp // ACT_BLOCK, ACT_BLOCK)
    amax = xp.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    d = amax / qmax
    xq = torch.clamp(torch.round(xp * inv), -qmax, qmax) * d
    xq = xq.reshape(m, kp)[:, :k]
    if perm is not None:
        out = torch.empty_like(xq)
        out[:, perm.long()] = xq
        return out
    return xq


def llm_adapter_reference(
    x: torch.Tensor,
    g: torch.Tensor,
    A: torch.Tensor,
    a: torch.Tensor,
    U: torch.Tensor,
    u: torch.Tensor,
    modality: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Fused RMSNorm + folded routed adapter (LLM side), fp32 math.

    x [B, T, D]; g [D]; A [r, D]; a [r]; U [2, D, r]; u [2, D]; modality [B] (0 text, 1 image).
    n = rmsnorm(x) * g;  y = n + U_m (A n + a) + u_m  with m = modality of the sequence.
    """
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * g.float()
    z = n @ A.float().t() + a.float()  # [B, T, r]
    mod = modality.long()
    Um = U.float()[mod]  # [B, D, r]
    up = torch.einsum("btr,bdr->btd", z, Um) + u.float()[mod].unsqueeze(1)
    return (n + up).to(x.dtype)


def vit_adapter_reference(
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
) -> torch.Tensor:
    """Per-token routed adapter (ViT side), fp32 math. x [..., D].

    z = A x + a;  w_t = softmax((R x_t + rb) / t);
    y = x + s (w0 (B z + b) + w1 (Dw z + d)), where B, Dw [D, r/2] are grouped projections:
    output half k reads hidden channels (r/2)k .. (r/2)k + r/2 - 1.
    """
    xf = x.float()
    dim = xf.shape[-1]
    r = A.shape[0]
    h = r // 2
    z = xf @ A.float().t() + a.float()  # [..., r]
    w = torch.softmax((xf @ R.float().t() + rb.float()) / temperature, dim=-1)  # [..., 2]

    def grouped(W: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        lo = z[..., :h] @ W.float()[: dim // 2].t()
        hi = z[..., h:] @ W.float()[dim // 2 :].t()
        return torch.cat([lo, hi], dim=-1) + bias.float()

    y = xf + scale * (w[..., :1] * grouped(B, b) + w[..., 1:] * grouped(Dw, d))
    return y.to(x.dtype)
