"""The CUDA engine's generation loop: ``lavin_edge.runtime.generate``'s contract (prefill the new ids, decode
until a stop id, a stop string or the budget; the stop token is fed to the cache too), with the sampling on
the device: each step's logits stay there, the sampled id goes straight into the next step's input buffer,
and one int64 per step is copied back for the text stream and the stop checks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from lavin_edge.runtime.device_sampling import DeviceSampler
from lavin_edge.runtime.generate import GenerationResult, GenerationStats, turn_limits
from lavin_edge.runtime.sampling import GenerationConfig
from lavin_edge.runtime.text_stream import StopStringStream


class CudaEngine(Protocol):
    """What the loop needs of ``runtime.cuda_engine.CudaEngine`` (a protocol, so this module does not import it)."""

    device: torch.device
    tokenizer: Any
    max_context: int
    length: int
    vocab_size: int
    history: list[int]

    def prefill(self, h: torch.Tensor) -> torch.Tensor: ...

    def decode(self, token: torch.Tensor) -> torch.Tensor: ...

    def embed_prompt(self, ids: list[int], image_pos: int = -1, visual: torch.Tensor | None = None
                     ) -> torch.Tensor: ...


def _sync(eng: CudaEngine) -> None:
    if eng.device.type == "cuda":
        torch.cuda.synchronize(eng.device)


@torch.inference_mode()
def generate(eng: CudaEngine, new_ids: list[int], gen: GenerationConfig, image_pos: int = -1,
             visual: torch.Tensor | None = None, on_text: Callable[[str], None] | None = None,
             stats: GenerationStats | None = None, stop_ids: set[int] | None = None) -> GenerationResult:
    """Prefill ``new_ids`` after ``eng``'s cached history, then decode; ``stop_ids`` as ``generate``'s."""
    gen.validate()
    tok = eng.tokenizer
    stop_ids, budget = turn_limits(eng, new_ids, gen, stop_ids)
    stats = stats or GenerationStats()
    sampler = DeviceSampler(gen, eng.vocab_size, eng.device)
    sampler.observe(new_ids)
    stream = StopStringStream(tok.decode, gen.stop_strings)
    t0 = time.perf_counter()
    logits = eng.prefill(eng.embed_prompt(new_ids, image_pos, visual))
    eng.history.extend(new_ids)
    nxt_dev = sampler(logits[None])
    nxt = int(nxt_dev.item())  # the one copy back per step (it also waits for the step to finish)
    t1 = time.perf_counter()
    stats.prompt_tokens, stats.prefill_s, stats.ttft_s = len(new_ids), t1 - t0, t1 - t0 + stats.vision_s
    out: list[int] = []
    reason = "length"
    while True:
        if nxt in stop_ids:
            reason = "eos"
            if eng.length < eng.max_context:
                eng.decode(nxt_dev)  # keep the end of turn in the history
                eng.history.append(nxt)
                _sync(eng)
            break
        out.append(nxt)
        piece = stream.push(nxt)
        if piece and on_text is not None:
            on_text(piece)
        if stream.stopped:
            reason = "stop_string"
            break
        if len(out) >= budget:
            break
        nxt_dev = sampler(eng.decode(nxt_dev)[None])
        eng.history.append(nxt)
        nxt = int(nxt_dev.item())
    rest = stream.finish()
    if rest and on_text is not None:
        on_text(rest)
    stats.decode_s = time.perf_counter() - t1
    stats.new_tokens = len(out)
    stats.stop_reason = reason
    return GenerationResult(out, stream.text, stats)
