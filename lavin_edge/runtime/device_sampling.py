"""Next-token sampling on the device for the CUDA engine: the logits never leave it, one token id per row does.

The same processors and order as ``Sampler.process`` (lavin_edge.runtime.sampling): repetition penalty ->
temperature -> top-k -> top-p, greedy at temperature 0. Fixed shapes, no host synchronisation, no data-dependent
Python branches. What differs from the CPU ``Sampler``:

- top-k keeps exactly k tokens (ranks from one descending sort); ``process`` keeps every token tied with the
  k-th;
- the draw is an exponential race (``argmax p_i / E_i`` with E_i ~ Exp(1), which picks i with probability p_i),
  from a ``torch.Generator`` on the device seeded with ``seed``: a seed reproduces answers on one device and
  PyTorch build, not the CPU sampler's answers.
"""

from __future__ import annotations

import torch

from lavin_edge.runtime.sampling import GenerationConfig


class DeviceSampler:
    """Picks the next token of each row of fp32 logits [m, V] on their device; returns int64 [m] there."""

    def __init__(self, cfg: GenerationConfig, vocab_size: int, device: torch.device) -> None:
        cfg.validate()
        self.cfg = cfg
        self.penalize = cfg.repetition_penalty != 1.0
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.gen = torch.Generator(device=device)
        if cfg.seed is not None:
            self.gen.manual_seed(cfg.seed)
        else:
            self.gen.seed()

    def observe(self, ids: list[int] | torch.Tensor) -> None:
        """Mark tokens as present in the context (for the repetition penalty)."""
        if self.penalize:
            idx = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)
            self.seen[idx.to(self.seen.device)] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after the penalty and temperature (rows [m, V]; greedy: only the penalty)."""
        cfg = self.cfg
        x = logits.float()
        if self.penalize:
            p = cfg.repetition_penalty
            # CTRL's rule, as Sampler: shrink positive logits of seen tokens, push negative ones down.
            x = torch.where(self.seen, torch.where(x > 0, x / p, x * p), x)
        if cfg.temperature > 0:
            x = x / cfg.temperature
        return x

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = self.process(logits)
        if cfg.temperature == 0:
            tok = x.argmax(-1)
        else:
            ranked, order = torch.sort(x, dim=-1, descending=True)
            if 0 < cfg.top_k < ranked.shape[-1]:
                ranked[:, cfg.top_k:] = float("-inf")
            probs = torch.softmax(ranked, dim=-1)
            if cfg.top_p < 1.0:
                # Drop a token when the mass before it already reaches top_p: the top token always stays.
                probs = probs.masked_fill(probs.cumsum(-1) - probs >= cfg.top_p, 0.0)
            race = torch.empty_like(probs).exponential_(generator=self.gen)
            tok = order.gather(-1, (probs / race).argmax(-1, keepdim=True))[:, 0]
        if self.penalize:
            self.seen[tok] = True
        return tok
