"""Training and evaluation data: sources (ScienceQA, LLaVA-Instruct, Alpaca, easy-vqa), image
preprocessing, tokenised datasets."""

from lavin_edge.data.dataset import Item, LavinDataset, collate_items
from lavin_edge.data.image import ImageError, load_image, preprocess
from lavin_edge.data.sources import (
    BadRecord,
    DataError,
    Problems,
    Record,
    export_easy_vqa_scienceqa,
    load_alpaca,
    load_easy_vqa,
    load_llava,
    load_scienceqa,
    load_source,
)

__all__ = [
    "BadRecord", "DataError", "ImageError", "Item", "LavinDataset", "Problems", "Record", "collate_items",
    "export_easy_vqa_scienceqa", "load_alpaca", "load_easy_vqa", "load_image", "load_llava", "load_scienceqa",
    "load_source", "preprocess",
]
