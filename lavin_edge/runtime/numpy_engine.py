"""A quantized model dir served on the extension with NumPy arrays alone, without importing PyTorch: what a
one-shot ``lavin-edge chat --prompt`` runs, so that its cold start is not ``import torch``.

``Engine`` (``lavin_edge.runtime.engine``) is the reference; this class runs the same native code on the same
prepared weights, so its logits are the engine's native ones bit for bit up to the vision tower (NumPy here,
PyTorch there: ~1e-6 relative) and the rotary table (NumPy's cos/sin here):

- the model dir is read through ``lavin_edge.modeldir`` (config, validation, tokenizer) and its tensors through
  a read-only memory map of ``model.safetensors`` (``read_safetensors``): the 4-bit weights are read once to be
  tiled, the embedding table only where rows are looked up;
- every 4-bit linear is tiled by ``lavin_edge.kernels.tiling`` (what ``prepare_w4`` calls too) and the whole
  prompt and each new token run through the extension's ``DecodeStack`` (``prefill`` and ``step``), the lm_head
  as its stored two 4-bit passes with the top logits re-scored from the fp rows, as ``Engine`` serves it;
- the image goes through ``lavin_edge.runtime.numpy_vision``.

What it does not cover raises ``Unsupported`` at load (the caller then uses ``Engine``): a merged fp dir, a
linear whose groups the tiled kernels do not take, an lm_head without its stored 4-bit form, a ViT tower, 16-bit
brain-float tensors (NumPy has no such type), no extension.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lavin_edge.decoding import decode
from lavin_edge.kernels import tiling
from lavin_edge.kernels.decode import fill_stack, linear_parts, new_decode_stack, norm_weights
from lavin_edge.kernels.dispatch import backend, extension, gemv_threads
from lavin_edge.modality import IMAGE, TEXT, has_image
from lavin_edge.modeldir import (
    HEAD_PARTS,
    HEAD_RESCORE_TOP,
    TENSORS_FILE,
    lavin_config,
    load_tokenizer_of,
    quant_settings,
    read_config,
    validate_tensors,
)
from lavin_edge.prompt import ContextError

_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "I8": np.int8}


class Unsupported(Exception):
    """A model this engine does not serve (the reason says why); ``Engine`` serves it."""


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only arrays over one memory map of it (no copy; the safetensors
    package copies every tensor on load, the demo's 224 MB). The format: an 8-byte little-endian header length,
    a JSON header {name: {dtype, shape, data_offsets}}, then the data."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8:8 + n])
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise Unsupported(f"tensor {name} is {meta['dtype']}")
        begin, end = meta["data_offsets"]
        a = np.frombuffer(buf, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize, offset=8 + n + begin)
        out[name] = a.reshape(meta["shape"])
    return out


@dataclass
class _Prepared:
    """The stack's arguments and every array they point into (kept alive while the stack lives)."""

    keep: list[Any] = field(default_factory=list)

    def f32(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.float32)
        self.keep.append(a)
        return a


class NumpyEngine:
    """One sequence on a quantized model dir: ``encode_image`` and ``generate`` (greedy)."""

    def __init__(self, path: str | Path, max_context: int | None = None, threads: int | None = None) -> None:
        ext = extension()
        if ext is None or not hasattr(ext, "DecodeStack"):
            raise Unsupported("the extension is not built")
        isa = backend()
        if isa == "torch":
            raise Unsupported("the PyTorch kernels are forced")
        path = Path(path)
        raw = read_config(path)
        if "quantization_config" not in raw:
            raise Unsupported("not a quantized model dir")
        cfg = lavin_config(raw, path)
        q = quant_settings(raw)
        if not q.get("lm_head_w4"):
            raise Unsupported("the lm_head has no stored 4-bit form")
        sd = read_safetensors(path / TENSORS_FILE)
        validate_tensors(cfg, sd, q, str(path))
        llm = cfg.llm
        if not llm.tie_embeddings and "output.weight" not in sd:
            raise Unsupported("a quantized untied lm_head")
        self.cfg, self.ext, self.isa = cfg, ext, isa
        self.threads = threads or int(ext.max_threads())
        self.tokenizer = load_tokenizer_of(path, raw)
        self.dim, self.n_heads, self.n_kv, self.hd = llm.dim, llm.n_heads, llm.n_kv_heads, llm.head_dim
        offset = int(raw.get("position_offset", 1))
        capacity = llm.max_seq_len + 1 - offset
        self.max_context = min(max_context or capacity, capacity)
        self.embed = sd["tok_embeddings.weight"]
        if self.embed.dtype != np.float32:
            raise Unsupported(f"embeddings stored as {self.embed.dtype}")
        self.sd, self.q, self.offset = sd, q, offset
        self.vision = None
        if any(k.startswith("vision.") for k in sd):
            if cfg.vision.kind != "efficientnet":
                raise Unsupported(f"a {cfg.vision.kind} vision tower")
            from lavin_edge.runtime.numpy_vision import NumpyVision

            self.vision = NumpyVision(cfg.vision, cfg.adapter, {k: v for k, v in sd.items() if
                                                                 k.startswith(("vision.", "visual_proj."))},
                                      ext, isa, self.threads)
        # Each linear tiled once, before the stack (the stack is built per answer, with a cache as long as it).
        self.prep = _Prepared()
        self.layers = [self._layer(i) for i in range(llm.n_layers)]
        self.head_norm = self._norm(sd["norm.weight"], None)
        head_q = {"checkpoint_format": q["lm_head_w4"].get("checkpoint_format", "gptq"),
                  "group_size": int(q["lm_head_w4"]["group_size"])}
        self.head = linear_parts([self._w4(p, head_q) for p in HEAD_PARTS], summed=True)
        self.rescore = self.prep.f32(sd["output.weight"]) if "output.weight" in sd else self.embed

    @property
    def n_visual(self) -> int:
        return self.cfg.vision.n_tokens

    # -- weights ----------------------------------------------------------------------------------------
    def _w4(self, name: str, q: dict[str, Any]) -> tuple[Any, int, int]:
        """One 4-bit linear tiled (``tiling.tile_linear``, what ``prepare_w4`` calls): (descriptor, outputs,
        GEMV threads)."""
        sd = self.sd
        qweight = sd[name + ".qweight"]
        n, k = qweight.shape[1], qweight.shape[0] * 8
        gs = k if q["group_size"] <= 0 else q["group_size"]
        a = tiling.tile_linear(self.ext, qweight, sd[name + ".qzeros"], sd[name + ".scales"], sd.get(name + ".g_idx"),
                               gs, q["checkpoint_format"], self.threads)
        if a is None:
            raise Unsupported(f"{name}: groups the tiled kernels do not take")
        self.prep.keep.append(a)
        return a.native, n, gemv_threads(n, k, self.threads)

    def _norm(self, g: np.ndarray, adapter: tuple[np.ndarray, ...] | None) -> Any:
        """RMSNorm (+ the folded adapter of each modality; a bare norm runs as a zero rank-1 adapter)."""
        d = self.dim
        if adapter is None:
            adapter = (np.zeros((1, d)), np.zeros(1), np.zeros((2, d, 1)), np.zeros((2, d)))
        return norm_weights(self.prep.f32(g), *(self.prep.f32(t) for t in adapter), self.cfg.llm.norm_eps)

    def _layer(self, i: int) -> tuple[Any, ...]:
        p, sd = f"layers.{i}.", self.sd
        ad = tuple(sd[p + "adapter." + n] for n in ("down.weight", "down.bias", "up.weight", "up.bias"))
        groups = (("attention.wq", "attention.wk", "attention.wv"), ("attention.wo",),
                  ("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",))
        return (self._norm(sd[p + "attention_norm.weight"], ad), self._norm(sd[p + "ffn_norm.weight"], None),
                *(linear_parts([self._w4(p + name, self.q) for name in names]) for names in groups))

    def _stack(self, ctx: int) -> tuple[Any, list[np.ndarray]]:
        """A decode stack with a KV cache of ``ctx`` positions (and the arrays it points into)."""
        llm, hd = self.cfg.llm, self.hd
        inv = 1.0 / llm.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = np.outer(np.arange(self.offset, self.offset + ctx, dtype=np.float64), inv)
        rope = np.ascontiguousarray(np.stack([np.cos(ang), np.sin(ang)], -1), dtype=np.float32)
        caches = [(np.empty((1, self.n_kv, ctx, hd), dtype=np.float16), np.empty((1, self.n_kv, ctx, hd),
                                                                                   dtype=np.float16))
                  for _ in self.layers]
        stack = new_decode_stack(self.isa, self.dim, self.n_heads, self.n_kv, hd, llm.ffn_dim, ctx, llm.vocab_size,
                                 llm.norm_eps, rope, self.threads, 1)
        fill_stack(stack, self.layers, caches, self.head_norm, self.head, (self.rescore, "float32", HEAD_RESCORE_TOP))
        return stack, [rope, *(c for kv in caches for c in kv)]

    # -- inputs and generation --------------------------------------------------------------------------
    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """A preprocessed image [3, S, S] -> the visual token embeddings [n_visual, dim]."""
        if self.vision is None:
            raise Unsupported("this model has no vision tower")
        return self.vision.tokens(image)

    def generate(self, ids: list[int], image_pos: int, visual: np.ndarray | None, max_new_tokens: int,
                 stop_ids: set[int], on_token: Callable[[int], bool]) -> str:
        """Greedy: prefill ``ids`` (with ``visual`` at ``image_pos``), then decode until a stop id,
        ``max_new_tokens`` or ``on_token`` returning False (a stop string); returns why it stopped."""
        room = self.max_context - len(ids)
        if room < 1:
            raise ContextError(f"prompt of {len(ids)} tokens does not fit: context {self.max_context}")
        budget = min(max_new_tokens, room)
        stack, keep = self._stack(len(ids) + budget)  # keep: the cache and rotary table the stack points into
        modality = IMAGE if has_image(image_pos) else TEXT
        h = self.embed[np.asarray(ids, dtype=np.int64)]  # a copy (fancy indexing): the stack overwrites it
        if has_image(image_pos):
            assert visual is not None
            h[image_pos:image_pos + visual.shape[0]] = visual
        logits = np.empty(self.cfg.llm.vocab_size, dtype=np.float32)
        stack.prefill(h.ctypes.data, len(ids), 0, 0, modality, logits.ctypes.data)
        x = np.empty(self.dim, dtype=np.float32)
        pos = len(ids)

        def step(picks: list[int]) -> list[int]:
            nonlocal pos
            x[:] = self.embed[picks[0]]
            stack.step(x.ctypes.data, pos, modality, logits.ctypes.data)
            pos += 1
            return [int(logits.argmax())]

        (reason,), _ = decode([int(logits.argmax())], step, stop_ids, budget, lambda _row, token: on_token(token))
        return reason
