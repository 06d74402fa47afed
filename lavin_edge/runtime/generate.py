"""The generation loop: prefill the new ids, then one decode step per token, sampling hooked in, with stats."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lavin_edge.decoding import EOS, decode
from lavin_edge.prompt import ContextError
from lavin_edge.runtime.sampling import GenerationConfig, Sampler, StopStringStream


class DecodingEngine(Protocol):
    """What the loop drives (``lavin_edge.runtime.engine.Engine``): a KV cache of ``length`` positions and a
    forward over new embeddings."""

    tokenizer: Any
    max_context: int
    length: int
    embed: torch.Tensor
    history: list[int]

    def forward(self, h: torch.Tensor, last_only: bool = True) -> torch.Tensor: ...

    def embed_prompt(self, ids: list[int], image_pos: int = -1, visual: torch.Tensor | None = None
                     ) -> torch.Tensor: ...


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    vision_s: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes out of the prefill; decode steps produce the rest.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
                "ttft_ms": round(self.ttft_s * 1000, 2), "vision_ms": round(self.vision_s * 1000, 2),
                "stop_reason": self.stop_reason}


@dataclass
class GenerationResult:
    ids: list[int]
    text: str
    stats: GenerationStats


def turn_limits(eng: DecodingEngine, new_ids: list[int], gen: GenerationConfig, stop_ids: set[int] | None
                ) -> tuple[set[int], int]:
    """A turn's stop ids (the tokenizer's unless given) and how many tokens it may decode: ``max_new_tokens``
    within the context left after the history and ``new_ids`` (ContextError when the prompt does not fit)."""
    tok = eng.tokenizer
    if stop_ids is None:
        stop_ids = set(getattr(tok, "stop_ids", {tok.eos_id}))
    room = eng.max_context - eng.length - len(new_ids)
    if room < 1:
        raise ContextError(f"prompt of {len(new_ids)} tokens does not fit: {eng.length} in history, "
                           f"context {eng.max_context}")
    return stop_ids, min(gen.max_new_tokens, room)


def generate(engine: DecodingEngine, new_ids: list[int], gen: GenerationConfig, image_pos: int = -1,
             visual: torch.Tensor | None = None, on_text: Callable[[str], None] | None = None,
             stats: GenerationStats | None = None, stop_ids: set[int] | None = None) -> GenerationResult:
    """Prefill ``new_ids`` after the engine's cached history (``length`` positions), then decode.

    The stop token (EOS / end-of-turn) is fed to the cache too, so the next turn can append.
    ``stop_ids`` overrides the tokenizer's (an empty set makes benchmarks produce exactly N tokens)."""
    gen.validate()
    eng = engine
    tok = eng.tokenizer
    stop_ids, budget = turn_limits(eng, new_ids, gen, stop_ids)
    stats = stats or GenerationStats()
    sampler = Sampler(gen, eng.embed.shape[0])
    sampler.observe(new_ids)
    stream = StopStringStream(tok.decode, gen.stop_strings)
    t0 = time.perf_counter()
    logits = eng.forward(eng.embed_prompt(new_ids, image_pos, visual))
    eng.history.extend(new_ids)
    nxt = sampler(logits)
    t1 = time.perf_counter()
    stats.prompt_tokens, stats.prefill_s, stats.ttft_s = len(new_ids), t1 - t0, t1 - t0 + stats.vision_s
    out: list[int] = []
    step_in = torch.empty(1, dtype=torch.long)

    def feed(token: int) -> torch.Tensor:
        step_in[0] = token
        logits = eng.forward(eng.embed[step_in].float())
        eng.history.append(token)
        return logits

    def emit(_row: int, token: int) -> bool:
        out.append(token)
        piece = stream.push(token)
        if piece and on_text is not None:
            on_text(piece)
        return not stream.stopped

    with torch.inference_mode():
        (reason,), (last,) = decode([nxt], lambda picks: [sampler(feed(picks[0]))], stop_ids, budget, emit)
        if reason == EOS and eng.length < eng.max_context:
            feed(last)  # keep the end of turn in the history
    rest = stream.finish()
    if rest and on_text is not None:
        on_text(rest)
    stats.decode_s = time.perf_counter() - t1
    stats.new_tokens = len(out)
    stats.stop_reason = reason
    return GenerationResult(out, stream.text, stats)
