"""GPTQ (Frantar et al., 2022) in plain PyTorch, plus round-to-nearest (RTN) on the same grid.

Why our own: gptqmodel (the maintained library) installs here only as a pure-Python sdist pinned to an
older numpy and needs CPU worker pools and on-the-fly C++ builds; it quantizes Hugging Face module trees,
not our Meta-named LLaMA with folded adapters. Its maths is small, so we keep a readable copy that follows
the reference algorithm step for step (same quantizer, same damping, same block/group bookkeeping) and test
it against the library on the same layer and inputs (``tests/test_gptq_vs_gptqmodel.py``). See
``docs/quantization.md`` for the evidence.

Conventions: a Linear weight is ``W [N, K]`` (N outputs, K inputs); the Hessian is over the K inputs,
``H = 2/n sum_x x x^T``, in fp32, or in fp64 when given fp64 (``compute_dtype``: the pipeline calibrates and
quantizes in fp64 so that its result does not depend on the CPU, docs/reproducibility.md).
Integers ``q`` lie in ``0 .. 2^bits - 1`` and dequantize as
``scale * (q - zero)``; groups run along K; ``g_idx[k]`` is the group of input column k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lavin_edge.kernels import gptq_format

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantResult(gptq_format.UnpackedLinear):
    """One quantized Linear: ints ``q [N, K]`` (int32), ``scales``/``zeros [G, N]`` (fp32, zeros integral),
    ``g_idx [K]`` (int32), plus ``damp`` (the damping fraction that made H invertible) and ``loss`` (GPTQ's
    sum of (w - q)^2 / d^2 / 2 over the weight, the reference's ``avg_loss`` numerator)."""

    damp: float = 0.0
    loss: float = 0.0


def check_group_size(k: int, group_size: int) -> None:
    """Raise a ValueError for an unsupported group size or an input width not divisible by it."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"unsupported group size {group_size}; choose from {list(SUPPORTED_GROUP_SIZES)}")
    if group_size != -1 and k % group_size:
        raise ValueError(f"input width {k} is not divisible by group size {group_size}")


def grid_params(w: torch.Tensor, bits: int, sym: bool, mse: float = 0.0, grid: int = 100,
                maxshrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid of ``w [N, g]`` -> (scale [N], zero [N]), exactly as the reference quantizer.

    The range always includes 0; symmetric grids centre the zero at 2^(bits-1); an all-zero row gets
    the range [-1, 1] so its scale is never 0. With ``mse > 0`` (the reference's clipping search, norm 2.4 in
    the GPTQ paper's code) the range is shrunk by p = 1, 0.99, ... down to 1 - maxshrink per row, keeping the p
    with the smallest sum |q(w) - w|^mse: clipping a few outliers buys finer steps for all other weights."""
    maxq = 2**bits - 1
    scale, zero = gptq_format.grid(w, sym, maxq)
    if mse > 0:
        xmin, xmax = gptq_format.grid_range(w, sym)
        # All shrink factors at once ([P, N, g]); ties keep the larger range, as the reference's strict "<".
        p = 1 - torch.arange(int(maxshrink * grid), dtype=w.dtype, device=w.device)[:, None] / grid
        s1 = (p * xmax - p * xmin) / maxq
        z1 = zero.expand_as(s1) if sym else torch.round(-p * xmin / s1)
        q = torch.clamp(torch.round(w / s1[..., None]) + z1[..., None], 0, maxq)
        err = ((s1[..., None] * (q - z1[..., None]) - w).abs() ** mse).sum(-1)  # [P, N]
        best = err.argmin(0)
        rows = torch.arange(w.shape[0], device=w.device)
        scale, zero = s1[best, rows], z1[best, rows]
    return scale, zero


# Quotients this close to k + 1/2 are rounded as the tie itself (half to even). A group's extreme sits on a tie
# by construction (max|w| / (2 max|w| / maxq) = maxq / 2 up to its last bit), and which side that last bit falls
# on must not pick the code: the CPU's kernels can move it (docs/reproducibility.md). Below fp32 resolution, so
# only fp64 inputs are affected, and only their ties.
TIE_SNAP = 2.0**-30


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid (same shape as ``w``), clamped to 0 .. 2^bits - 1."""
    r = w / scale
    half = torch.floor(r) + 0.5
    r = torch.where((r - half).abs() < TIE_SNAP, half, r)
    return torch.clamp(torch.round(r) + zero, 0, 2**bits - 1)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any of ``tensors`` is fp64, else fp32: the precision GPTQ works in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _validate(w: torch.Tensor, bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits {bits}; choose from {list(SUPPORTED_BITS)}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    check_group_size(w.shape[1], group_size)


def rtn_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                 mse: float = 0.0) -> QuantResult:
    """Round-to-nearest on GPTQ's grid (the baseline GPTQ must beat): ``gptq_format.rtn`` with this module's
    grid, so any supported bit width and the same MSE clipping as GPTQ."""
    _validate(w, bits, group_size)
    r = gptq_format.rtn(w, group_size, sym, maxq=2**bits - 1,
                        grid_fn=lambda g: grid_params(g, bits, sym, mse))
    return QuantResult(r.q, r.scales, r.zeros, r.g_idx)


class HessianAccumulator:
    """Running ``H = 2/n sum x x^T`` over the rows of the inputs a Linear sees ([K, K], ``dtype``: fp32 or fp64).

    With ``cross``, also ``C = 2/n sum (x_fp - x) x^T``: how the inputs of the full-precision model (x_fp)
    differ from those of the partly quantized one (x), for ``asymmetric_target``; and ``F = 2/n sum x_fp x_fp^T``
    for ``output_error_vs_fp``."""

    def __init__(self, k: int, device: torch.device | str = "cpu", cross: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        self.H = torch.zeros(k, k, device=device, dtype=dtype)
        self.C = torch.zeros(k, k, device=device, dtype=dtype) if cross else None
        # F feeds only the report's error figure, never a rounding: fp32 (a third of the fp64 work saved).
        self.F = torch.zeros(k, k, device=device) if cross else None
        self.n = 0

    def add_batch(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        m = x.shape[0]
        if m == 0:
            return
        if (self.C is None) != (x_fp is None):
            raise ValueError("x_fp must be given exactly when the accumulator was made with cross=True")
        # Rescale the running mean so H stays 2/n sum x x^T with n the total count (the reference's update).
        self.H.mul_(self.n / (self.n + m))
        if self.C is not None and self.F is not None:
            self.C.mul_(self.n / (self.n + m))
            self.F.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)
        if self.C is not None and self.F is not None and x_fp is not None:
            xf = x_fp.reshape(-1, x_fp.shape[-1]).to(self.H.dtype) * (2.0 / self.n) ** 0.5
            self.C.addmm_((xf - x).T, x)
            xf32 = xf.float()
            self.F.addmm_(xf32.T, xf32)


def asymmetric_target(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, alpha: float = 1.0,
                      damp_percent: float = 0.05) -> torch.Tensor:
    """The weight GPTQ should aim for when its inputs ``x`` (Hessian ``H``) come from already-quantized layers
    but the output to match is the full-precision model's ``w x_fp`` (``C = 2/n sum (x_fp - x) x^T``).

    ``sum ||q x - w x_fp||^2`` equals ``sum ||(q - w') x||^2`` plus a constant, with the least-squares
    ``w' = w x_fp x^T (x x^T)^-1 = w + w C H^-1``; so GPTQ on ``w'`` with ``H`` minimises the output error
    against the fp model and undoes the error of the layers upstream (the "asymmetric calibration" of
    GPTQv2 / GPTAQ, Li et al. 2025, here as a change of target before a standard GPTQ run). ``alpha``
    shrinks the correction toward ``w`` (1: the full least-squares step); H is damped as GPTQ damps it."""
    dt = compute_dtype(w, H)
    w = w.to(dt)
    Hd = H.to(dt).clone()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1
    Hd.diagonal().add_(damp_percent * torch.mean(torch.diag(Hd)))
    corr = torch.linalg.solve(Hd, C.to(dt).T).T  # C H^-1 (H symmetric)
    corr[:, dead] = 0
    return w + alpha * (w @ corr)


def _inverse_factor(H: torch.Tensor, damp_percent: float, damp_increment: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, raising damp until it exists.

    Dampening keeps the inverse well conditioned; the reference starts at ``damp_percent`` and adds
    ``damp_increment`` until the factorisation succeeds."""
    mean = torch.mean(torch.diag(H))
    damp = damp_percent
    while damp < 1.0:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            try:
                return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), damp
            except torch.linalg.LinAlgError:
                pass
        if damp_increment <= 0:
            break
        damp += damp_increment
    raise ValueError(f"Hessian is not positive definite even with damping {damp:.3f}; more calibration data?")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                  desc_act: bool = False, static_groups: bool = False, damp_percent: float = 0.05,
                  damp_increment: float = 0.01, block_size: int = 128, mse: float = 0.0) -> QuantResult:
    """Quantize ``w [N, K]`` given the input Hessian ``H [K, K]``: columns one at a time, each rounding error
    spread over the not-yet-quantized columns through the inverse Hessian's Cholesky factor, block-wise
    (lazy batch updates) for speed.

    ``desc_act`` quantizes columns in order of decreasing diag(H) (largest activations first); its groups
    are then formed along that order, so ``g_idx`` is non-monotonic unless ``static_groups`` fixes the
    grids on the original column order before any update (then ``g_idx[k] = k // group_size``)."""
    _validate(w, bits, group_size)
    if H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight inputs {w.shape[1]}")
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")
    dt = compute_dtype(w, H)  # fp64 in: every step in fp64, the codes and grids rounded once at the end
    W = w.detach().clone().to(dt)
    H = H.detach().clone().to(dt)
    n, k = W.shape
    gs = group_size
    # Inputs that never fire carry no information: pin them so H stays invertible, zero their weights.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static: list[tuple[torch.Tensor, torch.Tensor]] = []
    if static_groups and gs != -1:
        static = [grid_params(W[:, s:s + gs], bits, sym, mse) for s in range(0, k, gs)]

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv, damp = _inverse_factor(H, damp_percent, damp_increment)
    del H

    Q = torch.zeros_like(W)
    losses = torch.zeros_like(W)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale, zero = grid_params(W, bits, sym, mse)  # per-channel grid when group_size == -1
    if gs == -1:
        scales, zeros = [scale], [zero]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if gs != -1:
                if static:
                    orig = int(perm[col]) if perm is not None else col
                    scale, zero = static[orig // gs]
                elif col % gs == 0:
                    # As the reference: the grid comes from W, which holds the updates of earlier blocks
                    # but not yet this block's; identical when group and block boundaries align.
                    scale, zero = grid_params(W[:, col:col + gs], bits, sym, mse)
                    scales.append(scale)
                    zeros.append(zero)
            wc = W1[:, i]
            d = Hinv1[i, i]
            qc = quantize_column(wc, scale, zero, bits)
            deq = scale * (qc - zero)
            Q[:, col] = qc
            err = (wc - deq) / d
            losses[:, col] = (wc - deq) ** 2 / d**2 / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static:
        scales = [s for s, _ in static]
        zeros = [z for _, z in static]
    gsz = k if gs == -1 else gs
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if static:
            g_idx = torch.arange(k) // gsz
        else:
            # Column k was quantized at position inv[k] of the act-order walk, in that position's group.
            g_idx = inv // gsz
    else:
        g_idx = torch.arange(k) // gsz
    return QuantResult(Q.to(torch.int32), torch.stack(scales), torch.stack(zeros), g_idx.to(torch.int32),
                       damp=damp, loss=float(losses.sum()))


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error ``mean over inputs x and outputs n of ((W - W_hat) x)_n^2`` on the inputs
    that built ``H = 2/n sum x x^T`` -- exact, without replaying the inputs."""
    dw = w.float() - w_hat.float()  # a report figure, not an input to any rounding: fp32 is enough
    H = H.float()
    return float(((dw @ H) * dw).sum() / 2 / w.shape[0])


def output_error_vs_fp(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor, C: torch.Tensor,
                       F: torch.Tensor) -> float:
    """Mean squared error of ``w_hat x`` (partly quantized model's inputs) against the fp model's ``w x_fp``,
    from the accumulator's H, C, F: 2/n sum ||a x - w x_fp||^2 = tr(a H a^T) - 2 tr(a M w^T) + tr(w F w^T)
    with M = 2/n sum x x_fp^T = H + C^T."""
    a, w, H, C, F = (t.float() for t in (w_hat, w, H, C, F))  # a report figure: fp32 is enough
    total = ((a @ H) * a).sum() - 2 * ((a @ (H + C.T)) * w).sum() + ((w @ F) * w).sum()
    return float(total.clamp_min(0) / 2 / w.shape[0])
