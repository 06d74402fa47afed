"""``merge``: base + trained adapters -> one deployable model directory (routers folded).

The LLM routing is a constant table [layers x 2 modalities x 2 experts] (position 0 holds the modality
token and attends only to itself, so its state at every layer depends on the modality alone). We compute
it by running the two modality tokens through the LLM as one-token sequences, fold each layer's two
experts into one up-projection per modality, and drop the router and the modality token.

The directory it writes (config.json, model.safetensors, the tokenizer, the completeness marker) is defined
by ``lavin_edge.modeldir`` and docs/model-format.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lavin_edge.config import LavinConfig
from lavin_edge.model.lavin import LaVIN
from lavin_edge.model.llama import KVCache
from lavin_edge.model.merged import MergedLaVIN
from lavin_edge.modeldir import (
    FORMAT,
    POSITION_OFFSET,
    ModelDirError,
    load_tensors,
    read_config,
    tokenizer_path,
    write_model_dir,
)

__all__ = ["FORMAT", "ModelDirError", "file_state_dict", "load_merged", "load_trained", "merge_dir", "merge_lavin",
           "module_state_dict", "read_config", "routing_table", "save_merged", "tokenizer_path"]


@torch.no_grad()
def routing_table(model: LaVIN) -> torch.Tensor:
    """[layers, 2 modalities, 2 experts]: each layer's routing weights for text (0) and image (1) inputs.

    A one-token sequence holding only the modality token gives position 0 exactly the state it has in
    any longer sequence, since the attention mask lets it see only itself."""
    llm = model.llm
    was_training = model.training
    model.eval()
    try:
        h = model.modality_embedding(torch.arange(2, device=model.modality_embedding.weight.device))[:, None]
        cache = KVCache.allocate(llm.cfg, 2, 1, h.dtype, h.device)
        llm.forward_embeds(h, cache=cache)
        rows = []
        for layer, route in zip(llm.layers, cache.route, strict=True):
            if layer.adapter is None or route is None:
                raise ValueError("the LLM has no routed adapters to merge")
            rows.append(layer.adapter.routing_weights(route)[:, 0])  # [2 modalities, 2 experts]
        table = torch.stack(rows)
        return table if table.dtype == torch.float64 else table.float()
    finally:
        model.train(was_training)


@torch.no_grad()
def merge_lavin(model: LaVIN) -> tuple[MergedLaVIN, torch.Tensor]:
    """The merged runtime model (same dtype as ``model``) and the routing table it folded in (fp32).

    Reproducible: the table is computed in fp64 (``model`` is widened for the call, exactly, and restored) and
    rounded once to fp32; the CPU's SIMD kernels and thread count move its fp64 value by a few ulps, which
    changes the fp32 table only if an entry lies that close to a rounding boundary (120 numbers for SmolLM2,
    docs/reproducibility.md). The folds are then exact elementwise arithmetic on fp32 numbers: w * t (fp32
    times fp32) is exact in fp64, and the one sum and scaling are correctly rounded IEEE operations, the
    same on every CPU; each folded value is rounded once to the model's dtype."""
    dtype = next(model.parameters()).dtype
    model.to(torch.float64)
    try:
        table = routing_table(model).float()  # the one rounding the CPU can move (see above)
        merged = MergedLaVIN(LavinConfig.from_dict(model.cfg.to_dict()), POSITION_OFFSET)
        merged.to(dtype)
        llm_sd = {k: v for k, v in model.llm.state_dict().items() if ".adapter." not in f".{k}"}
        missing = merged.llm.load_state_dict(llm_sd, strict=False).missing_keys  # copies round back exactly
        if any(".adapter." not in f".{k}" for k in missing):
            raise RuntimeError(f"merged LLM lacks base tensors: {missing[:5]}")
        for i, (src, dst) in enumerate(zip(model.llm.layers, merged.llm.layers, strict=True)):
            ad = src.adapter
            dst.adapter.down.load_state_dict(ad.down.state_dict())
            for m in range(2):
                u_w, u_b = ad.folded(table[i, m].double())
                dst.adapter.up.weight[m] = u_w.to(dtype)
                dst.adapter.up.bias[m] = u_b.to(dtype)
        merged.vision.load_state_dict(model.vision.state_dict())
        merged.visual_proj.load_state_dict(model.visual_proj.state_dict())
    finally:
        model.to(dtype)
    return merged.eval(), table


# ----------------------------------------------------------------------------- files

def file_state_dict(model: MergedLaVIN) -> dict[str, torch.Tensor]:
    """The module's state dict in the file's naming: LLM tensors at the top level (Meta names)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k[len("llm."):] if k.startswith("llm.") else k] = v.contiguous()
    return out


def module_state_dict(file_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``file_state_dict``."""
    return {k if k.startswith(("vision.", "visual_proj.")) else f"llm.{k}": v for k, v in file_sd.items()}


def save_merged(model: MergedLaVIN, out_dir: str | Path, tokenizer: Any = None,
                source: dict[str, Any] | None = None, routing: torch.Tensor | None = None,
                extra: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None,
                extra_files: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write the model directory (``lavin_edge.modeldir.write_model_dir``: all or nothing, marker last).

    ``tokenizer``: a loaded tokenizer, a tokenizer path, ``"bytes"`` or None; ``tensors`` replaces the state dict
    (the quantizer passes its packed tensors); ``extra`` adds config keys (``quantization_config``);
    ``extra_files`` more files (``quantize_config.json``)."""
    cfg: dict[str, Any] = {
        "lavin_config": model.cfg.to_dict(),
        "position_offset": model.llm.position_offset,
        "routing_table": None if routing is None else routing.tolist(),
        "source": source or {},
        **(extra or {}),
    }
    sd = file_state_dict(model) if tensors is None else tensors
    return write_model_dir(out_dir, cfg, sd, tokenizer, extra_files, overwrite)


def load_merged(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MergedLaVIN, dict[str, Any]]:
    """Load an unquantized merged directory -> (model in eval mode, config dict)."""
    cfg = read_config(model_dir, allow_quantized=False)
    model = MergedLaVIN(LavinConfig.from_dict(cfg["lavin_config"]), int(cfg["position_offset"]))
    sd = module_state_dict(load_tensors(model_dir))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"{model_dir}: the tensors do not match config.json ({str(e).splitlines()[0]})") from e
    return model.to(dtype).eval(), cfg


# ----------------------------------------------------------------------------- trained artifacts

def load_trained(adapter_dir: str | Path, llm: str | Path | None = None, vision: str | Path | None = None
                 ) -> tuple[LaVIN, dict[str, Any], str | None]:
    """Rebuild the trained LaVIN from a ``lavin-edge train`` artifact (``adapters.safetensors`` + config.json
    with ``lavin_config`` and ``base``, see ``lavin_edge.training``), optionally with the base files moved
    (``llm``/``vision``). Returns (model in eval mode, the artifact's config.json, tokenizer path or None)."""
    import dataclasses

    from lavin_edge.io.outdir import require_complete
    from lavin_edge.training.base import BaseSpec, build_base
    from lavin_edge.training.checkpoint import load_adapters, load_artifact_config

    d = Path(adapter_dir)
    if not (d / "adapters.safetensors").is_file() or not (d / "config.json").is_file():
        raise ModelDirError(f"{d}: expected adapters.safetensors + config.json (the output of `lavin-edge train`)")
    meta = load_artifact_config(d)
    if meta.get("format") == FORMAT:
        raise ModelDirError(f"{d}: already merged")
    if "lavin_config" not in meta or "base" not in meta:
        raise ModelDirError(f"{d}: config.json lacks lavin_config/base (not a `lavin-edge train` artifact)")
    require_complete(d, what="adapters dir")  # a run killed mid-save: refused, never half-read
    cfg = LavinConfig.from_dict(meta["lavin_config"])
    base = BaseSpec(**meta["base"])
    base = dataclasses.replace(base, **{k: str(v) for k, v in (("llm", llm), ("vision", vision)) if v is not None})
    model, _, tok_spec = build_base(base, cfg.adapter)
    if model.cfg.llm.__dict__ != cfg.llm.__dict__ or model.cfg.vision.__dict__ != cfg.vision.__dict__:
        raise ModelDirError(f"{d}: the base {base} does not match the trained config")
    # The trained adapter settings (temperature, ...) win over the rebuilt defaults.
    model.cfg = cfg
    adapters = load_adapters(d)
    expected = set(model.trainable_state_dict())
    if set(adapters) != expected:
        diff = sorted(set(adapters) ^ expected)[:8]
        raise ModelDirError(f"{d}/adapters.safetensors does not match the model: {diff}")
    model.load_state_dict(adapters, strict=False)
    return model.eval(), meta, tok_spec


def merge_dir(adapter_dir: str | Path, out_dir: str | Path, llm: str | Path | None = None,
              vision: str | Path | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """The ``merge`` step: trained artifact dir -> merged model dir, written all or nothing.

    ``out_dir`` is checked before any model loads: it must not be or overlap the adapters or a base path, and
    an existing one is refused unless ``overwrite`` (an earlier model only). The base's tokenizer is written as
    ``tokenizer.json`` (a GGUF vocab is converted here, once) or ``tokenizer.model``. ``progress``: a bar over
    the steps on stderr."""
    import sys

    from tqdm.auto import tqdm

    from lavin_edge.io.outdir import OutputDirError, check_output
    from lavin_edge.io.tokenizer import load_tokenizer

    try:
        check_output(out_dir, overwrite=overwrite, inputs=(adapter_dir, llm, vision), what="merge output")
    except OutputDirError as e:
        raise ModelDirError(str(e)) from None
    steps = ["load the base and adapters", "fold the routers", "write"]
    with tqdm(total=len(steps), desc="merge", unit="step", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        bar.set_postfix_str(steps[0])
        model, meta, tok = load_trained(adapter_dir, llm, vision)
        bar.update()
        bar.set_postfix_str(steps[1])
        merged, table = merge_lavin(model)
        bar.update()
        bar.set_postfix_str(steps[2])
        source = {"adapters": str(Path(adapter_dir).resolve()), "base": meta["base"]}
        path = save_merged(merged, out_dir, None if tok is None else load_tokenizer(tok), source, table,
                           overwrite=overwrite)
        bar.update()
    return path
