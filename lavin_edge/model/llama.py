"""The one LLaMA definition: decoder, rotary embedding, attention, logits and greedy generation, shared by
the training model (``lavin_edge.model.lavin``) and the merged model (``lavin_edge.model.merged``).

Every attention input carries an adapter (docs/model-format.md):

- while training, the routed adapter (``RoutedAdapter``), routed on position 0, which holds LaVIN's modality
  token and which nobody but itself attends to (``isolate_first``), so each layer's routing is a function of
  the modality alone;
- after ``merge``, the folded adapter (``FoldedAdapter``): that constant routing folded into one
  up-projection per modality, selected by the sequence's modality index. The modality token is gone; cache
  slot i holds absolute position i + ``position_offset`` (1), so rotary angles, and hence logits, are those
  of the training model.

Weights use Meta's names and Meta's rotary layout (interleaved pairs (x[2i], x[2i+1])), so Meta
checkpoints load as they are and Hugging Face ones after un-permuting q/k (see ``lavin_edge.io``).
The serving runtime (``lavin_edge.runtime``) and its native decode step are tested against this model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lavin_edge.config import AdapterConfig, LlamaConfig
from lavin_edge.decoding import decode
from lavin_edge.model.adapter import FoldedAdapter, RoutedAdapter


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or as it is when wider (fp64: the reproducible calibration of ``quantize``)."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much over 4096 channels.
        xf = at_least_fp32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.type_as(x)


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim/2] for Meta's interleaved rotary layout, computed in fp64 (``dtype``: kept)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, hd]; cos/sin [T, hd/2]. Rotates each pair (x[2i], x[2i+1]) by its angle."""
    xf = at_least_fp32(x).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


@dataclass
class KVCache:
    """Preallocated keys/values [B, max_len, n_kv_heads, head_dim] per layer, plus each layer's routing
    input (the normed state of position 0), so decode steps route exactly like the prefill did."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    route: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0

    @classmethod
    def allocate(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> KVCache:
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
            route=[None] * cfg.n_layers,
        )

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]


def attention_mask(q_len: int, start: int, isolate_first: bool, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
    """Additive mask [q_len, start + q_len]: causal; with ``isolate_first`` (LaVIN's modality token)
    nobody attends to position 0 but position 0 itself, which therefore sees only itself."""
    rows = torch.arange(start, start + q_len, device=device)[:, None]
    cols = torch.arange(start + q_len, device=device)[None, :]
    allowed = cols <= rows
    if isolate_first:
        allowed = allowed & ((cols > 0) | (rows == 0))
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.hd), cos, sin)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv, self.hd), cos, sin)
        v = self.wv(x).view(b, t, self.n_kv, self.hd)
        if cache is not None:
            cache.k[layer][:b, start:start + t] = k
            cache.v[layer][:b, start:start + t] = v
            k = cache.k[layer][:b, :start + t]
            v = cache.v[layer][:b, :start + t]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask.to(q.dtype), enable_gqa=self.n_kv != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """h = x + Attn(adapter(attn_norm(x))); out = h + FFN(ffn_norm(h)). The FFN has no adapter."""

    def __init__(self, cfg: LlamaConfig, adapter: AdapterConfig | None, folded: bool = False) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.adapter: nn.Module | None = None
        if adapter is not None and folded:
            self.adapter = FoldedAdapter(cfg.dim, adapter.hidden)
        elif adapter is not None:
            self.adapter = RoutedAdapter(cfg.dim, adapter.hidden, adapter.groups, adapter.temperature,
                                         adapter.dropout, adapter.scale)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        n = self.attention_norm(x)
        if isinstance(self.adapter, FoldedAdapter):
            if modality is None:
                raise ValueError("a merged model needs each sequence's modality (0 text, 1 image)")
            n = self.adapter(n, modality)
        elif self.adapter is not None:
            # Route on position 0 (the modality token); decode steps reuse the prefill's routing input.
            route = n[:, :1] if start == 0 else cache.route[layer]  # type: ignore[union-attr]
            if cache is not None and start == 0:
                cache.route[layer] = route.detach()
            n = self.adapter(n, route)
        h = x + self.attention(n, cos, sin, mask, cache, layer, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """The decoder. ``forward_embeds`` takes embeddings so LaVIN can put the modality token and the
    visual tokens in; ``forward`` takes token ids.

    ``folded`` builds the merged model's layers (``FoldedAdapter``, no modality token: every call then
    takes ``modality`` [B], and cache slot i is absolute position i + ``position_offset``)."""

    def __init__(self, cfg: LlamaConfig, adapter: AdapterConfig | None = None, isolate_first: bool = True, *,
                 folded: bool = False, position_offset: int = 0) -> None:
        super().__init__()
        cfg.validate()
        if folded and adapter is None:
            raise ValueError("folded adapters need an AdapterConfig")
        self.cfg = cfg
        self.folded = folded
        self.position_offset = position_offset
        # Only the routed adapters route on a modality token at position 0.
        self.isolate_first = isolate_first and adapter is not None and not folded
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, adapter, folded) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if not self.tok_embeddings.weight.is_meta:
            # LLaMA's init scale; nn.Embedding's N(0, 1) gives absurd logits when embeddings are tied.
            nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        self.gradient_checkpointing = False
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        """Positions that fit: the context plus LaVIN's modality token, less the slots the offset skips."""
        return self.cfg.max_seq_len + 1 - self.position_offset

    @contextlib.contextmanager
    def without_adapters(self) -> Iterator[None]:
        """Inside, every layer runs as the frozen base alone (attention reads the normed state directly): the
        teacher of ``text_loss = "kl"``. The modality token stays isolated, so other positions see the base."""
        saved = [blk.adapter for blk in self.layers]
        for blk in self.layers:
            blk.adapter = None
        try:
            yield
        finally:
            for blk, a in zip(self.layers, saved, strict=True):
                blk.adapter = a

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len + 1, self.cfg.rope_theta, device)
        return self._rope

    def rope_slice(self, start: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of cache slots start..start+t-1 (absolute positions shifted by ``position_offset``)."""
        cos, sin = self.rope(device)
        a = start + self.position_offset
        return cos[a:a + t], sin[a:a + t]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, w.type_as(h))

    def forward_embeds(self, h: torch.Tensor, modality: torch.Tensor | None = None, cache: KVCache | None = None,
                       start: int = 0, last_only: bool = False) -> torch.Tensor:
        """h [B, T, D] at cache slots start..start+T-1 -> logits [B, T, V] (or [B, 1, V]).
        ``modality`` [B] (0 text, 1 image) selects the folded adapters' up-projection; the routed ones
        ignore it (their modality is the token at position 0)."""
        t = h.shape[1]
        if start + t > self.capacity:
            raise ValueError(f"sequence of {start + t} positions exceeds the context of {self.capacity}")
        if cache is not None and start + t > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, {start + t} needed")
        if modality is not None:
            modality = modality.to(h.device).long()
        cos, sin = self.rope_slice(start, t, h.device)
        mask = attention_mask(t, start, self.isolate_first, h.device)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(layer, h, modality, cos, sin, mask, None, i, start, use_reentrant=False)
            else:
                h = layer(h, modality, cos, sin, mask, cache, i, start)
        if cache is not None:
            cache.length = start + t
        return self.logits(h[:, -1:] if last_only else h)

    def forward(self, tokens: torch.Tensor, modality: torch.Tensor | None = None, cache: KVCache | None = None,
                start: int = 0, last_only: bool = False) -> torch.Tensor:
        return self.forward_embeds(self.tok_embeddings(tokens), modality, cache, start, last_only)

    @torch.no_grad()
    def generate_greedy(self, h: torch.Tensor, modality: torch.Tensor | None, max_new_tokens: int,
                        stop_ids: set[int]) -> list[list[int]]:
        """Greedy decoding after the prompt embeddings h [B, T, D] (rows of one length, no padding), with a KV
        cache; returns each row's new token ids (its stop token excluded)."""
        cache = KVCache.allocate(self.cfg, h.shape[0], h.shape[1] + max_new_tokens, h.dtype, h.device)
        logits = self.forward_embeds(h, modality, cache, 0, last_only=True)
        out: list[list[int]] = [[] for _ in range(h.shape[0])]

        def step(picks: list[int]) -> list[int]:
            e = self.tok_embeddings(torch.tensor(picks, device=h.device)[:, None])
            return self.forward_embeds(e, modality, cache, cache.length, last_only=True)[:, -1].argmax(-1).tolist()

        decode(logits[:, -1].argmax(-1).tolist(), step, stop_ids, max_new_tokens,
               lambda row, token: out[row].append(token) or True)
        return out
