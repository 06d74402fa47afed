"""The quantized model dir (``lavin_edge.modeldir``, docs/model-format.md): writing it (the merged layout with each LLM
linear's ``.weight`` replaced by its packed GPTQ tensors, the lm_head's 4-bit form, ``quantize_config.json``),
packing a model's linears without calibration (tests, stand-ins), and reading a quantized dir back as an fp model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lavin_edge.kernels.gptq_format import PACKED_SUFFIXES, dequantize_packed, pack_linear, residual_w4
from lavin_edge.merge import file_state_dict, module_state_dict, save_merged
from lavin_edge.model.merged import MergedLaVIN
from lavin_edge.modeldir import HEAD_PARTS, ModelDirError, load_model_dir
from lavin_edge.quantize.gptq import (
    QuantResult,
    rtn_quantize,
)
from lavin_edge.quantize.pipeline import LINEAR_NAMES, GPTQConfig, QuantizeReport, get_linear


def head_w4_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The lm_head's served 4-bit form: value + residual, two symmetric RTN passes (``gptq_format.residual_w4``)
    of the fp head (``output.weight``, or the embeddings when tied), as ``output.hi.*`` + ``output.lo.*``, and its
    ``lm_head_w4`` config entry. An fp32 vocab x dim head is the largest read of a small model's decode step
    (SmolLM2: 113 MB of ~180 MB); one 4-bit pass flipped a third of SmolLM2's top-1 predictions, the residual
    pass brings it back (~8-bit accuracy for 1/4 of the fp32 bytes). None when the vocab is not a multiple of
    8 (qzeros packs 8 columns per int32): chat then serves the fp head."""
    head = tensors.get("output.weight", tensors["tok_embeddings.weight"])
    if head.shape[0] % 8:
        return {}, None
    dim = head.shape[1]
    gs = next((g for g in (64, 32) if dim % g == 0), -1)
    parts = residual_w4(head.float(), gs)
    out = {f"{prefix}.{k}": v for prefix, t in zip(HEAD_PARTS, parts, strict=True) for k, v in t.as_dict().items()}
    return out, {"parts": list(HEAD_PARTS), "group_size": gs, "checkpoint_format": "gptq", "bits": 4,
                 "method": "rtn value + rtn residual, symmetric"}


def pack_llm_linears(model: MergedLaVIN, qcfg: GPTQConfig,
                     quantize: Callable[[torch.Tensor], QuantResult] | None = None) -> dict[str, torch.Tensor]:
    """Every LLM linear of ``model`` quantized without calibration and packed in ``qcfg``'s format, named as
    ``save_quantized`` takes them (``layers.{i}.{name}.{suffix}``): for tests and stand-in models, where only
    the packed layout matters. ``quantize(w)`` defaults to round-to-nearest on ``qcfg``'s grid (no clipping)."""
    if quantize is None:
        def quantize(w: torch.Tensor) -> QuantResult:
            return rtn_quantize(w, qcfg.bits, qcfg.group_size, qcfg.sym)
    packed: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.llm.layers):
        for name in LINEAR_NAMES:
            w = get_linear(layer, name).weight.detach().float()
            for suffix, t in pack_linear(quantize(w), qcfg.bits, qcfg.format).items():
                packed[f"layers.{i}.{name}.{suffix}"] = t
    return packed


def save_quantized(model: MergedLaVIN, packed: dict[str, torch.Tensor], merged_config: dict[str, Any],
                   qcfg: GPTQConfig, out_dir: str | Path, tokenizer: Any = None,
                   report: QuantizeReport | dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the quantized directory, all or nothing: the merged layout with packed LLM linears, the lm_head's
    4-bit form, ``quantize_config.json`` and ``quantize_report.json``."""
    quantized = {k.rsplit(".", 1)[0] for k in packed}
    tensors = {k: v for k, v in file_state_dict(model).items() if k.rsplit(".", 1)[0] not in quantized}
    tensors.update(packed)
    head, head_cfg = head_w4_tensors(tensors)
    tensors.update(head)
    qc = qcfg.quantization_config()
    source = dict(merged_config.get("source") or {})
    source["quantized_from"] = merged_config.get("_dir")
    table = merged_config.get("routing_table")
    files = {"quantize_config.json": json.dumps(qc, indent=2) + "\n"}
    if report is not None:
        rep = report.to_dict() if isinstance(report, QuantizeReport) else report
        files["quantize_report.json"] = json.dumps(rep, indent=2) + "\n"
    extra: dict[str, Any] = {"quantization_config": qc}
    if head_cfg is not None:
        extra["lm_head_w4"] = head_cfg
    return save_merged(model, out_dir, tokenizer, source, None if table is None else torch.tensor(table),
                       extra=extra, tensors=tensors, extra_files=files, overwrite=overwrite)


def load_quantized_as_fp(model_dir: str | Path, dtype: torch.dtype = torch.float32
                         ) -> tuple[MergedLaVIN, dict[str, Any]]:
    """The dequantized reference model of a quantized directory (weights = scale * (q - zero), fp16 scales):
    what quality checks measure and what the chat engine falls back to without kernels."""
    md = load_model_dir(model_dir)
    cfg, sd = md.config, md.tensors
    if not md.quantized:
        raise ModelDirError(f"{model_dir}: not quantized (no quantization_config in config.json)")
    fmt = md.quant["checkpoint_format"]
    head = set(HEAD_PARTS)
    dense: dict[str, torch.Tensor] = {}
    prefixes = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".qweight")} - head
    for p in prefixes:
        dense[f"{p}.weight"] = dequantize_packed({s: sd[f"{p}.{s}"] for s in PACKED_SUFFIXES}, 4, fmt)
    dense.update({k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in prefixes | head})
    model = MergedLaVIN(md.lavin, md.position_offset)
    model.load_state_dict(module_state_dict(dense), strict=True)
    return model.to(dtype).eval(), cfg
