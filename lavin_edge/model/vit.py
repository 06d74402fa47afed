"""CLIP ViT in OpenAI's layout (pre-LN, class token, QuickGELU), with a routed adapter before every
block's attention; returns the class token after every k-th block, before ln_post and without proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lavin_edge.config import AdapterConfig, VisionConfig
from lavin_edge.model.adapter import RoutedAdapter
from lavin_edge.model.tower import VisionTower

# OpenAI CLIP's embedding widths (the unused ``proj``), keyed by transformer width.
_CLIP_PROJ_DIM = {1024: 768, 768: 512}


class MultiheadSelfAttention(nn.Module):
    """Same parameters as nn.MultiheadAttention (in_proj_weight/bias, out_proj) so CLIP loads as is."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        if not self.in_proj_weight.is_meta:
            nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, adapter: AdapterConfig | None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.adapter: RoutedAdapter | None = None
        if adapter is not None:
            self.adapter = RoutedAdapter(width, adapter.hidden, adapter.groups, adapter.temperature,
                                         adapter.dropout, adapter.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.ln_1(x)
        if self.adapter is not None:
            n = self.adapter(n)  # per-token routing
        x = x + self.attn(n)
        return x + self.mlp(self.ln_2(x))


class ClipViT(VisionTower):
    def __init__(self, cfg: VisionConfig, adapter: AdapterConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualBlock(w, cfg.heads, adapter) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(w)
        # Kept so CLIP checkpoints load strictly; LaVIN reads tokens before ln_post/proj.
        self.proj = nn.Parameter(scale * torch.randn(w, _CLIP_PROJ_DIM.get(w, w)))
        self.every = cfg.layers // cfg.n_tokens
        self.token_dims = [w] * cfg.n_tokens

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        s = self.cfg.image_size
        if images.shape[-2:] != (s, s):
            raise ValueError(f"ViT expects {s}x{s} images, got {tuple(images.shape[-2:])}")
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        tokens = []
        for i, blk in enumerate(self.transformer.resblocks):
            x = blk(x)
            if (i + 1) % self.every == 0:
                tokens.append(x[:, 0])
        return tokens
