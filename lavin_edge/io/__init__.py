"""Checkpoint loaders and tokenizers: formats people already have (HF safetensors, Meta .pth, GGUF,
OpenAI CLIP .pt, HF CLIPVisionModel, the packaged EfficientNet-Lite0) -> our state-dict naming."""
