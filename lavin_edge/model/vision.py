"""Build the vision tower a config names: the CLIP ViT (``vit``) or EfficientNet-Lite (``efficientnet``), both
``tower.VisionTower``s."""

from __future__ import annotations

from lavin_edge.config import AdapterConfig, VisionConfig
from lavin_edge.model.tower import VisionTower


def build_vision_tower(cfg: VisionConfig, adapter: AdapterConfig | None) -> VisionTower:
    cfg.validate()
    if cfg.kind == "vit":
        from lavin_edge.model.vit import ClipViT

        return ClipViT(cfg, adapter)
    from lavin_edge.model.efficientnet import EfficientNetLite

    return EfficientNetLite(cfg, adapter)
