"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), repetition penalty, seeded.

Everything works on one fp32 logits row [V]; the order follows Hugging Face's processors
(repetition penalty -> temperature -> top-k -> top-p) so settings mean what users expect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lavin_edge.chat.text_stream import StopStringStream

__all__ = ["GenerationConfig", "Sampler", "StopStringStream"]


@dataclass
class GenerationConfig:
    """``temperature`` 0 means greedy (top-k/top-p are then irrelevant); ``seed`` None draws from OS entropy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    """Picks the next token. ``seen`` is a bool mask over the vocabulary of tokens already in the context
    (prompt and generated), kept incrementally so the penalty costs O(V) per step, not O(context)."""

    def __init__(self, cfg: GenerationConfig, vocab_size: int) -> None:
        cfg.validate()
        self.cfg = cfg
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.generator = torch.Generator()
        if cfg.seed is not None:
            self.generator.manual_seed(cfg.seed)
        else:
            self.generator.seed()

    def observe(self, ids: list[int] | int) -> None:
        """Mark tokens as present in the context (for the repetition penalty)."""
        if self.cfg.repetition_penalty != 1.0:
            self.seen[torch.as_tensor(ids, dtype=torch.long)] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after repetition penalty, temperature, top-k and top-p (filtered entries are -inf)."""
        cfg = self.cfg
        x = logits.float().clone()
        if cfg.repetition_penalty != 1.0 and bool(self.seen.any()):
            # CTRL's rule: shrink positive logits, push negative ones further down.
            sel = x[self.seen]
            x[self.seen] = torch.where(sel > 0, sel / cfg.repetition_penalty, sel * cfg.repetition_penalty)
        if cfg.temperature == 0:
            return x
        x /= cfg.temperature
        if 0 < cfg.top_k < x.numel():
            kth = torch.topk(x, cfg.top_k).values[-1]
            x[x < kth] = float("-inf")
        if cfg.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # Drop a token when the mass *before* it already reaches top_p: the top token always stays.
            drop = (probs.cumsum(-1) - probs) >= cfg.top_p
            x[order[drop]] = float("-inf")
        return x

    def __call__(self, logits: torch.Tensor) -> int:
        x = self.process(logits)
        if self.cfg.temperature == 0:
            tok = int(x.argmax())
        else:
            tok = int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=self.generator))
        self.observe(tok)
        return tok
