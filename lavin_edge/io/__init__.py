"""Checkpoint loaders and tokenizers: formats people already have (HF safetensors, Meta .pth, GGUF,
OpenAI CLIP .pt, HF CLIPVisionModel, the packaged EfficientNet-Lite0) -> our state-dict naming.

The names below are imported on first use (PEP 562), so ``lavin_edge.io.tokenizer`` and ``lavin_edge.io.outdir``
load without the PyTorch-based loaders (the engine without PyTorch reads model dirs through them)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"CheckpointError": "checks", "load_state_dict_strict": "checks", "load_llm": "llama_loaders",
            "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "load_vision": "vision_loaders"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
