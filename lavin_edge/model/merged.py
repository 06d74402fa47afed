"""The merged model: LaVIN with the LLM's routers folded away and no modality token.

Each LLM layer's routed adapter becomes a ``FoldedAdapter``: the shared down-projection A, a plus one
effective up-projection per modality ``U_m = w0(m) B + w1(m) D`` (bias likewise), with the routing
weights w(m) read from the constant table (docs/model-format.md). The modality token at position 0 is
gone: the model takes the modality of each row as an index instead, keeps the remaining tokens at their
original absolute positions (``position_offset = 1``; RoPE is relative, and nobody attended to position 0,
so attention is unchanged), and its KV cache holds only real tokens. The ViT keeps per-token routing.
The LLM is the same ``Llama`` the training model uses, built with ``folded=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from lavin_edge.config import LavinConfig
from lavin_edge.model.adapter import VisualProjection
from lavin_edge.model.lavin import Batch, embed_with_images
from lavin_edge.model.llama import Llama
from lavin_edge.model.vision import build_vision_tower


class MergedLaVIN(nn.Module):
    """LaVIN as deployed: the same inputs (token ids, image placeholders, images), no modality token."""

    def __init__(self, cfg: LavinConfig, position_offset: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.llm = Llama(cfg.llm, cfg.adapter, folded=True, position_offset=position_offset)
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
        pos = torch.tensor([image_pos])
        h = self.embed(torch.tensor([prompt_ids]), pos, None if image is None else image[None])
        return self.llm.generate_greedy(h, (pos >= 0).long(), max_new_tokens, stop_ids)[0]
