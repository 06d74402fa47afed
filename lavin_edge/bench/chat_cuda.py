"""`lavin-edge bench chat --device cuda`: the CUDA engine end to end on a GPU (``lavin_edge.runtime.cuda_engine``).

Rows: the demo 4-bit (its chat question about an example image, when built), the demo's shape on random 4-bit
weights (SmolLM2-135M, g64, fp16 tied head: the demo's decode speed where it is not built), and a LLaMA-7B-shaped
random 4-bit GPTQ g128 model (``LAYERS_7B`` of its 32 layers, every layer the same shape, and its 4-bit head:
the per-token roofline is computed for the layers loaded). Each row: prefill and decode tok/s, time to first
token, peak GPU memory, and the decode's share of the HBM roofline (bytes one step reads, weights + KV cache, over
the bandwidth a read of a buffer far beyond L2 reaches in the same run). The demo row also gives the greedy
agreement of its CUDA tokens with the same engine's run on CPU tensors (the CI-tested path). Without a GPU the
command line is refused before this runs (``--device``'s one error line).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

LAYERS_7B = 8  # of LLaMA-7B's 32: the random weights are drawn on the host (~0.2 s per linear), within the check
PROBE_BYTES = 4 << 30  # the HBM probe's buffer: far beyond any L2


def hbm_read_gbs(device: torch.device, nbytes: int = PROBE_BYTES, reps: int = 10) -> float:
    """GB/s of ``torch.sum`` over an fp16 buffer of ``nbytes`` (read once per call), timed by CUDA events."""
    buf = torch.ones(nbytes // 2, dtype=torch.float16, device=device)
    buf.sum()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        buf.sum()
    end.record()
    torch.cuda.synchronize(device)
    gbs = nbytes * reps / (start.elapsed_time(end) / 1000) / 1e9
    del buf
    torch.cuda.empty_cache()
    return gbs


def _generate(eng: Any, ids: list[int], pos: int, image: str | None, new_tokens: int) -> tuple[Any, list[int]]:
    """Warm-up (captures the decode graphs), then the measured run: (stats, tokens)."""
    from lavin_edge.data.image import load_image
    from lavin_edge.modality import IMAGE, TEXT
    from lavin_edge.runtime import GenerationStats
    from lavin_edge.runtime.sampling import GenerationConfig

    result = stats = None
    for _ in range(2):
        t0 = time.perf_counter()
        visual = None if image is None else eng.encode_image(load_image(image, eng.cfg.vision.image_size))
        if eng.device.type == "cuda":
            torch.cuda.synchronize(eng.device)
        stats = GenerationStats(vision_s=time.perf_counter() - t0)
        eng.reset(IMAGE if image else TEXT)
        result = eng.generate(ids, GenerationConfig(max_new_tokens=new_tokens), pos, visual, None, stats,
                              stop_ids=set())
    assert result is not None and stats is not None
    return stats, result.ids


def _figures(stats: Any, eng: Any, read_gbs: float) -> dict[str, Any]:
    llm = eng.cfg.llm
    mean_len = stats.prompt_tokens + stats.new_tokens / 2
    kv_bytes = int(2 * llm.n_layers * llm.n_kv_heads * llm.head_dim * 2 * mean_len)
    roofline = read_gbs * 1e9 / (eng.weight_bytes_per_token() + kv_bytes)
    return {"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
            "prefill_tok_s": round(stats.prefill_tok_s, 1), "decode_tok_s": round(stats.decode_tok_s, 1),
            "ttft_ms": round(stats.ttft_s * 1000, 2), "vision_ms": round(stats.vision_s * 1000, 2),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(eng.device) / 2**20, 1)
            if eng.device.type == "cuda" else None,
            "weight_bytes_per_token": eng.weight_bytes_per_token(), "kv_bytes_per_token": kv_bytes,
            "roofline_tok_s": round(roofline, 1), "pct_of_roofline": round(100 * stats.decode_tok_s / roofline, 1)}


def demo_row(q_model: str, new_tokens: int, question: str, image: str, read_gbs: float, device: str = "cuda"
             ) -> dict[str, Any]:
    """The chat question about ``image`` on ``device`` (cpu: the same row on CPU tensors, for tests)."""
    from lavin_edge.chat.session import ChatSession
    from lavin_edge.runtime.cuda_engine import CudaEngine
    from lavin_edge.runtime.sampling import GenerationConfig

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eng = CudaEngine.load(q_model, device, max_context=1024)
    sess = ChatSession(eng, GenerationConfig(max_new_tokens=new_tokens))  # type: ignore[arg-type]
    sess.set_image(image)
    ids, pos, _ = sess.build(question)
    stats, tokens = _generate(eng, ids, pos, image, new_tokens)
    row = _figures(stats, eng, read_gbs)
    _, cpu_tokens = _generate(CudaEngine.load(q_model, "cpu", max_context=1024), ids, pos, image, new_tokens)
    same = next((i for i, (a, b) in enumerate(zip(tokens, cpu_tokens, strict=True)) if a != b), len(tokens))
    row.update({"tokens_equal_cpu_run": tokens == cpu_tokens, "first_difference": None if same == len(tokens)
                else same, "agreement": round(sum(a == b for a, b in zip(tokens, cpu_tokens, strict=True))
                                              / max(len(tokens), 1), 4)})
    return row


class _TiedHead(Mapping):
    """A model's tensors without the ``output.*`` ones: with tied embeddings the head is the embedding table, as
    in the demo (fp16 on the CUDA engine)."""

    def __init__(self, sd: Mapping[str, torch.Tensor]) -> None:
        self.sd = sd
        self.names = [k for k in sd if not k.startswith("output.")]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key.startswith("output."):
            raise KeyError(key)
        return self.sd[key]


def random_row(llm_preset: str, layers: int, group_size: int, new_tokens: int, prompt_tokens: int,
               read_gbs: float, device: str = "cuda") -> dict[str, Any]:
    """Decode on random 4-bit GPTQ weights of ``llm_preset``'s shape (its first ``layers`` layers): with a 4-bit
    head, or the fp16 embedding table when the preset ties them (the demo's SmolLM2)."""
    from lavin_edge.bench.random_gptq import NoTokenizer, RandomGPTQLlama, random_prompt_ids
    from lavin_edge.config import LavinConfig, preset
    from lavin_edge.runtime.cuda_engine import CudaEngine

    base = preset(llm_preset, "tiny")
    base.llm.n_layers = layers
    cfg = LavinConfig(llm=base.llm, vision=base.vision, adapter=base.adapter)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sd: Mapping[str, torch.Tensor] = RandomGPTQLlama(cfg.llm, group_size)
    if cfg.llm.tie_embeddings:
        sd = _TiedHead(sd)
    eng = CudaEngine(cfg, sd, {"checkpoint_format": "gptq", "group_size": group_size}, device,
                     prompt_tokens + new_tokens + 8, NoTokenizer())
    load_s = time.perf_counter() - t0
    stats, _ = _generate(eng, random_prompt_ids(cfg.llm.vocab_size, prompt_tokens), -1, None, new_tokens)
    return {**_figures(stats, eng, read_gbs), "layers": layers, "load_s": round(load_s, 1)}


def run_cuda_chat_bench(json_out: bool = False, q_model: str | None = None, new_tokens: int = 64,
                        with_7b: bool = True, question: str | None = None, image: str | None = None,
                        device: str = "cuda") -> dict[str, Any]:
    """Every row (a row that cannot run carries ``skipped``); prints a table or one JSON object. ``device`` "cpu"
    runs the same rows on CPU tensors (a smoke test of this driver; no bandwidth probe there)."""
    from lavin_edge.bench.chat import DEFAULT_QUESTION, example_image
    from lavin_edge.demo.build import demo_model_dir
    from lavin_edge.demo.paths import DemoModelMissing

    dev = torch.device(device)
    read_gbs = hbm_read_gbs(dev) if dev.type == "cuda" else 1.0
    rows: list[dict[str, Any]] = []

    def done(row: dict[str, Any]) -> None:
        # Each row on stderr as it ends: a run stopped by a time cap still leaves the rows it finished.
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    try:
        qdir = q_model or str(demo_model_dir(quantized=True))
        done({"model": f"demo 4-bit (quantized): {qdir}", **demo_row(
            qdir, new_tokens, question or DEFAULT_QUESTION, image or str(example_image()), read_gbs, device)})
    except DemoModelMissing as e:
        done({"model": "demo 4-bit (quantized)", "skipped": str(e)})
    # The demo's shape on random weights: its decode speed where the demo is not built (the GPU machine).
    done({"model": "demo-shaped (SmolLM2-135M, 30 layers), random 4-bit GPTQ g64 + fp16 tied head",
                 **random_row("smollm2-135m", 30, 64, new_tokens, 16, read_gbs, device)})
    if with_7b:
        done({"model": f"llama-7b-shaped, random 4-bit GPTQ g128 + 4-bit head, {LAYERS_7B} of 32 layers",
                     **random_row("llama-7b", LAYERS_7B, 128, min(new_tokens, 64), 16, read_gbs, device)})
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": name, "hbm_read_gbs": round(read_gbs, 1), "new_tokens": new_tokens, "rows": rows}
    if json_out:
        print(json.dumps(result))
    else:
        print(f"{result['device']}: HBM read {result['hbm_read_gbs']} GB/s")
        for r in rows:
            figs = ", ".join(f"{k} {r[k]}" for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_gpu_mb",
                                                      "pct_of_roofline", "tokens_equal_cpu_run") if k in r)
            print(f"{r['model']}: {r.get('skipped') or figs}")
    return result
