"""`lavin-edge bench kernels --device cuda`: the CUDA W4 linear (lavin_edge/kernels/cuda.py) against torch on
a GPU, on LLaMA-7B layer shapes and the demo's.

Every contender is timed by a CUDA graph that calls each of its weight copies once (enough copies to exceed
4x the L2 cache, so every call streams its weights from HBM), replayed many times between CUDA events.
Reported per row: µs per call, the weight bytes one call reads (the contender's own format), GB/s, that rate
as % of the HBM read probe measured in the same run (a graph of large fp16 sums), and the ratios to torch's
int4 op and to fp16 cuBLAS. Contenders: ``lavin_w4`` (GPTQ g128; m <= 8 the GEMV, else dequantize +
torch.matmul), ``lavin_w4_actorder``, ``torch_fp16`` (F.linear) and ``torch_int4``
(``aten._weight_int4pack_mm``, tinygemm, g128, bf16 activations).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lavin_edge.kernels import cuda as KC
from lavin_edge.kernels.dispatch import extension
from lavin_edge.kernels.gptq_format import GPTQTensors, quantize_rtn

LLAMA7B_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096), (4096, 11008))
DEMO_SHAPES: tuple[tuple[int, int], ...] = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # SmolLM2 g64
MS: tuple[int, ...] = (1, 2, 4, 8, 16, 64, 256)
GROUP_SIZE = 128
DEMO_GROUP_SIZE = 64


class NoGpu(RuntimeError):
    """No CUDA GPU or no CUDA kernels here (the command turns it into a one-line error, exit 2)."""


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise NoGpu("no CUDA GPU is present (torch.cuda.is_available() is False): bench kernels --device cuda "
                    "needs one")
    c = extension()
    if c is None or not c.cuda_compiled:
        raise NoGpu("lavin_edge._C was built without its CUDA kernels (no nvcc at build time)")


def _graph_time(calls: Sequence[Callable[[], Any]], min_seconds: float) -> float:
    """Seconds per call: one graph holding every call once, replayed until ``min_seconds`` have passed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up outside the graph (cuBLAS handles, lazy init)
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps, best = 1, float("inf")
    spent = 0.0
    while spent < min_seconds:
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        sec = start.elapsed_time(end) / 1e3
        spent += sec
        best = min(best, sec / reps / len(calls))
        reps = min(reps * 2, 256)
    return best


def hbm_probe(l2: int, min_seconds: float) -> float:
    """HBM read GB/s: fp16 sums over buffers that together exceed 4x L2, graph-timed as the contenders."""
    per = max(64 * 1024**2, l2)
    bufs = [torch.ones(per // 2, dtype=torch.float16, device="cuda") for _ in range(max(2, -(-4 * l2 // per) + 1))]
    outs = [torch.empty((), dtype=torch.float32, device="cuda") for _ in bufs]
    calls = [lambda b=b, o=o: torch.sum(b, dtype=torch.float32, out=o) for b, o in zip(bufs, outs, strict=True)]
    return per / _graph_time(calls, min_seconds) / 1e9


def _copies(nbytes: int, l2: int) -> int:
    return max(2, -(-4 * l2 // nbytes) + 1)


def _int4_contender(w: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's packed int4 + bf16 scales-and-zeros [k/gs, n, 2] of w (asymmetric, w = (q - 8) s + zero)."""
    n, k = w.shape
    wg = w.reshape(n, k // gs, gs)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.clamp(torch.round((wg - lo.unsqueeze(2)) / scale.unsqueeze(2)), 0, 15).to(torch.int32).reshape(n, k)
    sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=2).to(torch.bfloat16).contiguous()
    q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).cuda()
    inner = next(t for t in (8, 4, 2, 1) if k % (16 * t) == 0)  # tinygemm needs k % (16 * innerKTiles) == 0
    return torch.ops.aten._convert_weight_to_int4pack(q8, inner), sz.cuda()


def _contenders(n: int, k: int, gs: int, l2: int) -> dict[str, tuple[int, Callable[[torch.Tensor], list]]]:
    """name -> (weight bytes per call, factory: x -> one zero-arg call per weight copy)."""
    gen = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=gen) * 0.02
    out: dict[str, tuple[int, Callable[[torch.Tensor], list]]] = {}
    for name, act_order in (("lavin_w4", False), ("lavin_w4_actorder", True)):
        d = quantize_rtn(w, gs, act_order=act_order, checkpoint_format="gptq_v2", generator=gen)
        t = GPTQTensors(d["qweight"], d["qzeros"], d["scales"], d["g_idx"], "gptq_v2", gs)
        first = KC.prepare_w4_cuda(t, "cuda")
        cs = [first] + [KC.prepare_w4_cuda(t, "cuda") for _ in range(_copies(first.nbytes, l2) - 1)]
        out[name] = (first.nbytes, lambda x, cs=cs: [lambda c=c: KC.w4_linear(x, c) for c in cs])
    wh = w.half().cuda()
    nb = wh.numel() * 2
    cs16 = [wh] + [wh.clone() for _ in range(_copies(nb, l2) - 1)]
    out["torch_fp16"] = (nb, lambda x, cs=cs16: [lambda c=c: F.linear(x, c) for c in cs])
    try:
        packed, sz = _int4_contender(w, gs)
    except (RuntimeError, NotImplementedError):  # an arch or build without tinygemm
        return out
    nb = packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    cs4 = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(_copies(nb, l2) - 1)]
    mm = torch.ops.aten._weight_int4pack_mm

    def int4_calls(x: torch.Tensor) -> list:
        xb = x.bfloat16()  # converted once, outside the timed graph
        return [lambda c=c: mm(xb, c[0], gs, c[1]) for c in cs4]

    out["torch_int4"] = (nb, int4_calls)
    return out


def _rows_for_shape(n: int, k: int, gs: int, ms: Sequence[int], l2: int, hbm: float, min_seconds: float,
                    family: str) -> list[dict[str, Any]]:
    contenders = _contenders(n, k, gs, l2)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").half()
        secs = {name: _graph_time(make(x), min_seconds) for name, (_, make) in contenders.items()}
        for name, (nbytes, _) in contenders.items():
            gbs = nbytes / secs[name] / 1e9
            rows.append({"family": family, "contender": name, "n": n, "k": k, "m": m, "group_size": gs,
                         "us": secs[name] * 1e6, "weight_bytes": nbytes, "gbs": gbs, "pct_of_hbm": 100 * gbs / hbm,
                         "speedup_vs_torch_int4": secs["torch_int4"] / secs[name] if "torch_int4" in secs else None,
                         "time_vs_fp16": secs[name] / secs["torch_fp16"]})
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's GPU targets for the W4 kernel, read off the rows (None where a row is missing)."""
    def get(n: int, k: int, m: int, name: str = "lavin_w4") -> dict[str, Any] | None:
        return next((r for r in rows if (r["n"], r["k"], r["m"], r["contender"]) == (n, k, m, name)), None)

    out: dict[str, Any] = {}
    for n, k in ((11008, 4096), (4096, 11008)):
        r1, r8, r256 = get(n, k, 1), get(n, k, 8), get(n, k, 256)
        key = f"{n}x{k}"
        if r1:
            out[f"{key}_m1_pct_hbm>=70"] = r1["pct_of_hbm"]
            out[f"{key}_m1_vs_int4>=2"] = r1["speedup_vs_torch_int4"]
        if r1 and r8:
            out[f"{key}_m8_over_m1<=1.3"] = r8["us"] / r1["us"]
        if r256:
            out[f"{key}_m256_over_fp16<=1.5"] = r256["time_vs_fp16"]
    return out


def run_cuda_kernel_bench(json_out: bool = False, ms: Sequence[int] = MS, min_seconds: float = 0.2,
                          shapes: Sequence[tuple[int, int]] | None = None, print_results: bool = True
                          ) -> dict[str, Any]:
    """Run on the current GPU (NoGpu when there is none); print a table or one JSON object; return the dict
    ``{"device", "hbm_read_gbs", "l2_bytes", "rows", "targets"}``."""
    require_gpu()
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 1024**2))
    hbm = hbm_probe(l2, min_seconds)
    plan = [(n, k, GROUP_SIZE, "llama7b") for n, k in (shapes or LLAMA7B_SHAPES)]
    if shapes is None:
        plan += [(n, k, DEMO_GROUP_SIZE, "demo") for n, k in DEMO_SHAPES]
    rows: list[dict[str, Any]] = []
    for n, k, gs, family in plan:
        rows += _rows_for_shape(n, k, gs, ms, l2, hbm, min_seconds, family)
        torch.cuda.empty_cache()
    hbm = max(hbm, hbm_probe(l2, min_seconds))  # the larger probe: the conservative denominator
    for r in rows:
        r["pct_of_hbm"] = 100 * r["gbs"] / hbm
    result = {"device": props.name, "torch": torch.__version__, "hbm_read_gbs": hbm, "l2_bytes": l2, "rows": rows,
              "targets": targets(rows)}
    if print_results:
        print(json.dumps(result) if json_out else format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['device']}: HBM read probe {result['hbm_read_gbs']:.0f} GB/s; weights rotated over > 4x L2 "
             f"({result['l2_bytes'] / 1024**2:.0f} MiB); CUDA-graph timed",
             f"{'contender':<18} {'n':>6} {'k':>6} {'m':>4} {'us':>9} {'MB':>7} {'GB/s':>7} {'% HBM':>6} "
             f"{'vs int4':>8} {'/ fp16':>7}"]
    for r in result["rows"]:
        vs4 = f"{r['speedup_vs_torch_int4']:.2f}x" if r["speedup_vs_torch_int4"] else "-"
        lines.append(f"{r['contender']:<18} {r['n']:>6} {r['k']:>6} {r['m']:>4} {r['us']:>9.1f} "
                     f"{r['weight_bytes'] / 1e6:>7.2f} {r['gbs']:>7.0f} {r['pct_of_hbm']:>5.0f}% {vs4:>8} "
                     f"{r['time_vs_fp16']:>6.2f}x")
    lines += [f"target {k}: {v:.2f}" for k, v in result["targets"].items() if v is not None]
    return "\n".join(lines)
