"""What a linear and a norm ARE at run time: callables over fp32 rows, built once at load by a backend.

``LinearOp``: y = x W^T for x [T, K] fp32 (unit column stride). ``DenseLinear`` holds W in fp32;
``W4Linear`` holds a prepared 4-bit GPTQ linear (``lavin_edge.kernels.PreparedW4``) and runs the
extension's kernel; ``ConcatLinear`` stacks linears along the outputs (q|k|v with different act-order
permutations), ``SumLinear`` adds them (a weight stored as a 4-bit value plus a 4-bit residual).
``NormAdapter``: RMSNorm(x) * g followed by the folded routed adapter of one modality,
n + U_m (A n + a) + u_m, or a bare RMSNorm; through the fused kernel or in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lavin_edge.kernels import PreparedNormAdapter, PreparedW4, prepare_norm_adapter, prepare_w4
from lavin_edge.kernels.dispatch import gemv_threads
from lavin_edge.kernels.gptq_format import GPTQTensors


class LinearOp:
    """y = x W^T for x [T, K] fp32. ``nbytes`` counts the weight bytes one call reads."""

    n_out: int
    n_in: int
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class DenseLinear(LinearOp):
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.float().contiguous()
        self.n_out, self.n_in = self.weight.shape
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class W4Linear(LinearOp):
    """A GPTQ linear on the extension's W4 kernel, prepared once (``prepared.native`` is the descriptor the
    one-call decode step takes too). The checked ``PreparedW4.matmul`` validates every call, which costs
    more than a small GEMV; inputs here come from the runtime only (fp32 [T, K] rows), so the call goes
    through the unchecked ``gemm_rows``. Layouts the tiled kernel does not take fall back to ``matmul``."""

    def __init__(self, t: GPTQTensors, isa: str) -> None:
        self.n_out, self.n_in = t.shape
        self.prepared: PreparedW4 = prepare_w4(t)
        self.nbytes = int(self.prepared.nbytes)
        self.isa = isa
        # None: not on the tiled kernel (a dense fallback layout, or the torch kernels forced by $LAVIN_EDGE_KERNELS).
        self.native = self.prepared.native if isa != "torch" else None
        self.threads_gemv = gemv_threads(self.n_out, self.n_in, torch.get_num_threads())
        self.threads_gemm = torch.get_num_threads()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return self.prepared.matmul(x)
        if x.stride(-1) != 1:
            x = x.contiguous()
        # Row stride passed through: a column slice (the SwiGLU half of gate|up) needs no copy.
        return self.prepared.gemm_rows(x, self.isa, self.threads_gemv if x.shape[0] == 1 else self.threads_gemm)


class SumLinear(LinearOp):
    """y = sum of the parts' outputs (a weight stored as a 4-bit value plus a 4-bit residual)."""

    def __init__(self, ops: list[LinearOp]) -> None:
        self.ops = ops
        self.n_in, self.n_out = ops[0].n_in, ops[0].n_out
        self.nbytes = sum(o.nbytes for o in ops)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops[0](x)
        for o in self.ops[1:]:
            y += o(x)
        return y


class RescoredHead(LinearOp):
    """An approximate head (the 4-bit value + residual passes) whose ``top`` largest logits per row are then
    recomputed exactly from the fp weight rows ``weight`` [V, D] (any float dtype, read as fp32).

    The two W4 passes hold the weights to about 8 bits: enough for most logits, not for the near-ties that
    decide the next token. Re-scoring the top few from the fp rows reads ``top`` x D weights instead of V x D;
    docs/benchmarks/accuracy.md has what it buys. Logits outside the top keep the W4 error."""

    def __init__(self, approx: LinearOp, weight: torch.Tensor, top: int) -> None:
        self.approx, self.weight, self.top = approx, weight, top
        self.n_in, self.n_out = approx.n_in, approx.n_out
        self.nbytes = approx.nbytes + top * self.n_in * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.approx(x)
        idx = y.topk(min(self.top, self.n_out), dim=-1).indices  # [T, top]
        rows = self.weight[idx].double()  # [T, top, D]
        # In fp64 each exact product is summed with error far below fp32's rounding, so a row's re-scored logits
        # do not depend on how many rows the call holds (a batch decodes each request as it would alone).
        y.scatter_(-1, idx, torch.bmm(rows, x.double()[:, :, None])[:, :, 0].float())
        return y


class ConcatLinear(LinearOp):
    """Linears sharing the input, outputs side by side (when they cannot share one weight: different act-order
    permutations, or mixed fp and 4-bit parts)."""

    def __init__(self, ops: list[LinearOp]) -> None:
        self.ops = ops
        self.n_in = ops[0].n_in
        self.n_out = sum(o.n_out for o in ops)
        self.nbytes = sum(o.nbytes for o in ops)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([o(x) for o in self.ops], -1)


class NormAdapter:
    """RMSNorm(x) * g followed by the folded routed adapter of one modality: n + U_m (A n + a) + u_m
    (``U`` [2, D, r], ``u`` [2, D]). ``isa`` set: one fused kernel call per use, with ``row_modality`` the
    runtime's int32 buffer of per-row modality; None: plain PyTorch (the reference). ``plain``: a bare
    RMSNorm (a zero rank-1 adapter for the kernel, exactly n)."""

    def __init__(self, g: torch.Tensor, A: torch.Tensor, a: torch.Tensor, U: torch.Tensor, u: torch.Tensor,
                 eps: float, isa: str | None, plain: bool = False) -> None:
        self.prepared: PreparedNormAdapter = prepare_norm_adapter(g, A, a, U, u, eps)
        self.eps = self.prepared.eps
        self.plain = plain
        self.isa = isa if self.prepared.native is not None else None
        self.threads = torch.get_num_threads()

    @classmethod
    def rmsnorm(cls, g: torch.Tensor, eps: float, isa: str | None) -> NormAdapter:
        """RMSNorm alone. On the kernel it runs with a zero adapter: one C call, about half the time of
        F.rms_norm's several dispatched ops at D = 576, and exact."""
        d = g.shape[0]
        return cls(g, torch.zeros(1, d), torch.zeros(1), torch.zeros(2, d, 1), torch.zeros(2, d), eps, isa,
                   plain=True)

    @property
    def rank(self) -> int:
        return self.prepared.rank

    def __call__(self, x: torch.Tensor, modality: int, row_modality: torch.Tensor) -> torch.Tensor:
        if self.isa is not None:
            return self.prepared.apply_rows(x, row_modality, self.isa, 1 if x.shape[0] == 1 else self.threads)
        if self.plain:
            return F.rms_norm(x, (x.shape[-1],), self.prepared.g, self.eps)
        return self.prepared.reference(x, modality)
