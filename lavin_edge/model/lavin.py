"""LaVIN: frozen LLaMA + frozen vision tower + routed adapters, a visual projection and a modality token.

Sequence: [t_m][BOS]["Image: "][6 visual tokens][prompt][answer][EOS], or text-only
[t_m][BOS]["Image: N/A"][prompt][answer][EOS]. ``t_m`` is a learned embedding (0 = text, 1 = image) at
position 0 that only itself attends to, so every layer's routing is a function of the modality alone.
Loss falls on the answer tokens and EOS only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lavin_edge.config import LavinConfig
from lavin_edge.modality import IMAGE, TEXT  # noqa: F401  (defined in lavin_edge.modality; kept importable here)
from lavin_edge.model.adapter import VisualProjection
from lavin_edge.model.llama import Llama
from lavin_edge.model.vision import build_vision_tower
from lavin_edge.prompt import layout

IGNORE_INDEX = -100


class TokenizerLike:
    """What the assembly needs from a tokenizer (``lavin_edge.io.tokenizer`` implements it)."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...  # pragma: no cover


@dataclass
class Example:
    """One tokenised sample. ``image_pos`` is where the visual tokens go in ``input_ids`` (-1: none)."""

    input_ids: list[int]
    labels: list[int]
    image_pos: int


def encode_example(tok: TokenizerLike, prompt: str, answer: str | None, has_image: bool, n_visual: int,
                   max_len: int | None = None, history: Sequence[tuple[str, str]] = ()) -> Example:
    """Token ids and labels for one sample; ``answer=None`` builds a generation prompt (no EOS).

    ``history``: earlier turns of a conversation as (prompt, answer) pairs, each encoded as the prompt's ids then
    the answer's ids + EOS, with every answer in the labels; a follow-up prompt starts with its own newline.
    This is the layout ``lavin_edge.chat.session.ChatSession`` builds at inference, segment by segment.
    ``max_len`` counts the modality token too. Over-long samples raise instead of being silently cut. The layout
    is ``lavin_edge.prompt.layout``'s; the labels are its answer tokens."""
    turns = [(p, tok.encode(a)) for p, a in history]
    if answer is not None:
        seq = layout(tok, n_visual if has_image else 0, [*turns, (prompt, tok.encode(answer))])
    else:
        seq = layout(tok, n_visual if has_image else 0, turns, prompt)
    if max_len is not None and len(seq.ids) + 1 > max_len:
        raise ValueError(f"sample of {len(seq.ids) + 1} tokens exceeds max_seq_len {max_len}")
    labels = [t if scored else IGNORE_INDEX for t, scored in zip(seq.ids, seq.answer_mask, strict=True)]
    return Example(seq.ids, labels, seq.image_pos)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    labels: torch.Tensor  # [B, T] long, IGNORE_INDEX outside answers
    image_pos: torch.Tensor  # [B] long, -1 for text-only samples
    images: torch.Tensor | None  # [B, 3, S, S] (rows of text-only samples are ignored)

    @property
    def modality(self) -> torch.Tensor:
        return (self.image_pos >= 0).long()

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.image_pos.to(device),
                     None if self.images is None else self.images.to(device))


def collate(examples: list[Example], images: list[torch.Tensor | None], pad_id: int) -> Batch:
    """Right-pad to the longest sample; text-only samples get a zero image row when others have one."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    image_pos = torch.tensor([e.image_pos for e in examples], dtype=torch.long)
    present = [im for im in images if im is not None]
    stacked = None
    if present:
        zero = torch.zeros_like(present[0])
        stacked = torch.stack([zero if im is None else im for im in images])
    return Batch(ids, labels, image_pos, stacked)


def embed_with_images(tok_embeddings: nn.Embedding, vision: nn.Module, visual_proj: VisualProjection,
                      input_ids: torch.Tensor, image_pos: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with each image sample's projected visual tokens written over its placeholders
    (shared by the training model and the merged runtime)."""
    h = tok_embeddings(input_ids)
    has_image = image_pos >= 0
    if bool(has_image.any()):
        if images is None:
            raise ValueError("batch has image samples but no images")
        rows = has_image.nonzero().flatten()
        vis = visual_proj(vision(images[rows])).to(h.dtype)
        h = h.clone()
        n_visual = vis.shape[1]
        for j, b in enumerate(rows.tolist()):
            p = int(image_pos[b])
            h[b, p:p + n_visual] = vis[j]
    return h


class LaVIN(nn.Module):
    def __init__(self, cfg: LavinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.llm = Llama(cfg.llm, cfg.adapter, isolate_first=True)
        self.vision = build_vision_tower(cfg.vision, cfg.adapter)
        self.visual_proj = VisualProjection(self.vision.token_dims, cfg.llm.dim, cfg.adapter.proj_hidden)
        self.modality_embedding = nn.Embedding(2, cfg.llm.dim)
        self.freeze_base()

    @property
    def n_visual(self) -> int:
        return len(self.vision.token_dims)

    # -- parameters -------------------------------------------------------------------------------
    @staticmethod
    def is_trainable_name(name: str) -> bool:
        """Adapters, the visual projection and the modality embedding train; the rest stays frozen."""
        return ".adapter." in f".{name}" or name.startswith(("visual_proj.", "modality_embedding."))

    def freeze_base(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable_name(name))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if self.is_trainable_name(k)}

    def count_parameters(self) -> dict[str, int]:
        groups = {"llm_adapters": 0, "vision_adapters": 0, "visual_proj": 0, "modality_embedding": 0}
        total = trainable = 0
        for name, p in self.named_parameters():
            total += p.numel()
            if not self.is_trainable_name(name):
                continue
            trainable += p.numel()
            if name.startswith("llm."):
                groups["llm_adapters"] += p.numel()
            elif name.startswith("vision."):
                groups["vision_adapters"] += p.numel()
            else:
                groups[name.split(".")[0]] += p.numel()
        return {"trainable_params": trainable, "total_params": total, **groups}

    # -- forward ----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_pos: torch.Tensor, images: torch.Tensor | None
              ) -> torch.Tensor:
        """[t_m] + token embeddings with the projected visual tokens written over their placeholders."""
        h = embed_with_images(self.llm.tok_embeddings, self.vision, self.visual_proj, input_ids, image_pos, images)
        t_m = self.modality_embedding((image_pos >= 0).long()).to(h.dtype)[:, None]
        return torch.cat([t_m, h], dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B, T, V] aligned with ``batch.input_ids`` (the modality position is dropped)."""
        h = self.embed(batch.input_ids, batch.image_pos, batch.images)
        return self.llm.forward_embeds(h)[:, 1:]

    @torch.no_grad()
    def base_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the frozen base LLM (no adapters) on text-only rows, at the same positions as
        ``forward``: the targets of ``text_loss = "kl"``. Rotary angles shift by the modality slot, which
        attention does not see (it depends on relative positions only)."""
        h = self.embed(input_ids, torch.full((input_ids.shape[0],), -1, dtype=torch.long,
                                             device=input_ids.device), None)
        with self.llm.without_adapters():
            return self.llm.forward_embeds(h)[:, 1:]

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self.forward(batch)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)

    # -- reference generation (the fast engine lives in lavin_edge.chat) ---------------------------
    @torch.no_grad()
    def generate_greedy(self, prompt_ids: list[int], image_pos: int, image: torch.Tensor | None,
                        max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy decoding with the KV cache; returns the new token ids (stop token excluded)."""
        dev = next(self.parameters()).device  # eval --device cuda runs the model on the GPU
        h = self.embed(torch.tensor([prompt_ids], device=dev), torch.tensor([image_pos], device=dev),
                       None if image is None else image[None])
        return self.llm.generate_greedy(h, None, max_new_tokens, stop_ids)[0]


def build_lavin(cfg: LavinConfig, device: torch.device | str = "cpu") -> LaVIN:
    """Build on any device; ``meta`` builds the structure with no memory (used by ``info``)."""
    with torch.device(device):
        return LaVIN(cfg)
