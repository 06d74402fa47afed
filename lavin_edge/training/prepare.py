"""Getting a model ready to train: the frozen weights' dtype, train/eval modes (only adapter dropout is
stochastic), adapters initialised from a file, and a rough memory estimate for ``--dry-run``."""

from __future__ import annotations

from pathlib import Path

import torch

from lavin_edge.model.lavin import LaVIN
from lavin_edge.training import checkpoint as ckpt
from lavin_edge.training.base import DTYPES
from lavin_edge.training.config import TrainConfig


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown base_dtype {name!r}; choose from auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def cast_frozen(model: LaVIN, dtype: torch.dtype) -> None:
    """Frozen float tensors -> ``dtype``; trainable ones stay fp32 (master weights)."""
    for name, p in model.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if model.is_trainable_name(name) else dtype)
    for _, b in model.named_buffers():
        if b.is_floating_point():
            b.data = b.data.to(dtype)


def set_train_mode(model: LaVIN) -> None:
    """Only adapter dropout is stochastic; frozen modules stay in eval mode (EfficientNet's BatchNorm must
    not update its running stats). ``llm.training`` gates gradient checkpointing."""
    model.eval()
    for name, m in model.named_modules():
        if name.endswith(".adapter") or ".adapter." in name:
            m.train()
    model.llm.training = True


def init_from_adapters(model: LaVIN, path: str | Path) -> None:
    """Load trained adapters into ``model`` (fp32), refusing a file whose tensor names or shapes differ."""
    p = Path(path)
    if not (p / ckpt.ADAPTERS).is_file() and not p.is_file():
        raise FileNotFoundError(f"init_adapters: no {ckpt.ADAPTERS} at {p}")
    sd = ckpt.load_adapters(p)
    want = model.trainable_state_dict()
    if set(sd) != set(want):
        diff = sorted(set(sd) ^ set(want))
        raise ValueError(f"init_adapters {p}: tensor names differ from this recipe's model ({len(diff)}, e.g. "
                         f"{diff[:3]}): another base or adapter size?")
    bad = [k for k in want if sd[k].shape != want[k].shape]
    if bad:
        raise ValueError(f"init_adapters {p}: shapes differ from this recipe's model, e.g. {bad[0]} "
                         f"{tuple(sd[bad[0]].shape)} vs {tuple(want[bad[0]].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)


def memory_estimate(counts: dict[str, int], cfg: TrainConfig, dtype: torch.dtype, llm_dim: int, n_layers: int,
                    vocab: int) -> dict[str, float]:
    """Rough peak memory in GiB: frozen weights + fp32 trainables x 4 (weights, grads, Adam m and v) +
    activations kept for backward (~16 tensors of [B, T, D] per layer, or 2 with checkpointing) + logits."""
    gib = 1024 ** 3
    elem = torch.finfo(dtype).bits // 8
    frozen = (counts["total_params"] - counts["trainable_params"]) * elem / gib
    trainable = counts["trainable_params"] * 4 * 4 / gib
    per_layer = 2 if cfg.gradient_checkpointing else 16
    tokens = cfg.batch_size * cfg.max_seq_len
    acts = tokens * llm_dim * n_layers * per_layer * max(elem, 2) / gib
    logits = tokens * vocab * 4 * 2 / gib
    return {"frozen_weights_gib": frozen, "trainable_state_gib": trainable, "activations_gib": acts,
            "logits_gib": logits, "total_gib": frozen + trainable + acts + logits}
