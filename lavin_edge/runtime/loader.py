"""Model dir -> the runtime's ops.

Reading is ``lavin_edge.modeldir``'s job (config, tensors validated against it, tokenizer, the lm_head's stored
4-bit form); this module turns what it read into a backend's ops (``build_weights``): fused q|k|v and gate|up
linears, norms with their folded adapters, the head, the vision tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lavin_edge.config import LavinConfig
from lavin_edge.kernels.gptq_format import GPTQTensors, residual_w4
from lavin_edge.modeldir import (
    HEAD_RESCORE_TOP,
    LINEAR_NAMES,
    ModelDir,
    ModelDirError,
    load_model_dir,
    stored_head,
    take_linear,
)
from lavin_edge.runtime.ops import LinearOp, NormAdapter, RescoredHead

if TYPE_CHECKING:
    from lavin_edge.runtime.backends import Backend

__all__ = ["ModelDir", "ModelDirError", "RuntimeLayer", "RuntimeWeights", "build_weights", "read_model_dir"]


def read_model_dir(path: str | Path) -> ModelDir:
    """A complete merged or quantized model dir, validated (ModelDirError naming the problem)."""
    return load_model_dir(path)


def head_w4_parts(head: torch.Tensor, sd: Mapping[str, torch.Tensor], quant: dict[str, Any], dim: int
                  ) -> tuple[GPTQTensors, GPTQTensors]:
    """The fp head [vocab, dim] as its 4-bit value + residual (docs/model-format.md, "lm_head"): as ``quantize``
    stored it, or computed here for a directory without it (a merged fp dir)."""
    parts = stored_head(sd, quant)
    return parts if parts is not None else residual_w4(head, next((g for g in (64, 32) if dim % g == 0), -1))


# ------------------------------------------------------------------------------------------- building

@dataclass
class RuntimeLayer:
    attn_in: NormAdapter
    wqkv: LinearOp
    wo: LinearOp
    ffn_norm: NormAdapter
    w13: LinearOp
    w2: LinearOp


@dataclass
class RuntimeWeights:
    """A model's weights as ops of one backend."""

    embed: torch.Tensor  # [vocab, D] in its stored dtype (rows are cast on lookup)
    norm: NormAdapter
    lm_head: LinearOp
    head_w4: bool
    layers: list[RuntimeLayer] = field(default_factory=list)
    vision: torch.nn.Module | None = None
    visual_proj: torch.nn.Module | None = None


def build_weights(cfg: LavinConfig, sd: Mapping[str, torch.Tensor], quant: dict[str, Any] | None,
                  backend: Backend, head_w4: bool | None = None) -> RuntimeWeights:
    """The model's tensors (merged naming, ``llm.`` prefix optional) as ``backend``'s ops. ``head_w4``: the fp
    head as two 4-bit passes (None: when the backend runs W4 and the vocab packs)."""
    llm = cfg.llm
    quant = quant or {"checkpoint_format": "gptq", "group_size": 128}
    if any(k.startswith("llm.") for k in sd):  # module naming; the file naming has LLM names top level
        sd = {k.removeprefix("llm."): v for k, v in sd.items()}
    try:
        # Kept in its stored dtype (a 16-bit table halves a 7B model's 0.5 GB).
        embed = sd["tok_embeddings.weight"].contiguous()
        norm = backend.rmsnorm(sd["norm.weight"], llm.norm_eps)
        out = sd.get("output.weight") if not llm.tie_embeddings else None
        head = take_linear(sd, "output", quant) if (out is not None or "output.qweight" in sd) else embed
        if isinstance(head, torch.Tensor):
            head = head.float()
        # An fp32 vocab x dim head is the largest read of a small model's decode step (SmolLM2: 113 MB of
        # ~180 MB); int32 packing of the zero points needs a vocab that is a multiple of 8.
        packable = isinstance(head, torch.Tensor) and head.shape[0] % 8 == 0
        use_w4 = (backend.runs_w4 and packable) if head_w4 is None else head_w4
        if use_w4 and isinstance(head, torch.Tensor):
            if not backend.runs_w4:
                raise ModelDirError("head_w4 needs the kernels backend")
            # The top candidates are re-scored from the fp weight rows as stored (the tied embedding table
            # costs no memory): exact near-ties for few extra bytes per step (docs/benchmarks/accuracy.md).
            approx = backend.sum_linear(list(head_w4_parts(head, sd, quant, llm.dim)))
            lm_head = RescoredHead(approx, embed if out is None else out, HEAD_RESCORE_TOP)
        else:
            lm_head = backend.linear(head)
        layers = [_layer(cfg, sd, i, quant, backend) for i in range(llm.n_layers)]
    except KeyError as e:
        raise ModelDirError(f"tensor {e} missing from the model") from e
    vision, proj = vision_modules(cfg, sd, backend)
    return RuntimeWeights(embed, norm, lm_head, use_w4, layers, vision, proj)


def _layer(cfg: LavinConfig, sd: Mapping[str, torch.Tensor], i: int, quant: dict[str, Any],
           backend: Backend) -> RuntimeLayer:
    p = f"layers.{i}."
    ad = {k: sd[p + "adapter." + k] for k in ("down.weight", "down.bias", "up.weight", "up.bias")}
    if ad["up.weight"].dim() != 3 or ad["up.weight"].shape[0] != 2:
        raise ModelDirError(f"{p}adapter.up.weight has shape {tuple(ad['up.weight'].shape)}, expected "
                            "[2, D, r] (routing folded per modality): not a merged model")
    eps = cfg.llm.norm_eps
    lin = {n: take_linear(sd, p + n, quant) for n in LINEAR_NAMES}
    return RuntimeLayer(
        attn_in=backend.norm_adapter(sd[p + "attention_norm.weight"], ad["down.weight"], ad["down.bias"],
                                     ad["up.weight"], ad["up.bias"], eps),
        wqkv=backend.fused_linear([lin["attention.wq"], lin["attention.wk"], lin["attention.wv"]]),
        wo=backend.linear(lin["attention.wo"]),
        ffn_norm=backend.rmsnorm(sd[p + "ffn_norm.weight"], eps),
        w13=backend.fused_linear([lin["feed_forward.w1"], lin["feed_forward.w3"]]),
        w2=backend.linear(lin["feed_forward.w2"]),
    )


def vision_modules(cfg: LavinConfig, sd: Mapping[str, torch.Tensor], backend: Backend
            ) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    # Iterate names, not items: a lazy mapping (the 7B benchmark) must not materialise every tensor.
    vis = {k.removeprefix("vision."): sd[k] for k in sd if k.startswith("vision.")}
    if not vis:
        return None, None  # a text-only export
    from lavin_edge.model.adapter import VisualProjection
    from lavin_edge.model.vision import build_vision_tower

    tower = build_vision_tower(cfg.vision, cfg.adapter)
    proj = VisualProjection(tower.token_dims, cfg.llm.dim, cfg.adapter.proj_hidden)
    try:
        tower.load_state_dict(vis, strict=True)
        proj.load_state_dict({k.removeprefix("visual_proj."): sd[k] for k in sd if k.startswith("visual_proj.")},
                             strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"vision tower tensors do not match the config: {str(e).splitlines()[0]}") from e
    tower.eval().float()
    proj.eval().float()
    return backend.vision_tower(tower), proj
