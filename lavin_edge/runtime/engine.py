"""The runtime LLaMA of a merged (fp) or GPTQ-quantized LaVIN model dir: prefill and decode, batch 1.

Runtime model: LLM routing is a constant table after merge, so position 0 (the modality token) is dropped;
every layer applies ``n + U_m (A n + a) + u_m`` to its attention-input RMSNorm output ``n``, m the
sequence's modality (``lavin_edge.modality``). Runtime position p keeps its absolute index p + 1 for the
rotary embedding, so logits equal the unmerged model's.

Read top to bottom: ``prefill_reference`` runs T new positions through every layer, ``decode_step_reference``
one, both through the layer step of ``lavin_edge.runtime.layer`` (the KV cache preallocated in SDPA's [1, heads,
ctx, hd] layout, so no per-step transpose or copy of the cache). With the CPU backend the same step, and a whole
prompt, run in one native call each (``native_decode``), tested against these loops; ``forward`` picks the path.

The ops come from a backend (``lavin_edge.runtime.backends``); the loader (``lavin_edge.runtime.loader``)
reads a model dir and builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lavin_edge.config import LavinConfig
from lavin_edge.modality import IMAGE, TEXT, has_image
from lavin_edge.prompt import ContextError
from lavin_edge.runtime.backends import select_backend
from lavin_edge.runtime.generate import GenerationResult, GenerationStats, generate
from lavin_edge.runtime.layer import layer_step
from lavin_edge.runtime.loader import ModelDirError, build_weights, read_model_dir
from lavin_edge.runtime.sequence import CachedSequence

KV_DTYPE = torch.float16  # the KV cache (keys and values after rotary), see Engine.__init__

if TYPE_CHECKING:
    from lavin_edge.runtime.sampling import GenerationConfig

__all__ = ["ContextError", "Engine", "ModelDirError"]


class Engine(CachedSequence):
    """Batch-1 inference on a merged/quantized LaVIN. The KV cache holds one conversation; ``length`` says
    how many runtime positions are filled, so a new turn can be appended without recomputing history."""

    def __init__(self, cfg: LavinConfig, sd: Mapping[str, torch.Tensor], quant: dict[str, Any] | None = None,
                 backend: str = "auto", max_context: int | None = None, tokenizer: Any = None,
                 position_offset: int = 1, head_w4: bool | None = None, kv_dtype: torch.dtype = KV_DTYPE) -> None:
        self.cfg = cfg
        llm = cfg.llm
        self.backend_impl = select_backend(backend)
        self.backend = self.backend_impl.name
        self.tokenizer = tokenizer
        # Position 0 is gone at run time, so the usable context is what remains after the offset.
        capacity = llm.max_seq_len + 1 - position_offset
        self.max_context = min(max_context or capacity, capacity)
        self.n_heads, self.n_kv, self.hd, self.dim = llm.n_heads, llm.n_kv_heads, llm.head_dim, llm.dim
        w = build_weights(cfg, sd, quant, self.backend_impl, head_w4)
        self.embed, self.norm, self.lm_head, self.head_w4 = w.embed, w.norm, w.lm_head, w.head_w4
        self.layers, self.vision, self.visual_proj = w.layers, w.vision, w.visual_proj
        dev = self.backend_impl.device
        cache_shape = (1, self.n_kv, self.max_context, self.hd)
        # fp16 (KV_DTYPE), as llama.cpp's default cache: half the memory, and half the bytes attention reads per
        # cached position (the native step rounds keys and values as .half() does; the per-op path reads them
        # back to fp32). kv_dtype=torch.float32 keeps exact caches for references (bench quality's fp and exact
        # 4-bit models; the native step then stays off). Uninitialised: every reader stops at the filled length,
        # and zeroing the whole context (189 MB for the demo's 8,192 positions) would be most of a cold start's
        # work after importing torch.
        if kv_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"kv_dtype must be torch.float16 or torch.float32, got {kv_dtype}")
        self.kv_dtype = kv_dtype
        self.kv_cache = [(torch.empty(cache_shape, device=dev, dtype=kv_dtype),
                          torch.empty(cache_shape, device=dev, dtype=kv_dtype)) for _ in self.layers]
        # Rotary as complex numbers for runtime slot p = absolute position p + offset.
        inv = 1.0 / llm.rope_theta ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd)
        pos = torch.arange(position_offset, position_offset + self.max_context, dtype=torch.float64)
        ang = torch.outer(pos, inv)
        self.rope = torch.polar(torch.ones_like(ang), ang).to(dev, torch.complex64)  # [ctx, hd/2]
        self.length = 0
        self.history: list[int] = []  # token ids in the cache (visual slots hold their placeholder ids)
        self.modality = TEXT
        # Per-row modality for the fused adapter kernel: a row range of one of these, never reallocated.
        self.row_modality = [torch.full((self.max_context,), m, dtype=torch.int32, device=dev) for m in (TEXT, IMAGE)]
        # The decode step in one native call when the backend has one; None: decode_step_reference.
        self.native_decode = self.backend_impl.native_decode(self)

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", max_context: int | None = None,
             head_w4: bool | None = None, kv_dtype: torch.dtype = KV_DTYPE) -> Engine:
        d = read_model_dir(path)
        return cls(d.lavin, d.tensors, d.quant, backend, max_context, d.tokenizer, d.position_offset, head_w4,
                   kv_dtype)

    @property
    def n_visual(self) -> int:
        return self.cfg.vision.n_tokens

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (linears + lm_head; embeddings read one row)."""
        per_layer = sum(op.nbytes for lyr in self.layers for op in (lyr.wqkv, lyr.wo, lyr.w13, lyr.w2))
        return per_layer + self.lm_head.nbytes

    # -- inputs -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """A preprocessed image [3, S, S] -> the visual token embeddings [n_visual, D]."""
        if self.vision is None or self.visual_proj is None:
            raise ModelDirError("this model has no vision tower (text-only export)")
        return self.visual_proj(self.vision(image[None].float()))[0].float()

    def embed_prompt(self, ids: list[int], image_pos: int = -1, visual: torch.Tensor | None = None
                     ) -> torch.Tensor:
        h = self.embed[torch.tensor(ids, dtype=torch.long)].float()
        if has_image(image_pos):
            if visual is None:
                raise ValueError("image_pos given without visual tokens")
            h[image_pos:image_pos + visual.shape[0]] = visual
        return h

    # -- forward ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, h: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Embeddings h [T, D] at runtime positions length..length+T-1 -> logits ([V] or [T, V])."""
        t = h.shape[0]
        if self.length + t > self.max_context:
            raise ContextError(f"{self.length + t} positions exceed the context of {self.max_context}")
        if self.native_decode is not None and (t == 1 or last_only):
            if t == 1:
                logits = self.native_decode.step(h, self.length, self.modality)
            else:
                logits = self.native_decode.prefill(h, 0, self.length, self.modality)
            self.length += t
            return logits
        if t > 1:
            return self.prefill_reference(h, last_only)
        return self.decode_step_reference(h)

    def prefill_reference(self, h: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """T new positions after the cached ones; causal attention over history + themselves. The reference of
        the native prefill (which gives the last position's logits only), and the path of every-position
        logits and of the torch backend."""
        t = h.shape[0]
        start, end = self.length, self.length + t
        nh, hd, m = self.n_heads, self.hd, self.modality
        row_mod = self.row_modality[m]
        mask = None
        if start > 0:
            # Appending a turn: new queries see the whole history plus themselves causally.
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        x = h.float().contiguous()
        for lyr, (k_cache, v_cache) in zip(self.layers, self.kv_cache, strict=True):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor = k_cache,
                       v_cache: torch.Tensor = v_cache) -> torch.Tensor:
                k_cache[0, :, start:end] = k.transpose(0, 1)
                v_cache[0, :, start:end] = v.transpose(0, 1)
                att = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_cache[:, :, :end].float(),
                                                     v_cache[:, :, :end].float(), attn_mask=mask,
                                                     is_causal=start == 0, enable_gqa=self.n_kv != nh)
                return att[0].transpose(0, 1).reshape(t, nh * hd)

            x = layer_step(lyr, x, self.rope[start:end, None, :], lambda op, y: op(y, m, row_mod), attend, nh,
                           self.n_kv, hd)
        self.length = end
        if last_only:
            x = x[-1:].contiguous()
        logits = self.lm_head(self.norm(x, m, row_mod))
        return logits[0] if last_only else logits

    def decode_step_reference(self, h: torch.Tensor) -> torch.Tensor:
        """One decode step (h [1, D]) op by op: the reference of ``native_decode`` and the path of the torch
        backend. The KV cache is preallocated in SDPA's [1, heads, ctx, hd] layout: no per-step transpose or
        copy of the cache."""
        nh, hd, m = self.n_heads, self.hd, self.modality
        pos = self.length
        row_mod = self.row_modality[m]
        x = h.float()
        for lyr, (k_cache, v_cache) in zip(self.layers, self.kv_cache, strict=True):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor = k_cache,
                       v_cache: torch.Tensor = v_cache) -> torch.Tensor:
                k_cache[0, :, pos] = k[0]
                v_cache[0, :, pos] = v[0]
                att = F.scaled_dot_product_attention(q.view(1, nh, 1, hd), k_cache[:, :, :pos + 1].float(),
                                                     v_cache[:, :, :pos + 1].float(), enable_gqa=self.n_kv != nh)
                return att.view(1, nh * hd)

            x = layer_step(lyr, x, self.rope[pos:pos + 1, None, :], lambda op, y: op(y, m, row_mod), attend, nh,
                           self.n_kv, hd)
        self.length = pos + 1
        return self.lm_head(self.norm(x, m, row_mod))[0]

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, new_ids: list[int], gen: GenerationConfig, image_pos: int = -1,
                 visual: torch.Tensor | None = None, on_text: Callable[[str], None] | None = None,
                 stats: GenerationStats | None = None, stop_ids: set[int] | None = None) -> GenerationResult:
        """Prefill ``new_ids`` after the cached history, then decode (``lavin_edge.runtime.generate``)."""
        return generate(self, new_ids, gen, image_pos, visual, on_text, stats, stop_ids)

