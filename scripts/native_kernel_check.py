"""The native kernels of every backend this CPU runs, held to the scalar backend with NumPy and the extension
alone: no PyTorch, so it runs where only NumPy is (under qemu-aarch64 in scripts/arm_check.sh, where the arm64
sysroot has Debian's NumPy and no PyTorch wheel). Why not the pytest files: they build their cases with PyTorch.

What it checks (the same holds the x86 tests in tests/test_kernels.py and tests/test_fused_decode.py keep):
- the W4 GEMM (both activation formats, m = 1, 2, 3, 5, act-order and not, tail tiles) bitwise equal to the
  scalar backend (integer sums are exact, the float steps run in one order), which includes each backend's
  activation quantizer; the scalar one within 1e-3 (15-bit) / 2e-2 (int8) relative of a float64 product;
- the fused norm + adapter and the ViT adapter within 2e-5 of the scalar (double-accumulating) ones;
- the whole decode step (attention over an fp16 cache, head sizes 64 and 24) within 1e-4 of max|out| of the
  scalar backend: the summation order of the attention differs between vector widths;
- with --save: every result written to an .npz; with --against (an .npz --save wrote on another machine, e.g.
  x86-64): the scalar backend's W4 results bitwise equal to it, the rest within the tolerances above;
- with --expect: exactly these backends usable on this CPU (a kernel the CPU lacks is never offered; qemu's CPU
  models raise SIGILL if one ran anyway, which kills this process).
Exit status 0 when everything holds, 1 with one line per failure otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from lavin_edge.kernels import tiling
from lavin_edge.kernels.dispatch import extension

W4_CASES = [(100, 640, 128, True), (31, 200, 200, False), (72, 1056, 32, True), (256, 512, 64, False)]
EPS = 1e-6


class Check:
    """Collects failures and results (the results go to --save, and are compared with --against)."""

    def __init__(self, against: dict[str, np.ndarray] | None) -> None:
        self.failures: list[str] = []
        self.results: dict[str, np.ndarray] = {}
        self.against = against
        self.count = 0

    def expect(self, ok: bool, what: str) -> None:
        self.count += 1
        if not ok:
            self.failures.append(what)

    def close(self, got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
        err = float(np.abs(got.astype(np.float64) - want).max()) / max(float(np.abs(want).max()), 1e-30)
        self.expect(bool(np.isfinite(got).all()) and err <= tol, f"{what}: relative error {err:.3g} > {tol:g}")

    def record(self, key: str, value: np.ndarray, tol: float | None) -> None:
        """Keep ``value`` under ``key``; against another machine's run: bitwise (tol None) or within tol."""
        self.results[key] = value
        if self.against is None:
            return
        if key not in self.against:
            self.expect(False, f"{key}: missing from the reference run")
        elif tol is None:
            self.expect(np.array_equal(value, self.against[key]), f"{key}: not bitwise the reference run's")
        else:
            self.close(value, self.against[key], tol, f"{key} vs the reference run")


def random_w4(ext: Any, rng: np.random.Generator, n: int, k: int, gs: int, act_order: bool
              ) -> tuple[Any, list[Any], np.ndarray]:
    """A random GPTQ linear tiled as the engines tile it: (descriptor, arrays it points into, W^T float64 [k, n])."""
    groups = k // gs
    qweight = rng.integers(0, 2**32, size=(k // 8, n), dtype=np.uint64).astype(np.uint32).view(np.int32)
    qzeros = rng.integers(0, 2**32, size=(groups, (n + 7) // 8), dtype=np.uint64).astype(np.uint32).view(np.int32)
    scales = (rng.random((groups, n)) * 0.02 + 0.001).astype(np.float16)
    g_idx = rng.permutation(np.arange(k) // gs).astype(np.int32) if act_order else np.arange(k) // gs
    _, perm = tiling.act_order(g_idx if act_order else None, groups, gs)
    np_, _ = tiling.padded_sizes(n, k)
    zeros = tiling.zero_points(qzeros, n, "gptq")
    st, zt = tiling.tile_params(scales, zeros, np_)
    qw = tiling.repack(ext, qweight, n, k, perm, 1)
    q = (qweight.view(np.uint32)[:, None, :] >> (4 * np.arange(8, dtype=np.uint32))[None, :, None]) & 0xF
    q = q.reshape(k, n).astype(np.float64)
    w = (q - zeros[g_idx].astype(np.float64)) * scales[g_idx].astype(np.float64)
    return tiling.descriptor(ext, qw, st, zt, perm, n, k, groups), [qw, st, zt, perm], w


def check_w4(ext: Any, backends: list[str], c: Check) -> None:
    rng = np.random.default_rng(7)
    for n, k, gs, act_order in W4_CASES:
        desc, keep, w = random_w4(ext, rng, n, k, gs, act_order)
        for fmt, tol in (("int16", 1e-3), ("int8", 2e-2)):
            os.environ["LAVIN_EDGE_W4_ACT"] = fmt
            for m in (1, 2, 3, 5):
                x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
                x[:, ::29] *= 400.0  # massive channels, a zero block, ties
                x[0, :32] = 0.0
                x[-1, 32:64] = np.round(x[-1, 32:64] * 2) / 2
                outs = {}
                for b in backends:
                    y = np.full((m, n), np.nan, dtype=np.float32)
                    ext.w4_gemm(b, desc, x.ctypes.data, m, k, y.ctypes.data, n, 2)
                    outs[b] = y
                name = f"w4 n={n} k={k} act_order={act_order} {fmt} m={m}"
                c.close(outs["scalar"], x.astype(np.float64) @ w, tol, f"{name} scalar vs float64")
                c.record(f"w4_{n}_{k}_{act_order}_{fmt}_{m}", outs["scalar"], None)
                for b in backends:
                    c.expect(np.array_equal(outs[b], outs["scalar"]), f"{name}: {b} not bitwise scalar")
        del keep
    os.environ.pop("LAVIN_EDGE_W4_ACT", None)


def norm_adapter(ext: Any, rng: np.random.Generator, dim: int, r: int) -> tuple[Any, list[np.ndarray]]:
    arrs = [rng.standard_normal(dim), rng.standard_normal((r, dim)) / dim**0.5, rng.standard_normal(r) * 0.1,
            rng.standard_normal((2, dim, r)) * 0.1, rng.standard_normal((2, dim)) * 0.1]
    g, A, a, U, u = (np.ascontiguousarray(t, dtype=np.float32) for t in arrs)
    return ext.NormAdapterWeights(g.ctypes.data, A.ctypes.data, a.ctypes.data, U.ctypes.data, u.ctypes.data, dim,
                                  r, EPS), [g, A, a, U, u]


def check_adapters(ext: Any, backends: list[str], c: Check) -> None:
    rng = np.random.default_rng(11)
    for rows, dim, r in ((1, 4096, 8), (15, 96, 8), (8, 77, 8), (6, 130, 6), (7, 64, 1)):
        desc, keep = norm_adapter(ext, rng, dim, r)
        x = (rng.standard_normal((rows, dim)) * 3).astype(np.float32)
        mod = (np.arange(rows) % 2).astype(np.int32)
        outs = {}
        for b in backends:
            y = np.empty_like(x)
            ext.llm_adapter(b, desc, x.ctypes.data, y.ctypes.data, rows, mod.ctypes.data, 2)
            outs[b] = y
        c.record(f"llm_{rows}_{dim}_{r}", outs["scalar"], 1e-6)
        for b in backends:
            c.close(outs[b], outs["scalar"], 2e-5, f"llm_adapter {b} rows={rows} dim={dim} r={r}")
        del keep
    for rows, dim, r in ((1, 1024, 8), (10, 96, 8), (33, 130, 6), (3, 2, 2), (4, 64, 16)):
        p = [rng.standard_normal((r, dim)) / dim**0.5, rng.standard_normal(r) * 0.1,
             rng.standard_normal((2, dim)) / dim**0.5, rng.standard_normal(2), rng.standard_normal((dim, r // 2)) * 0.1,
             rng.standard_normal(dim) * 0.1, rng.standard_normal((dim, r // 2)) * 0.1, rng.standard_normal(dim) * 0.1]
        p = [np.ascontiguousarray(t, dtype=np.float32) for t in p]
        x = (rng.standard_normal((rows, dim)) * 3).astype(np.float32)
        outs = {}
        for b in backends:
            y = np.empty_like(x)
            ext.vit_adapter(b, x.ctypes.data, y.ctypes.data, rows, dim, r, *(t.ctypes.data for t in p), 5.0, 0.7, 2)
            outs[b] = y
        c.record(f"vit_{rows}_{dim}_{r}", outs["scalar"], 1e-6)
        for b in backends:
            c.close(outs[b], outs["scalar"], 2e-5, f"vit_adapter {b} rows={rows} dim={dim} r={r}")


def decode_run(ext: Any, isa: str, hd: int, seed: int) -> np.ndarray:
    """A 2-layer random decoder (4 heads over 2 kv heads of size hd, GQA): a 37-token prefill, then 5 steps;
    the final-normed states of each call stacked [6, dim]."""
    rng = np.random.default_rng(seed)
    dim, nh, nkv, ffn, ctx = 96, 4, 2, 160, 48
    keep: list[Any] = []

    def linear(n: int, k: int) -> list[Any]:
        desc, arrs, _ = random_w4(ext, rng, n, k, 32, True)
        keep.extend([desc, *arrs])
        return [ext.LinearPart(desc, 0, False, 1)]

    def norm() -> Any:
        desc, arrs = norm_adapter(ext, rng, dim, 8)
        keep.extend(arrs)
        return desc

    inv = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(ctx), inv)
    rope = np.ascontiguousarray(np.stack([np.cos(ang), np.sin(ang)], -1), dtype=np.float32)
    stack = ext.DecodeStack(isa, dim, nh, nkv, hd, ffn, ctx, 8, EPS, rope.ctypes.data, 2, 1)
    caches = [np.zeros((1, nkv, ctx, hd), dtype=np.float16) for _ in range(4)]
    for layer in range(2):
        stack.add_layer(norm(), norm(), linear((nh + 2 * nkv) * hd, dim), linear(dim, nh * hd), linear(2 * ffn, dim),
                        linear(dim, ffn), caches[2 * layer].ctypes.data, caches[2 * layer + 1].ctypes.data)
    stack.set_head(norm(), [], 0, "float32", 0, 0)
    t = 37
    h = (rng.standard_normal((t + 5, dim))).astype(np.float32)
    outs = np.empty((6, dim), dtype=np.float32)
    stack.prefill(h.ctypes.data, t, 0, 0, 1, outs[0].ctypes.data)
    for i in range(5):
        x = h[t + i].copy()
        stack.step(x.ctypes.data, t + i, 1, outs[i + 1].ctypes.data)
    return outs


def check_decode(ext: Any, backends: list[str], c: Check) -> None:
    for hd in (64, 24):
        outs = {b: decode_run(ext, b, hd, seed=hd) for b in backends}
        c.record(f"decode_{hd}", outs["scalar"], 1e-4)
        for b in backends:
            c.close(outs[b], outs["scalar"], 1e-4, f"decode step {b} head_dim={hd}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save", help="write every result to this .npz")
    ap.add_argument("--against", help="compare with the results of another machine's --save")
    ap.add_argument("--expect", help="comma-separated backends this CPU must offer, e.g. neon-dotprod,neon,scalar")
    args = ap.parse_args(argv)
    ext = extension()
    if ext is None:
        print("error: lavin_edge._C did not import", file=sys.stderr)
        return 1
    feats = ext.cpu_features()
    backends = list(feats["backends"])
    print(f"backends built {feats['built_backends']}, usable {backends}, openmp {feats['openmp']}", flush=True)
    c = Check(dict(np.load(args.against)) if args.against else None)
    if args.expect:
        c.expect(backends == args.expect.split(","), f"usable backends {backends}, expected {args.expect}")
    steps: list[Callable[[Any, list[str], Check], None]] = [check_w4, check_adapters, check_decode]
    for step in steps:
        step(ext, backends, c)
        print(f"{step.__name__}: done ({len(c.failures)} failures so far)", flush=True)
    if args.save:
        np.savez(args.save, **c.results)
    for f in c.failures:
        print("FAIL", f)
    print(f"{c.count - len(c.failures)}/{c.count} checks passed on {', '.join(backends)}")
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
