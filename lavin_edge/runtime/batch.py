"""Batched decode over per-slot KV caches: up to ``slots`` sequences, each with its own length and modality,
advance one token together in one step (continuous batching; ``lavin_edge.serve`` schedules it).

One step runs every linear once for all active rows (the W4 GEMM with m = active rows reads each weight
once per step instead of once per sequence), the fused norm + adapter kernel with each row's own modality
(a text row and an image row in one call), and attention per row over that slot's own cache length.
With the CPU backend the whole step, head and the head's exact re-scoring included, is one native call
(``DecodeStack.step_rows``, csrc/decode.cpp, built over this object's caches by ``native_decode``): the same
per-op step in Python costs more in dispatch than a small model's arithmetic, so one client decoded slower
than ``chat`` and the batch gained less. ``step_reference`` keeps the per-op PyTorch step as the readable
reference (and the torch backend's path); tests/test_serve_batch.py holds the two together.

Rows never interact, so a sequence's logits do not depend on what else is in the batch: the W4 kernel
quantizes activations per row and accumulates each row in its own registers in the same order for
any m; the adapter kernel runs row by row; attention is one call per row over exactly that row's keys; the
head's re-scoring sums in fp64. (tests/test_serve_batch.py checks bitwise equality against the same
sequence decoded alone, and the native step against ``chat``'s single-sequence step.)

Prefill is one sequence at a time: in one native call into that slot of the batched cache
(``DecodeStack.prefill``), or without the extension through the engine's own code on a slot view, a shallow
copy of the engine whose KV cache is that slot's [1, kv_heads, ctx, head_dim] slice of the batched cache
(same weights, no copy).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lavin_edge.modality import TEXT, has_image
from lavin_edge.runtime.engine import ContextError, Engine
from lavin_edge.runtime.layer import layer_step
from lavin_edge.runtime.ops import NormAdapter

__all__ = ["BatchDecoder"]


def norm_rows(norm: NormAdapter, x: torch.Tensor, row_mod: torch.Tensor, mods: list[int]) -> torch.Tensor:
    """A norm (+ folded adapter) over rows of mixed modality. The fused kernel takes per-row modality; the
    PyTorch reference takes one modality per call, so rows are grouped by modality there."""
    if norm.isa is not None or norm.plain:
        return norm(x, mods[0], row_mod)
    if len(set(mods)) == 1:
        return norm.prepared.reference(x, mods[0])
    out = torch.empty_like(x)
    for m in set(mods):
        idx = torch.tensor([i for i, r in enumerate(mods) if r == m])
        out[idx] = norm.prepared.reference(x[idx], m)
    return out


class BatchDecoder:
    """``slots`` sequences over one loaded ``Engine``'s weights. ``prefill(slot, ...)`` starts a sequence in a
    slot; ``step(slots, tokens)`` feeds one token to each listed slot and returns their logits [m, vocab]."""

    def __init__(self, engine: Engine, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.engine = engine
        self.slots = slots
        shape = (slots, engine.n_kv, engine.max_context, engine.hd)
        dev = engine.rope.device  # where the engine keeps its state (only the CPU is served and tested)
        def cache() -> torch.Tensor:  # uninitialised, as the engine's: readers stop at each row's length
            return torch.empty(shape, device=dev, dtype=engine.kv_dtype)

        self.kv_cache = [(cache(), cache()) for _ in engine.layers]
        self.views = [self._slot_view(s) for s in range(slots)]
        # The whole step in one native call over these caches when the backend has one (None: step_reference).
        self.native = engine.backend_impl.native_decode(engine, self.kv_cache)
        # Prompts go through a second stack over the same caches: its own scratch buffers, so a prefill on the
        # server's prefill thread runs beside the decode loop's steps (the two write different slots).
        self.native_prefill = engine.backend_impl.native_decode(engine, self.kv_cache) if self.native else None

    def _slot_view(self, slot: int) -> Engine:
        view = copy.copy(self.engine)
        view.kv_cache = [(k[slot:slot + 1], v[slot:slot + 1]) for k, v in self.kv_cache]
        view.native_decode = None  # the native stack holds the base engine's cache addresses, not this slot's
        view.history = []
        view.length = 0
        view.modality = TEXT
        return view

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def length(self, slot: int) -> int:
        return self.views[slot].length

    def modality(self, slot: int) -> int:
        return self.views[slot].modality

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], modality: int = TEXT, image_pos: int = -1,
                visual: torch.Tensor | None = None) -> torch.Tensor:
        """Start a new sequence in ``slot`` (its previous one is dropped): logits [vocab] after ``ids``."""
        view = self.views[slot]
        view.reset(modality)
        h = view.embed_prompt(ids, image_pos if has_image(image_pos) else -1, visual)
        if self.native_prefill is None:
            logits = view.forward(h)
        else:
            if len(ids) > self.max_context:
                raise ContextError(f"{len(ids)} positions exceed the context of {self.max_context}")
            logits = self.native_prefill.prefill(h, slot, 0, modality)
            view.length = len(ids)
        view.history.extend(ids)
        return logits

    def _check(self, slots: list[int], tokens: list[int]) -> list[int]:
        """The rows' positions, after checking the step is valid."""
        m = len(slots)
        if m == 0 or m != len(tokens) or len(set(slots)) != m:
            raise ValueError(f"step needs distinct slots and one token each, got slots={slots} tokens={tokens}")
        pos = [self.views[s].length for s in slots]
        for s, p in zip(slots, pos, strict=True):
            if p == 0:
                raise ValueError(f"slot {s} holds no sequence (prefill it first)")
            if p >= self.engine.max_context:
                raise ContextError(f"slot {s}: {p + 1} positions exceed the context of {self.engine.max_context}")
        return pos

    def _advance(self, slots: list[int], tokens: list[int]) -> None:
        for s, t in zip(slots, tokens, strict=True):
            self.views[s].length += 1
            self.views[s].history.append(t)

    @torch.inference_mode()
    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` to ``slots[i]`` at that slot's next position, all rows in one pass; logits
        [m, vocab]. Slots must be distinct and hold a prefilled sequence with room for one more token."""
        if self.native is None:
            return self.step_reference(slots, tokens)
        pos = self._check(slots, tokens)
        x = self.engine.embed[torch.tensor(tokens, dtype=torch.long)].float()
        logits = self.native.step_rows(x, slots, pos, [self.views[s].modality for s in slots])
        self._advance(slots, tokens)
        return logits

    @torch.inference_mode()
    def step_reference(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """``step`` op by op in PyTorch and the extension's per-op kernels: the reference of the native step, and
        the path of the torch backend."""
        eng = self.engine
        pos = self._check(slots, tokens)
        mods = [self.views[s].modality for s in slots]
        nh, hd = eng.n_heads, eng.hd
        slot_idx, pos_idx = torch.tensor(slots), torch.tensor(pos)
        row_mod = torch.tensor(mods, dtype=torch.int32)
        x = eng.embed[torch.tensor(tokens, dtype=torch.long)].float()
        for lyr, (k_cache, v_cache) in zip(eng.layers, self.kv_cache, strict=True):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor = k_cache,
                       v_cache: torch.Tensor = v_cache) -> torch.Tensor:
                k_cache[slot_idx, :, pos_idx] = k.to(k_cache.dtype)
                v_cache[slot_idx, :, pos_idx] = v.to(v_cache.dtype)
                att = torch.empty(len(slots), nh * hd)
                for i, (s, p) in enumerate(zip(slots, pos, strict=True)):
                    # One call per row over exactly its own keys: no padding, so no row sees another's length.
                    a = F.scaled_dot_product_attention(q[i].view(1, nh, 1, hd), k_cache[s:s + 1, :, :p + 1].float(),
                                                       v_cache[s:s + 1, :, :p + 1].float(), enable_gqa=eng.n_kv != nh)
                    att[i] = a.view(nh * hd)
                return att

            x = layer_step(lyr, x, eng.rope[pos_idx][:, None, :], lambda op, y: norm_rows(op, y, row_mod, mods), attend,
                           nh, eng.n_kv, hd)
        logits = eng.lm_head(norm_rows(eng.norm, x, row_mod, mods))
        self._advance(slots, tokens)
        return logits
