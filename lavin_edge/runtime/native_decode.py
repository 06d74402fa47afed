"""The whole decode step in one native call (``DecodeStack``, csrc/decode.cpp), for one sequence (the engine)
or for the m rows of a continuous batch (``lavin_edge.runtime.batch.BatchDecoder``); and a whole prompt's
prefill in one call, in chunks of rows of that sequence, bitwise the same as stepping it token by token.

``Model.decode_step_reference`` is the reference: ~20 PyTorch ops and kernel calls per layer. On a small
model each costs more in Python dispatch than its arithmetic, so when every linear of the model runs on the
extension's W4 kernel the CPU backend hands the step to ``DecodeStack``, which runs the same ops (norm +
folded adapter, q|k|v, rotary, cache write, GQA attention, o, norm, gate|up, SwiGLU, down, final norm, head and
the head's exact re-scoring of its top logits)
back to back in C++ on preallocated buffers. It takes the ops' prepared descriptors (``W4Linear.prepared``,
``NormAdapter.prepared``), the same objects the per-op path calls.

The stack keeps raw addresses of the model's tensors (weights, KV cache, rotary table), so this object
holds references to all of them for as long as it lives."""

from __future__ import annotations

from typing import Any

import torch

from lavin_edge.kernels.decode import fill_stack, linear_parts, native_decode_available, new_decode_stack
from lavin_edge.runtime.ops import ConcatLinear, LinearOp, NormAdapter, RescoredHead, SumLinear, W4Linear


def op_parts(op: LinearOp, keep: list[Any]) -> list[Any] | None:
    """The stack's parts for one linear op, or None when any piece does not run on the tiled W4 kernel (an fp
    weight, a dense-fallback layout, the torch backend)."""
    subs = [op] if isinstance(op, W4Linear) else list(op.ops) if isinstance(op, (ConcatLinear, SumLinear)) else []
    if not subs or not all(isinstance(w, W4Linear) and w.native is not None and w.isa != "torch" for w in subs):
        return None
    keep += [w.prepared for w in subs]
    # The GEMV's own thread choice (one thread below SMALL_WEIGHTS): measured on 2 cores, giving every
    # SmolLM2 GEMV both threads inside the stack was no faster.
    return linear_parts([(w.native, w.n_out, w.threads_gemv) for w in subs], isinstance(op, SumLinear))


def norm_args(norm: NormAdapter, keep: list[Any]) -> Any:
    """The stack's descriptor for a norm, or None when it does not run on the kernel."""
    if norm.isa is None or norm.prepared.native is None:
        return None
    keep.append(norm.prepared)
    return norm.prepared.native


class NativeDecode:
    """``step(h, pos, modality)`` -> logits [vocab], the same as the reference step up to float rounding;
    ``step_rows(x, slots, pos, modality)`` -> logits [m, vocab] for m batch rows (a stack built with ``slots`` >
    1 over a ``BatchDecoder``'s cache), each row bitwise what ``step`` gives that sequence alone. ``head`` is None
    when the stack runs the head too (the 4-bit passes and, for a ``RescoredHead``, the re-scoring of the top
    logits), else the op applied here to the normed state (an fp head the kernels do not cover, e.g. a
    vocabulary that W4 cannot pack)."""

    def __init__(self, stack: Any, dim: int, vocab: int, head: LinearOp | None, keep: list[Any]) -> None:
        self.stack, self.dim, self.vocab, self.head, self.keep = stack, dim, vocab, head, keep

    def step(self, h: torch.Tensor, pos: int, modality: int) -> torch.Tensor:
        x = torch.empty(self.dim)
        x.copy_(h.reshape(-1))  # the stack overwrites x with the last hidden state
        out = torch.empty(self.vocab if self.head is None else self.dim)
        self.stack.step(x.data_ptr(), pos, modality, out.data_ptr())
        return out if self.head is None else self.head(out[None])[0]

    def prefill(self, h: torch.Tensor, slot: int, start: int, modality: int) -> torch.Tensor:
        """A prompt's embeddings h [T, dim] at runtime positions start .. start + T - 1 of cache slot ``slot`` ->
        the logits [vocab] after its last position; bitwise T calls of ``step`` (csrc/decode.cpp, prefill)."""
        x = h.to(torch.float32, copy=True).contiguous()  # overwritten by the stack
        out = torch.empty(self.vocab if self.head is None else self.dim)
        self.stack.prefill(x.data_ptr(), x.shape[0], slot, start, modality, out.data_ptr())
        return out if self.head is None else self.head(out[None])[0]

    def step_rows(self, x: torch.Tensor, slots: list[int], pos: list[int], modality: list[int]) -> torch.Tensor:
        """x [m, dim] fp32 (the rows' embeddings; overwritten with the last hidden states)."""
        m = len(slots)
        x = x.float().contiguous()
        slot_t = torch.tensor(slots, dtype=torch.int64)
        pos_t = torch.tensor(pos, dtype=torch.int64)
        mod_t = torch.tensor(modality, dtype=torch.int32)
        out = torch.empty(m, self.vocab if self.head is None else self.dim)
        self.stack.step_rows(x.data_ptr(), m, slot_t.data_ptr(), pos_t.data_ptr(), mod_t.data_ptr(), out.data_ptr())
        return out if self.head is None else self.head(out)


RESCORE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def head_parts(head: LinearOp, keep: list[Any], native_head: bool = True) -> tuple[list[Any] | None, Any]:
    """The stack's parts for the lm head and its re-scoring ``(weight, top)`` (None: no re-scoring), or
    ``(None, None)`` when the head stays in Python (``native_head`` False: the tests' reference)."""
    if not native_head:
        return None, None
    if isinstance(head, RescoredHead):
        w = head.weight
        if w.dtype not in RESCORE_DTYPES or not w.is_contiguous() or w.device.type != "cpu" or head.top > 64:
            return None, None
        parts = op_parts(head.approx, keep)
        if parts is None:
            return None, None
        keep.append(w)
        return parts, (w, head.top)
    return op_parts(head, keep), None


def build_native_decode(model: Any, isa: str, kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        native_head: bool = True) -> NativeDecode | None:
    """A NativeDecode over ``model``'s layers (a ``lavin_edge.runtime.engine.Engine``) on the native ``isa``, or
    None when some op is not on the extension's kernels. ``kv_cache``: per layer (k, v) fp16 [slots, n_kv, ctx,
    head_dim] (a ``BatchDecoder``'s; default the engine's own, one slot). ``native_head`` False leaves the head
    to Python (the reference the tests compare the native head with)."""
    if not native_decode_available():
        return None
    kv_cache = model.kv_cache if kv_cache is None else kv_cache
    slots = int(kv_cache[0][0].shape[0])
    keep: list[Any] = []
    rope = torch.view_as_real(model.rope).contiguous()
    keep.append(rope)
    head, rescore_w = head_parts(model.lm_head, keep, native_head)
    head_norm = norm_args(model.norm, keep)
    if head_norm is None:
        return None
    vocab = model.lm_head.n_out
    layers = []
    for lyr, (k_cache, v_cache) in zip(model.layers, kv_cache, strict=True):
        pieces = [op_parts(op, keep) for op in (lyr.wqkv, lyr.wo, lyr.w13, lyr.w2)]
        norms = [norm_args(n, keep) for n in (lyr.attn_in, lyr.ffn_norm)]
        if any(p is None for p in pieces) or any(n is None for n in norms):
            return None
        for cache in (k_cache, v_cache):
            if not cache.is_contiguous() or cache.dtype != torch.float16:
                return None
            keep.append(cache)
        layers.append((*norms, *pieces))
    stack = new_decode_stack(isa, model.dim, model.n_heads, model.n_kv, model.hd, model.layers[0].w13.n_out // 2,
                             model.max_context, vocab, model.norm.eps, rope, torch.get_num_threads(), slots)
    rescore = None if rescore_w is None else (rescore_w[0], RESCORE_DTYPES[rescore_w[0].dtype], rescore_w[1])
    fill_stack(stack, layers, kv_cache, head_norm, head or [], rescore)
    return NativeDecode(stack, model.dim, vocab, None if head else model.lm_head, keep)
