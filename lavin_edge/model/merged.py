"""The merged runtime model: LaVIN with the LLM's routers folded away and no modality token.

Each LLM layer's routed adapter becomes a ``FoldedAdapter``: the shared down-projection A, a plus one
effective up-projection per modality ``U_m = w0(m) B + w1(m) D`` (bias likewise), with the routing
weights w(m) read from the constant table (DESIGN.md section 1). The modality token at position 0 is
gone: the runtime takes the modality of each row as an index instead, keeps the remaining tokens at their
original absolute positions (``position_offset = 1``; RoPE is relative, and nobody attended to position 0,
so attention is unchanged), and its KV cache holds only real tokens. The ViT keeps per-token routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lavin_edge.config import LavinConfig, LlamaConfig
from lavin_edge.model.adapter import VisualProjection
from lavin_edge.model.lavin import Batch, embed_with_images, greedy_tokens
from lavin_edge.model.llama import Attention, FeedForward, KVCache, RMSNorm, attention_mask, rope_tables
from lavin_edge.model.vision import build_vision_tower


class ModalityUp(nn.Module):
    """One up-projection per modality: weight [2, D, r], bias [2, D] (index 0 text, 1 image)."""

    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, dim, hidden))
        self.bias = nn.Parameter(torch.zeros(2, dim))

    def forward(self, z: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """z [B, T, r], modality [B] long -> [B, T, D]."""
        u = self.weight[modality].to(z.dtype)
        return torch.einsum("btr,bdr->btd", z, u) + self.bias[modality].to(z.dtype)[:, None]


class FoldedAdapter(nn.Module):
    """y = x + U_m (A x + a) + u_m: the routed adapter with the routing of modality m folded in."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = ModalityUp(hidden, dim)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x), modality)


class MergedBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, hidden: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.adapter = FoldedAdapter(cfg.dim, hidden)

    def forward(self, x: torch.Tensor, modality: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        n = self.adapter(self.attention_norm(x), modality)
        h = x + self.attention(n, cos, sin, mask, cache, layer, start)
        return h + self.feed_forward(self.ffn_norm(h))


class MergedLlama(nn.Module):
    """The LLM of the merged model. Cache slot i holds absolute position i + ``position_offset``."""

    def __init__(self, cfg: LlamaConfig, hidden: int, position_offset: int = 1) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.position_offset = position_offset
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(MergedBlock(cfg, hidden) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def capacity(self) -> int:
        """Tokens that fit: the unmerged model's context minus the dropped modality position."""
        return self.cfg.max_seq_len + 1 - self.position_offset

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len + 1, self.cfg.rope_theta, device)
        return self._rope

    def rope_slice(self, start: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope(device)
        a = start + self.position_offset
        return cos[a:a + t], sin[a:a + t]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, w.type_as(h))

    def forward_embeds(self, h: torch.Tensor, modality: torch.Tensor, cache: KVCache | None = None,
                       start: int = 0, last_only: bool = False) -> torch.Tensor:
        """h [B, T, D] at cache slots start..start+T-1, modality [B] (0 text, 1 image) -> logits."""
        t = h.shape[1]
        if start + t > self.capacity:
            raise ValueError(f"sequence of {start + t} tokens exceeds the context of {self.capacity}")
        if cache is not None and start + t > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, {start + t} needed")
        modality = modality.to(h.device).long()
        cos, sin = self.rope_slice(start, t, h.device)
        mask = attention_mask(t, start, False, h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, modality, cos, sin, mask, cache, i, start)
        if cache is not None:
            cache.length = start + t
        return self.logits(h[:, -1:] if last_only else h)


class MergedLaVIN(nn.Module):
    """LaVIN as deployed: the same inputs (token ids, image placeholders, images), no modality token."""

    def __init__(self, cfg: LavinConfig, position_offset: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.llm = MergedLlama(cfg.llm, cfg.adapter.hidden, position_offset)
        self.vision = build_vision_tower(cfg.vision, cfg.adapter)
        self.visual_proj = VisualProjection(self.vision.token_dims, cfg.llm.dim, cfg.adapter.proj_hidden)

    @property
    def n_visual(self) -> int:
        return len(self.vision.token_dims)

    def embed(self, input_ids: torch.Tensor, image_pos: torch.Tensor, images: torch.Tensor | None
              ) -> torch.Tensor:
        """Token embeddings with the projected visual tokens written over their placeholders."""
        return embed_with_images(self.llm.tok_embeddings, self.vision, self.visual_proj, input_ids, image_pos, images)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B, T, V] aligned with ``batch.input_ids`` (as ``LaVIN.forward``)."""
        h = self.embed(batch.input_ids, batch.image_pos, batch.images)
        return self.llm.forward_embeds(h, batch.modality)

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: list[int], image_pos: int, image: torch.Tensor | None,
                        max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy decoding with a KV cache of real tokens only; returns the new ids (stop excluded)."""
        ids = torch.tensor([prompt_ids])
        pos = torch.tensor([image_pos])
        modality = (pos >= 0).long()
        h = self.embed(ids, pos, None if image is None else image[None])
        cache = KVCache.allocate(self.cfg.llm, 1, h.shape[1] + max_new_tokens, h.dtype, h.device)
        logits = self.llm.forward_embeds(h, modality, cache, 0, last_only=True)

        def step(nxt: int) -> torch.Tensor:
            e = self.llm.tok_embeddings(torch.tensor([[nxt]]))
            return self.llm.forward_embeds(e, modality, cache, cache.length, last_only=True)

        return greedy_tokens(logits, step, max_new_tokens, stop_ids)
