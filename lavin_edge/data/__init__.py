"""Training and evaluation data: records (``records``), sources (``sources``: ScienceQA, LLaVA-Instruct, Alpaca,
self-distilled text, prose; ``easyvqa``: the easy-vqa questions), image preprocessing (``image``), tokenised
datasets (``dataset``), the self-distilled answers' writer (``self_distill``) and the docstring prose (``prose``).

The names below are imported on first use (PEP 562): ``lavin_edge.data.image`` loads without PyTorch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Item": "dataset", "LavinDataset": "dataset", "collate_items": "dataset", "ImageError": "image",
    "load_image": "image", "preprocess": "image", "BadRecord": "records", "DataError": "records",
    "Problems": "records", "Record": "records", "export_easy_vqa_scienceqa": "easyvqa", "load_alpaca": "sources",
    "load_easy_vqa": "easyvqa", "load_llava": "sources", "load_scienceqa": "sources", "load_source": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
