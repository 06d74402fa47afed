"""``BatchDecoder``'s interface (lavin_edge.runtime.batch, what ``lavin_edge.serve`` drives) on the CUDA engine:
every step runs the engine's one decode step over all ``slots`` rows (the same captured graph for any mix of
requests), each row at its own position and modality, attending only over its own cache row.

Rows that are not stepping still run: their token is 0 and their position their slot's next unwritten one, so
what they write there is overwritten before it is ever read (a slot's next step or prefill writes that position
first); their logits are dropped. The 4-bit products read each weight once for all rows (the GEMV kernel takes up
to 8 rows; more go through dequantize + matmul).
"""

from __future__ import annotations

import torch

from lavin_edge.modality import TEXT, has_image
from lavin_edge.prompt import ContextError
from lavin_edge.runtime.cuda_engine import CudaEngine

__all__ = ["CudaBatchDecoder"]


class CudaBatchDecoder:
    """``engine.state.slots`` sequences over one ``CudaEngine`` (built with ``slots=``); ``prefill(slot, ...)``
    starts a sequence in a slot, ``step(slots, tokens)`` feeds one token to each listed slot: their logits
    [m, vocab] (fp32, on the engine's device)."""

    def __init__(self, engine: CudaEngine) -> None:
        self.engine = engine
        self.slots = engine.state.slots
        self.lengths = [0] * self.slots
        self.modalities = [TEXT] * self.slots
        self.histories: list[list[int]] = [[] for _ in range(self.slots)]

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def modality(self, slot: int) -> int:
        return self.modalities[slot]

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], modality: int = TEXT, image_pos: int = -1,
                visual: torch.Tensor | None = None) -> torch.Tensor:
        """Start a new sequence in ``slot`` (its previous one is dropped): logits [vocab] after ``ids``."""
        eng = self.engine
        h = eng.embed_prompt(ids, image_pos if has_image(image_pos) else -1, visual)
        self.lengths[slot] = 0
        logits = eng.prefill_slot(h, slot, 0, modality)
        self.lengths[slot], self.modalities[slot], self.histories[slot] = len(ids), modality, list(ids)
        return logits

    def _check(self, slots: list[int], tokens: list[int]) -> None:
        m = len(slots)
        if m == 0 or m != len(tokens) or len(set(slots)) != m:
            raise ValueError(f"step needs distinct slots and one token each, got slots={slots} tokens={tokens}")
        for s in slots:
            if self.lengths[s] == 0:
                raise ValueError(f"slot {s} holds no sequence (prefill it first)")
            if self.lengths[s] >= self.max_context:
                raise ContextError(f"slot {s}: {self.lengths[s] + 1} positions exceed the context of "
                                   f"{self.max_context}")

    @torch.inference_mode()
    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to ``slots[i]`` at that slot's next position, all rows in one step; logits [m, V]."""
        self._check(slots, tokens)
        eng, st = self.engine, self.engine.state
        tok = [0] * self.slots
        for s, t in zip(slots, tokens, strict=True):
            tok[s] = t
        pos = [min(n, self.max_context - 1) for n in self.lengths]
        # One host-to-device copy per buffer; the step reads them on the device.
        st.tok.copy_(torch.tensor(tok, dtype=torch.long), non_blocking=True)
        st.pos.copy_(torch.tensor(pos, dtype=torch.long), non_blocking=True)
        st.row_mod.copy_(torch.tensor(self.modalities, dtype=torch.int32), non_blocking=True)
        logits = eng.run_step(st.span_for(max(self.lengths[s] for s in slots)))
        out = logits[torch.tensor(slots, device=logits.device)]
        for s, t in zip(slots, tokens, strict=True):
            self.lengths[s] += 1
            self.histories[s].append(t)
        return out
