"""The CUDA engine's kernels (lavin_edge/kernels/cuda.py, csrc/cuda/): on the CPU, their PyTorch references
and the lane-by-lane emulation of the GPU GEMV against the GPTQ reference; on a GPU (``-m cuda``), the
kernels against that emulation bit for bit, plus an identity-matrix probe naming the first wrong (n, k).

Tolerance: the GEMV dequantizes exactly (fp16 of the GPTQ weight), multiplies in fp16, sums each 8-input word
in fp16 and everything else in fp32, and rounds the result to fp16: about 4e-4 of ||y|| for Gaussian x; 1e-3
is the issue's bound, which a wrong nibble, scale, zero or permutation exceeds by far.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lavin_edge.kernels import cuda as C
from lavin_edge.kernels import reference as R
from lavin_edge.kernels.dispatch import extension
from lavin_edge.kernels.gptq_format import GPTQTensors, quantize_rtn

EXT = extension()
needs_ext = pytest.mark.skipif(EXT is None, reason="lavin_edge._C not built")
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and EXT is not None and EXT.cuda_compiled),
    reason="needs a CUDA GPU and the CUDA kernels",
)
cuda = pytest.mark.cuda

# (n, k, group_size, act_order, format): n not a multiple of 4 (a partial warp), k of 12 chunks (lanes
# without work) and of 48 (two rounds), one group over K; v1 and v2 zero points.
CASES = [
    (37, 384, 32, True, "gptq_v2"),
    (45, 1536, 64, False, "gptq"),
    (64, 1536, 128, True, "gptq_v2"),
    (20, 256, 128, False, "gptq"),
    (9, 512, -1, True, "gptq_v2"),
]


def make(n: int, k: int, gs: int, act_order: bool, fmt: str, seed: int = 0) -> tuple[GPTQTensors, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    d = quantize_rtn(w, gs, act_order=act_order, sym=fmt == "gptq", checkpoint_format=fmt, generator=gen)
    t = GPTQTensors(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], fmt, gs)
    return t, t.dequantize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- CPU: layout and references ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_dequantize_is_fp16_of_gptq(case: tuple) -> None:
    t, wd = make(*case)
    w = C.prepare_w4_cuda(t, "cpu")
    assert (w.n, w.k) == t.shape and (w.perm is not None) == (case[3] and case[2] != -1)
    assert torch.equal(C.dequantize_w4(w), wd.half())
    out = torch.empty(w.n, w.k, dtype=torch.float16)
    assert C.dequantize_w4(w, out) is out and torch.equal(out, wd.half())


def test_prepare_refuses_layouts_the_kernel_does_not_take() -> None:
    t, _ = make(8, 96, 32, False, "gptq")
    with pytest.raises(ValueError, match="multiples of 32"):
        C.prepare_w4_cuda(GPTQTensors(t.qweight[:10], t.qzeros, t.scales, t.g_idx[:80], "gptq", 16), "cpu")


@pytest.mark.parametrize("case", CASES[:3])
def test_reference_linear_and_epilogue(case: tuple) -> None:
    t, wd = make(*case, seed=1)
    w = C.prepare_w4_cuda(t, "cpu")
    x = torch.randn(5, w.k).half()
    ref = x.double() @ wd.double().t()
    y = C.w4_linear(x, w)
    assert y.dtype == torch.float16 and rel(y, ref) < 1e-3
    wide = torch.randn(5, w.n + 7)  # the product added into a column slice of a wider fp32 buffer
    before = wide.clone()
    assert C.w4_linear(x, w, wide[:, 3:3 + w.n]) is not None
    assert rel(wide[:, 3:3 + w.n] - before[:, 3:3 + w.n], ref) < 1e-3
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 3 + w.n:], before[:, 3 + w.n:])


def test_kernel_table_runs_references_on_cpu_tensors() -> None:
    assert set(C.KERNELS) == {"w4_gemv", "w4_dequant", "norm_adapter"}
    for name, (impl, ref) in C.KERNELS.items():
        assert C._pick(name, torch.zeros(1)) is ref and impl is not ref


def test_norm_adapter_reference_matches_cpu_adapter() -> None:
    gen = torch.Generator().manual_seed(3)
    d, r = 96, 4
    g = torch.rand(d, generator=gen) + 0.5
    A, a = torch.randn(r, d, generator=gen) * 0.1, torch.randn(r, generator=gen) * 0.1
    U, u = torch.randn(2, d, r, generator=gen) * 0.1, torch.randn(2, d, generator=gen) * 0.1
    p = C.prepare_norm_adapter_cuda(g, A, a, U, u, 1e-6, "cpu")
    x = torch.randn(4, d, generator=gen)
    mods = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    got = C.norm_adapter(x, p, mods)
    w16 = [t.half().float() for t in (g, A, a, U, u)]  # the kernel's fp16 weights
    for row in range(4):
        ref = R.llm_adapter_reference(x[row:row + 1, None], *w16, mods[row:row + 1], 1e-6)[0, 0]
        torch.testing.assert_close(got[row].float(), ref, rtol=2e-3, atol=2e-3)
    plain = C.prepare_norm_adapter_cuda(g, None, None, None, None, 1e-6, "cpu")
    torch.testing.assert_close(C.norm_adapter(x.half(), plain, mods).float(),
                               F.rms_norm(x.half().float(), (d,), g.half().float(), 1e-6), rtol=2e-3, atol=2e-3)


def test_reference_step_traces_as_one_graph(torch_compile_on: None) -> None:
    """Norm + adapter then a W4 linear added into an output, as the engine's decode step calls them on CPU
    tensors: no graph break (a lazy cache or a Python-side read of a tensor would be one)."""
    t, _ = make(64, 256, 64, True, "gptq_v2")
    w = C.prepare_w4_cuda(t, "cpu")
    gen = torch.Generator().manual_seed(5)
    na = C.prepare_norm_adapter_cuda(torch.rand(256, generator=gen) + 0.5, torch.randn(4, 256, generator=gen),
                                     torch.randn(4, generator=gen), torch.randn(2, 256, 4, generator=gen),
                                     torch.randn(2, 256, generator=gen), 1e-6, "cpu")

    def step(h: torch.Tensor, rm: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return C.w4_linear(C.norm_adapter(h, na, rm), w, out)

    h, rm = torch.randn(2, 256, generator=gen), torch.tensor([0, 1], dtype=torch.int32)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(h, rm, torch.zeros(2, 64)), step(h, rm, torch.zeros(2, 64)))


# ---- CPU: the lane-by-lane emulation of the GPU GEMV ---------------------------------------------------


@needs_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_lane_emulation_matches_gptq(case: tuple, m: int) -> None:
    t, wd = make(*case, seed=m)
    w = C.prepare_w4_cuda(t, "cpu")
    x = torch.randn(m, w.k, generator=torch.Generator().manual_seed(m)).half()
    y = C.w4_linear_lanes(x, w)
    assert rel(y, x.double() @ wd.double().t()) < 1e-3


@needs_ext
def test_lane_emulation_epilogues_add_exactly() -> None:
    t, _ = make(45, 1536, 64, True, "gptq_v2")
    w = C.prepare_w4_cuda(t, "cpu")
    x = torch.randn(3, w.k).half()
    acc = C.w4_linear_lanes(x, w, torch.zeros(3, w.n))  # 0 + acc: the fp32 sums themselves
    assert torch.equal(C.w4_linear_lanes(x, w), acc.half())
    base = torch.randn(3, w.n + 5)
    out = base.clone()
    C.w4_linear_lanes(x, w, out[:, 5:])
    assert torch.equal(out[:, 5:], base[:, 5:] + acc) and torch.equal(out[:, :5], base[:, :5])
    base16 = torch.randn(3, w.n + 5).half()
    out16 = base16.clone()
    C.w4_linear_lanes(x, w, out16[:, :w.n])
    assert torch.equal(out16[:, :w.n], (base16[:, :w.n].float() + acc).half())
    assert torch.equal(out16[:, w.n:], base16[:, w.n:])
    one = torch.zeros(w.n, 1).t()  # a single row whose row stride (1) is below n: never read
    assert torch.equal(C.w4_linear_lanes(x[:1], w, one), acc[:1])


@needs_ext
@pytest.mark.parametrize("case", CASES[:3])
def test_dequant_emulation_rounds_as_torch(case: tuple) -> None:
    """The host fp16 emulation (sub, mul, round to nearest even, subnormals) against PyTorch's fp16 ops."""
    t, _ = make(*case)
    w = C.prepare_w4_cuda(t, "cpu")
    w.sz[:3, :, 0] = torch.tensor([6e-8, 3.1e-5, 1.5e4]).half().view(3, 1)  # subnormal, tiny, huge scales
    got = torch.empty(w.n, w.k, dtype=torch.float16)
    EXT.w4_dequant_emulate(w.qw.data_ptr(), w.sz.data_ptr(), got.data_ptr(), w.n, w.k, w.group_size)
    assert torch.equal(got, C._dequantize_sorted(w))


def identity_probe(fn, w: C.CudaW4, wd: torch.Tensor) -> tuple[int, int] | None:
    """The first (n, k) where ``fn(x, w)`` on rows of the identity differs from the GPTQ weights ``wd``
    [n, k] in fp16 (exactly: each output is one weight times 1 plus zeros), or None (as exllamav2's tests)."""
    device = w.device
    want = wd.half().to(device)
    eye = torch.eye(w.k, dtype=torch.float16, device=device)
    for k0 in range(0, w.k, C.GEMV_MAX_M):
        x = eye[k0:k0 + C.GEMV_MAX_M]
        bad = (fn(x, w) != want[:, k0:k0 + x.shape[0]].t()).nonzero()
        if len(bad):
            return int(bad[0, 1]), k0 + int(bad[0, 0])
    return None


@needs_ext
def test_identity_probe_finds_a_wrong_weight() -> None:
    t, wd = make(12, 128, 32, True, "gptq_v2")
    w = C.prepare_w4_cuda(t, "cpu")
    assert identity_probe(C.w4_linear_lanes, w, wd) is None
    assert w.perm is not None
    w.qw[5, 2] ^= 0x10  # row 5, word 2 (inputs 16..23 of the group order), nibble slot 1: input 18
    assert identity_probe(C.w4_linear_lanes, w, wd) == (5, int(w.perm[18]))


# ---- GPU: the kernels against the emulation, bit for bit ---------------------------------------------------


@cuda
@needs_gpu
@pytest.mark.parametrize("case", CASES)
def test_cuda_gemv_equals_emulation(case: tuple) -> None:
    t, _ = make(*case)
    w = C.prepare_w4_cuda(t, "cpu")
    wg = C.prepare_w4_cuda(t, "cuda")
    for m in range(1, C.GEMV_MAX_M + 1):
        x = torch.randn(m, w.k).half()
        assert torch.equal(C.w4_linear(x.cuda(), wg).cpu(), C.w4_linear_lanes(x, w)), m
        base = torch.randn(m, w.n + 3)
        got = base.cuda()
        C.w4_linear(x.cuda(), wg, got[:, 3:])
        want = base.clone()
        C.w4_linear_lanes(x, w, want[:, 3:])
        assert torch.equal(got.cpu(), want), m
        base16 = torch.randn(m, w.n).half()
        got16 = base16.cuda()
        C.w4_linear(x.cuda(), wg, got16)
        want16 = base16.clone()
        C.w4_linear_lanes(x, w, want16)
        assert torch.equal(got16.cpu(), want16), m


@cuda
@needs_gpu
@pytest.mark.parametrize("n,k,gs", [(4096, 4096, 128), (256, 11008, 128), (64, 512, 32)])
def test_cuda_identity_probe(n: int, k: int, gs: int) -> None:
    t, wd = make(n, k, gs, True, "gptq_v2")
    assert identity_probe(C.w4_linear, C.prepare_w4_cuda(t, "cuda"), wd) is None


@cuda
@needs_gpu
@pytest.mark.parametrize("case", CASES)
def test_cuda_dequant_and_large_m(case: tuple) -> None:
    t, wd = make(*case)
    wg = C.prepare_w4_cuda(t, "cuda")
    assert torch.equal(C.dequantize_w4(wg).cpu(), wd.half())
    x = torch.randn(40, wg.k).half()
    assert rel(C.w4_linear(x.cuda(), wg).cpu(), x.double() @ wd.double().t()) < 1e-3


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_norm_adapter_matches_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    d, r = 4096, 8
    ws = (torch.rand(d, generator=gen) + 0.5, torch.randn(r, d, generator=gen) * 0.05,
          torch.randn(r, generator=gen) * 0.1, torch.randn(2, d, r, generator=gen) * 0.1,
          torch.randn(2, d, generator=gen) * 0.1)
    cpu = C.prepare_norm_adapter_cuda(*ws, 1e-6, "cpu")
    dev = C.prepare_norm_adapter_cuda(*ws, 1e-6, "cuda")
    x = torch.randn(6, d, generator=gen).to(dtype)
    mods = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.int32)
    got = C.norm_adapter(x.cuda(), dev, mods.cuda()).cpu()
    torch.testing.assert_close(got.float(), C.norm_adapter(x, cpu, mods).float(), rtol=2e-3, atol=2e-3)


# ---- bench kernels --device cuda ---------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is present")
def test_bench_kernels_cuda_without_gpu_is_one_line_exit_2() -> None:
    from click.testing import CliRunner

    from lavin_edge.cli import main

    res = CliRunner().invoke(main, ["bench", "kernels", "--device", "cuda", "--json"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith("error: no CUDA GPU is present") and res.stderr.count("\n") == 1


def test_bench_targets_read_off_the_rows() -> None:
    from lavin_edge.bench.kernels_cuda import targets

    def row(n: int, k: int, m: int, us: float, pct: float) -> dict:
        return {"n": n, "k": k, "m": m, "contender": "lavin_w4", "us": us, "pct_of_hbm": pct,
                "speedup_vs_torch_int4": 2.5, "time_vs_fp16": us / 40.0}

    t = targets([row(11008, 4096, 1, 10.0, 75.0), row(11008, 4096, 8, 12.0, 60.0), row(11008, 4096, 256, 50.0, 5.0)])
    assert t["11008x4096_m1_pct_hbm>=70"] == 75.0 and t["11008x4096_m8_over_m1<=1.3"] == pytest.approx(1.2)
    assert t["11008x4096_m256_over_fp16<=1.5"] == pytest.approx(1.25) and "4096x11008_m1_pct_hbm>=70" not in t
