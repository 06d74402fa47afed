"""The standard GPTQ checkpoint layout for one Linear (W [N, K]: N outputs, K inputs), 4-bit:

- ``qweight`` int32 [K/8, N]: bits 4j..4j+3 of ``qweight[r, n]`` hold input row 8r+j (least significant first);
- ``qzeros`` int32 [G, N/8]: bits 4j..4j+3 of ``qzeros[g, c]`` hold output column 8c+j's zero point;
- ``scales`` fp16 [G, N]; ``g_idx`` int32 [K] (group of each input row; non-monotonic with act-order).

``checkpoint_format="gptq"`` (v1) stores zero - 1, the historical convention every GPTQ reader expects
(symmetric 4-bit: 0x77777777); ``"gptq_v2"`` stores the zero itself. v1 cannot store an asymmetric zero of 0
(it would be -1), so asymmetric models are written as v2 (see ``docs/quantization.md``).
Dequantize: ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.
"""

from __future__ import annotations

import torch

from lavin_edge.quantize.gptq import QuantResult

FORMATS = ("gptq", "gptq_v2")


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits (two's complement wrap)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Ints [K, N] in 0..2^bits-1 -> int32 [K*bits/32, N], packed along K (dim 0)."""
    per = 32 // bits
    k, n = q.shape
    if k % per:
        raise ValueError(f"{k} rows cannot be packed {per} per int32")
    q = q.to(torch.int64).view(k // per, per, n)
    out = torch.zeros(k // per, n, dtype=torch.int64)
    for j in range(per):
        out |= q[:, j] << (bits * j)
    return _to_int32(out)


def unpack_rows(p: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 [K/8, N] -> int32 [K, N]."""
    per = 32 // bits
    p = p.to(torch.int64) & 0xFFFFFFFF
    parts = [(p >> (bits * j)) & (2**bits - 1) for j in range(per)]
    return torch.stack(parts, 1).reshape(-1, p.shape[1]).to(torch.int32)


def pack_cols(z: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Ints [G, N] -> int32 [G, N*bits/32], packed along N (dim 1)."""
    return pack_rows(z.T, bits).T.contiguous()


def unpack_cols(p: torch.Tensor, bits: int = 4) -> torch.Tensor:
    return unpack_rows(p.T, bits).T.contiguous()


def pack_linear(r: QuantResult, bits: int = 4, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """A quantized Linear as the four standard tensors (see the module docstring)."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; choose from {FORMATS}")
    zeros = r.zeros.round().to(torch.int64)
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise ValueError("a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1): use gptq_v2")
        zeros = zeros - 1
    return {
        "qweight": pack_rows(r.q.T.contiguous(), bits),
        "qzeros": pack_cols(zeros, bits),
        "scales": r.scales.to(torch.float16).contiguous(),
        "g_idx": r.g_idx.to(torch.int32).contiguous(),
    }


def unpack_linear(t: dict[str, torch.Tensor], bits: int = 4, checkpoint_format: str = "gptq") -> QuantResult:
    """The four tensors back to ints q [N, K], fp32 scales/zeros [G, N] and g_idx."""
    zeros = unpack_cols(t["qzeros"], bits).to(torch.int64)
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & (2**bits - 1)
    return QuantResult(unpack_rows(t["qweight"], bits).T.contiguous(), t["scales"].float(), zeros.float(),
                       t["g_idx"].to(torch.int32))


def dequantize_packed(t: dict[str, torch.Tensor], bits: int = 4, checkpoint_format: str = "gptq") -> torch.Tensor:
    """W [N, K] in fp32 from the packed tensors (fp16 scales, as served)."""
    return unpack_linear(t, bits, checkpoint_format).dequantize()
