"""Checkpoint loaders and tokenizers: formats people already have (HF safetensors, Meta .pth, GGUF,
OpenAI CLIP .pt, HF CLIPVisionModel, the packaged EfficientNet-Lite0) -> our state-dict naming."""

from lavin_edge.io.checks import CheckpointError, load_state_dict_strict
from lavin_edge.io.llama_loaders import load_llm
from lavin_edge.io.tokenizer import Tokenizer, load_tokenizer
from lavin_edge.io.vision_loaders import load_vision

__all__ = ["CheckpointError", "Tokenizer", "load_llm", "load_state_dict_strict", "load_tokenizer", "load_vision"]
