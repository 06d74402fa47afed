"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), repetition penalty, seeded.

Everything works on one fp32 logits row [V]; the order follows Hugging Face's processors
(repetition penalty -> temperature -> top-k -> top-p) so settings mean what users expect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lavin_edge.runtime.text_stream import StopStringStream

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


def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def _inverse_cdf(weights: np.ndarray, u: float, block: int = 256) -> int:
    """The index i with cdf[i - 1] <= u * total < cdf[i] over non-negative ``weights`` (u in [0, 1)), found
    through cumulative sums of blocks and then inside one block: a cumulative sum of the whole row is a
    sequential loop, several times the cost of everything else in a draw."""
    starts = np.arange(0, weights.size, block)
    ends = np.cumsum(np.add.reduceat(weights, starts))
    t = u * ends[-1]
    b = min(int(np.searchsorted(ends, t, side="right")), ends.size - 1)
    if b > 0:
        t -= ends[b - 1]
    seg = weights[starts[b]:starts[b] + block]
    i = int(np.searchsorted(np.cumsum(seg), t, side="right"))
    if i >= seg.size:  # t at the block's very end by rounding: its last token that can be drawn
        i = int(np.flatnonzero(seg)[-1])
    return int(starts[b]) + i


class Sampler:
    """Picks the next token. ``seen`` is a bool mask over the vocabulary of tokens already in the context
    (prompt and generated), kept incrementally so the penalty costs O(V) per step, not O(context).

    ``process`` is the readable definition: the whole logits row after each processor, filtered entries -inf.
    ``__call__`` draws from that distribution without materialising it (the top-p cut summed in fp64 where
    ``process`` sums in fp32: a token at the very edge may differ), because on a 49k vocabulary a
    full sort (top-p) or torch.multinomial costs a row more than its share of a batched decode step: NumPy's
    argmax for greedy; for sampling, the kept tokens found by partial sorts (top-k, then the top-p nucleus from
    the largest 64 probabilities, widened until the cut falls inside), then one uniform draw against their
    cumulative probabilities (inverse CDF in fp64, by blocks). tests/test_chat_sampling.py checks that both
    keep the same tokens and that the draws follow the probabilities."""

    def __init__(self, cfg: GenerationConfig, vocab_size: int) -> None:
        cfg.validate()
        self.cfg = cfg
        self.seen = np.zeros(vocab_size, dtype=bool)
        self.rng = np.random.default_rng(cfg.seed)  # seed None: fresh OS entropy

    def observe(self, ids: list[int] | int) -> None:
        """Mark tokens as present in the context (for the repetition penalty)."""
        if self.cfg.repetition_penalty != 1.0:
            self.seen[np.asarray(ids, dtype=np.int64)] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after repetition penalty, temperature, top-k and top-p (filtered entries are -inf)."""
        cfg = self.cfg
        x = logits.float().clone()
        seen = torch.from_numpy(self.seen)
        if cfg.repetition_penalty != 1.0 and bool(seen.any()):
            # CTRL's rule: shrink positive logits, push negative ones further down.
            sel = x[seen]
            x[seen] = torch.where(sel > 0, sel / cfg.repetition_penalty, sel * cfg.repetition_penalty)
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

    def _penalized(self, logits: torch.Tensor) -> np.ndarray:
        """The row as fp32 NumPy after the repetition penalty (a view of ``logits`` when there is none)."""
        x = logits.detach().float().cpu().numpy()
        cfg = self.cfg
        if cfg.repetition_penalty != 1.0 and self.seen.any():
            x = x.copy()
            sel = x[self.seen]
            x[self.seen] = np.where(sel > 0, sel / np.float32(cfg.repetition_penalty),
                                    sel * np.float32(cfg.repetition_penalty))
        return x

    def kept(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The tokens ``process`` leaves finite (ids, ascending only without top-p) and their processed logits
        (fp32, as ``process`` computes them); for sampling (temperature > 0)."""
        cfg = self.cfg
        x = self._penalized(logits) / np.float32(cfg.temperature)
        ids = np.arange(x.size)
        if 0 < cfg.top_k < x.size:
            kth = torch.topk(torch.from_numpy(x), cfg.top_k).values[-1].item()
            ids = np.flatnonzero(x >= kth)
            x = x[ids]
        if cfg.top_p < 1.0:
            probs = _softmax64(x)
            k = min(64, probs.size)
            while True:  # the nucleus is a prefix of the sorted probabilities: widen until its cut is inside
                pv, top = torch.topk(torch.from_numpy(probs), k)
                pv, top = pv.numpy(), top.numpy()
                keep = np.cumsum(pv) - pv < cfg.top_p
                if not keep.all() or k == probs.size:
                    break
                k = min(probs.size, 8 * k)
            ids, x = ids[top[keep]], x[top[keep]]
        return ids, x

    def __call__(self, logits: torch.Tensor) -> int:
        if self.cfg.temperature == 0:
            tok = int(np.argmax(self._penalized(logits)))
        else:
            ids, x = self.kept(logits)
            tok = int(ids[_inverse_cdf(np.exp(x.astype(np.float64) - x.max()), self.rng.random())])
        self.observe(tok)
        return tok
