"""GPTQ algorithm and the GPTQ packing, checked against first principles and an independent numpy reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavin_edge.kernels.gptq_format import dequantize_packed, pack_linear, unpack_linear
from lavin_edge.quantize.gptq import (
    HessianAccumulator,
    asymmetric_target,
    gptq_quantize,
    output_error,
    output_error_vs_fp,
    rtn_quantize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(n: int = 64, k: int = 256, rows: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated, unevenly scaled inputs (as real activations: a few loud channels)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(rows, k, generator=g) @ (torch.eye(k) + mix)
    x[:, torch.randperm(k, generator=g)[:8]] *= 8.0
    acc = HessianAccumulator(k)
    for chunk in x.split(300):  # several batches: the running mean must equal the one-shot formula
        acc.add_batch(chunk)
    assert torch.allclose(acc.H, 2 / rows * x.T @ x, rtol=1e-4, atol=1e-4)
    return w, acc.H


def reference_unpack(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray,
                     v1: bool) -> np.ndarray:
    """An independent reader written from the format description only (numpy, no shared code)."""
    k = qweight.shape[0] * 8
    qw = qweight.view(np.uint32)
    q = np.zeros((k, qw.shape[1]), dtype=np.int64)
    for j in range(8):
        q[j::8] = (qw >> np.uint32(4 * j)) & np.uint32(0xF)
    qz = qzeros.view(np.uint32)
    z = np.zeros((qz.shape[0], qz.shape[1] * 8), dtype=np.int64)
    for j in range(8):
        z[:, j::8] = (qz >> np.uint32(4 * j)) & np.uint32(0xF)
    if v1:
        z = z + 1
    s = scales.astype(np.float32)
    return ((q - z[g_idx]) * s[g_idx]).T  # [N, K]


@pytest.mark.parametrize("group_size,sym", [(32, True), (64, False), (128, True), (-1, True)])
def test_gptq_beats_rtn_and_packs(group_size: int, sym: bool) -> None:
    w, H = _layer()
    res = gptq_quantize(w, H, 4, group_size, sym)
    rtn = rtn_quantize(w, 4, group_size, sym)
    e_gptq, e_rtn = output_error(w, res.dequantize(), H), output_error(w, rtn.dequantize(), H)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert res.q.min() >= 0 and res.q.max() <= 15
    fmt = "gptq" if sym else "gptq_v2"
    t = pack_linear(res, 4, fmt)
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (256 // 8, 64)
    assert tuple(t["qzeros"].shape) == (t["scales"].shape[0], 64 // 8) and t["scales"].dtype == torch.float16
    if sym:  # v1 symmetric 4-bit stores zero - 1 = 7 in every nibble
        assert bool((t["qzeros"] == 0x77777777).all())
    back = unpack_linear(t, 4, fmt)
    assert torch.equal(back.q, res.q) and torch.equal(back.zeros, res.zeros)
    ours = dequantize_packed(t, 4, fmt)
    theirs = reference_unpack(t["qweight"].numpy(), t["qzeros"].numpy(), t["scales"].numpy(),
                              t["g_idx"].numpy().astype(np.int64), fmt == "gptq")
    assert np.allclose(ours.numpy(), theirs, atol=0, rtol=0)
    # fp16 scales move the served weight by at most |q - z| <= 8 steps of half an fp16 ulp (2^-11 relative).
    assert (ours - res.dequantize()).abs().max() <= 8 * 2**-11 * res.scales.abs().max()


def test_desc_act_orders_groups_by_activation() -> None:
    w, H = _layer(seed=1)
    res = gptq_quantize(w, H, 4, 32, True, desc_act=True)
    perm = torch.argsort(torch.diag(H), descending=True)
    # The 32 loudest inputs form group 0, whatever their positions.
    assert set(perm[:32].tolist()) == set((res.g_idx == 0).nonzero().flatten().tolist())
    assert not bool((res.g_idx[1:] >= res.g_idx[:-1]).all())  # non-monotonic
    e_act = output_error(w, res.dequantize(), H)
    e_rtn = output_error(w, rtn_quantize(w, 4, 32, True).dequantize(), H)
    assert e_act < e_rtn
    st = gptq_quantize(w, H, 4, 32, True, desc_act=True, static_groups=True)
    assert torch.equal(st.g_idx, torch.arange(256, dtype=torch.int32) // 32)
    t = pack_linear(res, 4, "gptq")
    theirs = reference_unpack(t["qweight"].numpy(), t["qzeros"].numpy(), t["scales"].numpy(),
                              t["g_idx"].numpy().astype(np.int64), True)
    assert np.array_equal(dequantize_packed(t).numpy(), theirs)


def test_gptq_equals_rtn_for_uncorrelated_inputs_and_handles_dead_inputs() -> None:
    w, H = _layer(seed=2)
    # With a diagonal Hessian no error can be compensated by other inputs: GPTQ reduces to RTN exactly.
    diag = torch.diag(torch.rand(256) + 0.5)
    for gs, sym in ((64, True), (32, False)):
        assert torch.equal(gptq_quantize(w, diag, 4, gs, sym).q, rtn_quantize(w, 4, gs, sym).q)
    H2 = H.clone()
    H2[5, :] = 0
    H2[:, 5] = 0
    res2 = gptq_quantize(w, H2, 4, 64, True)
    assert torch.isfinite(res2.scales).all()


@pytest.mark.parametrize("kwargs,match", [({"group_size": 48}, "unsupported group size"),
                                          ({"group_size": 128}, "not divisible")])
def test_bad_group_sizes(kwargs: dict, match: str) -> None:
    w = torch.randn(16, 576)
    with pytest.raises(ValueError, match=match):
        gptq_quantize(w, torch.eye(576), 4, **kwargs)


def test_cross_term_accumulates_like_the_direct_sum() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 16, generator=g)
    x_fp = x + 0.1 * torch.randn(2, 50, 16, generator=g)
    acc = HessianAccumulator(16, cross=True)
    for b in range(2):  # in two batches: the running rescale must give the same sums as one pass
        acc.add_batch(x[b], x_fp[b])
    X, Xf = x.reshape(-1, 16), x_fp.reshape(-1, 16)
    torch.testing.assert_close(acc.H, 2 / 100 * X.T @ X, rtol=1e-5, atol=1e-6)
    assert acc.C is not None
    torch.testing.assert_close(acc.C, 2 / 100 * (Xf - X).T @ X, rtol=1e-5, atol=1e-6)
    assert acc.F is not None
    torch.testing.assert_close(acc.F, 2 / 100 * Xf.T @ Xf, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="x_fp"):
        acc.add_batch(x[0])
    # The error against the fp output, from the sums alone, equals replaying the inputs.
    w = torch.randn(6, 16, generator=g)
    w_hat = w + 0.05 * torch.randn(6, 16, generator=g)
    direct = float(((X @ w_hat.T - Xf @ w.T) ** 2).mean())
    assert output_error_vs_fp(w, w_hat, acc.H, acc.C, acc.F) == pytest.approx(direct, rel=1e-4)
    assert output_error_vs_fp(w, w, acc.H, acc.C, acc.F) == pytest.approx(float(((X @ w.T - Xf @ w.T) ** 2).mean()),
                                                                          rel=1e-4)


def test_asymmetric_target_is_the_least_squares_weight_for_the_fp_output() -> None:
    """w' minimises sum ||w' x - w x_fp||^2 over the quantized-path inputs x; with x_fp == x it is w."""
    g = torch.Generator().manual_seed(4)
    n, k, m = 12, 24, 400
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).float()
    # Upstream error mostly systematic (a linear distortion the target can undo) plus some noise it cannot.
    x_fp = x @ (torch.eye(k) + 0.2 * torch.randn(k, k, generator=g)) + 0.05 * torch.randn(m, k, generator=g)
    acc = HessianAccumulator(k, cross=True)
    acc.add_batch(x, x_fp)
    assert acc.C is not None
    target = asymmetric_target(w, acc.H, acc.C, alpha=1.0, damp_percent=1e-9)
    lstsq = torch.linalg.lstsq(x.double(), (x_fp.double() @ w.double().T)).solution.T.float()
    torch.testing.assert_close(target, lstsq, rtol=1e-3, atol=1e-3)
    # The fp outputs are matched better than by w itself, which ignores the upstream error.
    def err(v: torch.Tensor) -> float:
        return float(((x @ v.T - x_fp @ w.T) ** 2).sum())
    assert err(target) < 0.5 * err(w)
    half = asymmetric_target(w, acc.H, acc.C, alpha=0.5, damp_percent=1e-9)
    torch.testing.assert_close(half, w + 0.5 * (target - w), rtol=1e-4, atol=1e-4)
    same = HessianAccumulator(k, cross=True)
    same.add_batch(x, x)
    assert same.C is not None
    torch.testing.assert_close(asymmetric_target(w, same.H, same.C), w)
