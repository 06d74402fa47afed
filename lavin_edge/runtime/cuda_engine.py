"""The CUDA engine: a merged or quantized LaVIN model on one device, decode written for CUDA graphs.

Same model as ``Engine`` (lavin_edge.runtime.engine, the reference), computed in another way:

- weights loaded once onto the device (``cuda_weights``): W4 repacked at load (``prepare_w4_cuda``), fp linears
  and the head in fp16, the vision tower in fp16 with its routed adapters on the kernel;
- an fp16 activation stream with an fp32 residual: every norm (+ folded adapter) reads the fp32 residual and
  writes fp16 rows; every linear reads fp16 and its output is added into the fp32 residual (``out=``);
  rotary and the head's re-scored candidates are fp32; the KV cache is fp16 (as ``Engine``'s default);
- decode (``decode_step``): token ids, positions and per-row modality are device tensors (``cuda_state``);
  keys and values are written with ``index_put_`` at the device position and attention runs over a fixed
  span of the cache, masked by position. Nothing in the step reads a number back to Python, so on CUDA it is
  captured once per span as a ``torch.cuda.CUDAGraph`` and replayed per token; on the CPU it is called.
  Sampling runs on the device after the step (``device_sampling``); one token id per step is copied back;
- prefill (``prefill``): each 4-bit linear is dequantized to fp16 into one scratch buffer and multiplied by
  ``torch.matmul``; attention is ``scaled_dot_product_attention`` (causal, or masked when a turn is appended).

On CPU tensors (CI, and machines without a GPU) the same class runs the same code: the kernel table
(lavin_edge.kernels.cuda) maps each CUDA kernel to its PyTorch reference, and there is no graph (the step is
called). What differs on the CPU: the W4 products and the norm + adapter are the references (the reference
computes in fp32 and rounds its output to fp16, where the GEMV kernel accumulates fp16 products in fp32); fp16
``matmul`` and ``scaled_dot_product_attention`` are PyTorch's CPU kernels (fp32 accumulation); the vision
tower's convolutions are PyTorch's fp16 CPU kernels. Every rounding to fp16 of the activation stream happens at
the same places on both devices. tests/test_cuda_engine.py checks this class on the CPU against ``Engine``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lavin_edge.config import LavinConfig
from lavin_edge.modality import TEXT, has_image
from lavin_edge.prompt import ContextError
from lavin_edge.runtime.cuda_state import DecodeState, rotate
from lavin_edge.runtime.cuda_weights import DeviceWeights, apply_norm, load_device_weights
from lavin_edge.runtime.loader import ModelDirError, read_model_dir
from lavin_edge.runtime.sequence import CachedSequence

__all__ = ["CudaEngine", "engine_for"]


class CudaEngine(CachedSequence):
    """Inference on ``device`` ("cuda", or "cpu": the same code on CPU tensors, as CI runs it). One sequence with
    ``Engine``'s interface for ``ChatSession`` (reset, rewind, history, modality, length, encode_image,
    embed_prompt, generate); with ``slots`` > 1 the decode step runs that many rows, serve's batch
    (``cuda_batch.CudaBatchDecoder``). ``graphs``: replay the decode step from CUDA graphs (default: on CUDA)."""

    def __init__(self, cfg: LavinConfig, sd: Any, quant: dict[str, Any] | None = None, device: str = "cuda",
                 max_context: int | None = None, tokenizer: Any = None, position_offset: int = 1,
                 graphs: bool | None = None, slots: int = 1) -> None:
        llm = cfg.llm
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device = torch.device(device)
        self.backend = f"cuda-engine on {self.device.type}"
        capacity = llm.max_seq_len + 1 - position_offset
        self.max_context = min(max_context or capacity, capacity)
        self.n_heads, self.n_kv, self.hd, self.dim = llm.n_heads, llm.n_kv_heads, llm.head_dim, llm.dim
        self.w: DeviceWeights = load_device_weights(cfg, sd, quant, self.device)
        # ``slots`` rows per decode step (one sequence each): 1 for chat, a batch for serve (cuda_batch).
        self.state = DecodeState(llm.n_layers, slots, self.n_kv, self.max_context, self.hd, llm.rope_theta,
                                 position_offset, self.device)
        self.scratch = torch.empty(self.w.scratch_numel(), dtype=torch.float16, device=self.device)
        self.ffn = self.w.layers[0].w13.n_out // 2
        self.length = 0
        self.history: list[int] = []
        self.modality = TEXT
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @classmethod
    def load(cls, path: str | Path, device: str = "cuda", max_context: int | None = None,
             graphs: bool | None = None, slots: int = 1) -> CudaEngine:
        d = read_model_dir(path)
        return cls(d.lavin, d.tensors, d.quant, device, max_context, d.tokenizer, d.position_offset, graphs, slots)

    @property
    def vocab_size(self) -> int:
        return self.w.embed.shape[0]

    @property
    def embed(self) -> torch.Tensor:
        return self.w.embed

    @property
    def vision(self) -> torch.nn.Module | None:
        return self.w.vision

    @property
    def n_visual(self) -> int:
        return self.cfg.vision.n_tokens

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (linears + head)."""
        return sum(op.nbytes for op in self.w.linears()) + self.w.head.nbytes

    # -- inputs ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """A preprocessed image [3, S, S] -> visual token embeddings [n_visual, D] (fp32 on the device), the
        tower and projection in fp16."""
        if self.w.vision is None or self.w.visual_proj is None:
            raise ModelDirError("this model has no vision tower (text-only export)")
        x = image[None].to(self.device, torch.float16)
        return self.w.visual_proj(self.w.vision(x))[0].float()

    def embed_prompt(self, ids: list[int], image_pos: int = -1, visual: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Embeddings [T, D] fp32 on the device; visual tokens replace the rows from ``image_pos``."""
        h = self.w.embed[torch.tensor(ids, dtype=torch.long, device=self.device)].float()
        if has_image(image_pos):
            if visual is None:
                raise ValueError("image_pos given without visual tokens")
            h[image_pos:image_pos + visual.shape[0]] = visual.to(self.device, torch.float32)
        return h

    # -- prefill --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, h: torch.Tensor) -> torch.Tensor:
        """Embeddings h [T, D] at positions length..length+T-1 (T >= 1) -> the last position's logits [V] fp32."""
        logits = self.prefill_slot(h, 0, self.length, self.modality)
        self.length += h.shape[0]
        return logits

    @torch.inference_mode()
    def prefill_slot(self, h: torch.Tensor, slot: int, start: int, modality: int) -> torch.Tensor:
        """``prefill`` into row ``slot`` of the caches at positions start..start+T-1, routed as ``modality``.
        Python-int positions are fine here: a prefill is not captured."""
        t = h.shape[0]
        end = start + t
        if end > self.max_context:
            raise ContextError(f"{end} positions exceed the context of {self.max_context}")
        st, nh, nkv, hd = self.state, self.n_heads, self.n_kv, self.hd
        row_mod = st.prompt_mod[modality][:t]
        cos, sin = st.cos[start:end, None, :], st.sin[start:end, None, :]
        qk_w = (nh + nkv) * hd
        mask = None
        if start > 0:  # an appended turn: its queries see the history and themselves causally
            mask = st.positions[None, :end] <= st.positions[start:end, None]
        x = h.to(self.device, torch.float32).contiguous()
        for lyr, (kc, vc) in zip(self.w.layers, st.kv, strict=True):
            qkv = lyr.wqkv.prefill(apply_norm(lyr.attn_in, x, row_mod), self.scratch)
            qk = rotate(qkv[:, :qk_w].view(t, nh + nkv, hd), cos, sin).half()
            kc[slot, :, start:end] = qk[:, nh:].transpose(0, 1)
            vc[slot, :, start:end] = qkv[:, qk_w:].view(t, nkv, hd).transpose(0, 1)
            att = F.scaled_dot_product_attention(qk[:, :nh].transpose(0, 1)[None], kc[slot:slot + 1, :, :end],
                                                 vc[slot:slot + 1, :, :end], attn_mask=mask, is_causal=start == 0,
                                                 enable_gqa=nkv != nh)
            lyr.wo.prefill(att[0].transpose(0, 1).reshape(t, nh * hd), self.scratch, out=x)
            g = lyr.w13.prefill(apply_norm(lyr.ffn_norm, x, row_mod), self.scratch)
            lyr.w2.prefill(F.silu(g[:, :self.ffn]) * g[:, self.ffn:], self.scratch, out=x)
        last = x[-1:].contiguous()
        return self.w.head(apply_norm(self.w.norm, last, row_mod[:1]))[0]

    # -- decode ---------------------------------------------------------------------------------------
    def decode_step(self, span: int) -> torch.Tensor:
        """One token per row: reads ``state.tok`` at ``state.pos`` (device tensors), writes that position's keys
        and values, attends over cache positions [0, span) masked to <= pos; logits [slots, V] fp32. ``span``
        is fixed per captured graph; nothing here depends on the values in the buffers (graph-capturable,
        tests/test_cuda_engine.py compiles it with fullgraph=True)."""
        st, w = self.state, self.w
        nh, nkv, hd = self.n_heads, self.n_kv, self.hd
        m = st.slots
        qk_w = (nh + nkv) * hd
        x = w.embed.index_select(0, st.tok).float()  # [m, D] fp32 residual
        cos, sin = st.cos.index_select(0, st.pos)[:, None, :], st.sin.index_select(0, st.pos)[:, None, :]
        mask = (st.positions[None, :span] <= st.pos[:, None])[:, None, None, :]  # [m, 1, 1, span]
        where = (st.rows[:, None], st.heads[None, :], st.pos[:, None])  # [m, n_kv] cache rows of this step
        for lyr, (kc, vc) in zip(w.layers, st.kv, strict=True):
            qkv = lyr.wqkv(apply_norm(lyr.attn_in, x, st.row_mod))  # [m, (nh + 2 nkv) hd] fp16
            qk = rotate(qkv[:, :qk_w].view(m, nh + nkv, hd), cos, sin).half()
            kc.index_put_(where, qk[:, nh:])
            vc.index_put_(where, qkv[:, qk_w:].view(m, nkv, hd))
            # GQA without repeating keys: the query heads sharing a key head are that head's "query rows".
            att = F.scaled_dot_product_attention(qk[:, :nh].view(m, nkv, nh // nkv, hd), kc[:, :, :span],
                                                 vc[:, :, :span], attn_mask=mask)
            lyr.wo(att.reshape(m, nh * hd), out=x)
            g = lyr.w13(apply_norm(lyr.ffn_norm, x, st.row_mod))
            lyr.w2(F.silu(g[:, :self.ffn]) * g[:, self.ffn:], out=x)
        return w.head(apply_norm(w.norm, x, st.row_mod))

    def run_step(self, span: int) -> torch.Tensor:
        """``decode_step`` for ``span``: on CUDA captured once per span and replayed; else called."""
        if not self.use_graphs:
            return self.decode_step(span)
        if span not in self._graphs:
            self._graphs[span] = self._capture(span)
        graph, logits = self._graphs[span]
        graph.replay()
        return logits

    def _capture(self, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream (PyTorch's recipe: lazy initialisation must not happen during capture). It
        # rewrites the current position's keys and values with the values the replay writes again.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.decode_step(span)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: serve encodes images on its event-loop thread while the decode thread may be capturing.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = self.decode_step(span)
        return graph, logits

    @torch.inference_mode()
    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token (an id, or an int64 tensor of one id on the device) at the next position; its
        logits [V] fp32 on the device."""
        if self.length >= self.max_context:
            raise ContextError(f"{self.length + 1} positions exceed the context of {self.max_context}")
        st = self.state
        if isinstance(token, torch.Tensor):
            st.tok.copy_(token.view(1))
        else:
            st.tok.fill_(token)
        st.pos.fill_(self.length)
        st.row_mod.fill_(self.modality)
        logits = self.run_step(st.span_for(self.length))
        self.length += 1
        # A graph's output buffer is rewritten by the next replay: the caller gets its own copy.
        return logits[0].clone() if self.use_graphs else logits[0]

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """``Engine.forward``'s prefill: embeddings h [T, D] -> the last position's logits [V]."""
        if not last_only:
            raise ValueError("the CUDA engine gives the last position's logits only")
        return self.prefill(h)

    # -- generation -----------------------------------------------------------------------------------
    def generate(self, new_ids: list[int], gen: Any, image_pos: int = -1, visual: torch.Tensor | None = None,
                 on_text: Callable[[str], None] | None = None, stats: Any = None,
                 stop_ids: set[int] | None = None) -> Any:
        """Prefill ``new_ids`` after the cached history, then decode (``cuda_generate``)."""
        from lavin_edge.runtime.cuda_generate import generate

        return generate(self, new_ids, gen, image_pos, visual, on_text, stats, stop_ids)


def engine_for(path: str | Path, device: str, max_context: int | None = None, **engine_kw: Any) -> Any:
    """The engine of a command for a resolved ``device``: ``CudaEngine`` on "cuda" (``engine_kw``, the CPU engine's
    backend and head options, do not apply there), else ``Engine`` with ``engine_kw``."""
    if device == "cuda":
        return CudaEngine.load(path, "cuda", max_context)
    from lavin_edge.runtime import Engine

    return Engine.load(path, max_context=max_context, **engine_kw)

