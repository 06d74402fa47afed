"""Model dir -> the runtime's ops: the one place the runtime reads a merged or quantized model dir.

Two halves. Reading (``read_model_dir`` and the functions under it) is the seam to the model-dir format:
config, tensors, quantization settings, tokenizer. Building (``build_weights``) turns those tensors into a
backend's ops: fused q|k|v and gate|up linears, norms with their folded adapters, the head, the vision
tower. Two load-time steps are kept behind one function each because the quantize step will take them
over: ``head_w4_parts`` (RTN of an fp head into 4-bit value + residual) and ``model_tokenizer``
(a tokenizer rebuilt from the dir's tokenizer file, e.g. a GGUF).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lavin_edge.config import LavinConfig
from lavin_edge.merge import ModelDirError  # one error type for every model-dir problem
from lavin_edge.runtime.ops import GPTQTensors, LinearOp, NormAdapter

if TYPE_CHECKING:
    from lavin_edge.runtime.backends import Backend

MERGED_FORMAT = "lavin-edge-merged"  # quantized dirs keep it and add quantization_config (lavin_edge.merge)
LINEAR_NAMES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                "feed_forward.w2", "feed_forward.w3")

__all__ = ["ModelDirContents", "ModelDirError", "RuntimeLayer", "RuntimeWeights", "build_weights", "read_model_dir"]


# ------------------------------------------------------------------------------------------- reading

@dataclass
class ModelDirContents:
    """What the runtime needs from a model dir."""

    cfg: LavinConfig
    tensors: Mapping[str, torch.Tensor]
    quant: dict[str, Any]
    tokenizer: Any
    position_offset: int = 1


def read_model_dir(path: str | Path) -> ModelDirContents:
    """Read a merged or quantized model dir (ModelDirError naming the problem)."""
    path = Path(path)
    raw = read_config(path)
    cfg = lavin_config(raw)
    tok = model_tokenizer(path, raw)
    return ModelDirContents(cfg, load_tensors(path), quant_settings(raw), tok, int(raw.get("position_offset", 1)))


def read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelDirError(f"{path}: model directory not found")
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory (expected a merged or quantized model dir)")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelDirError(f"{path}: no config.json (not a lavin-edge model dir)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{cfg_path}: not valid JSON ({e})") from e
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt != MERGED_FORMAT:
        hint = " (trained adapters: run `lavin-edge merge` first)" if (path / "adapters.safetensors").exists() else ""
        raise ModelDirError(f"{path}: config.json format {fmt!r} is not a servable lavin-edge model "
                            f"(expected {MERGED_FORMAT!r}){hint}")
    version = cfg.get("format_version")
    if version != 1:
        raise ModelDirError(f"{path}: format_version {version!r} is not supported by this lavin-edge "
                            "(supports 1); re-run merge/quantize with this version")
    return cfg


def lavin_config(cfg: dict[str, Any]) -> LavinConfig:
    try:
        return LavinConfig.from_dict(cfg["lavin_config"])
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"config.json does not describe a LaVIN model ({e})") from e


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"{path}: no .safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelDirError(f"{f}: unreadable safetensors file ({e})") from e
    return out


def quant_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    q = cfg.get("quantization_config") or {}
    if q and int(q.get("bits", 4)) != 4:
        raise ModelDirError(f"quantization_config bits={q.get('bits')}: only 4-bit GPTQ is served")
    return {"checkpoint_format": q.get("checkpoint_format", "gptq"), "group_size": int(q.get("group_size", 128))}


def model_tokenizer(path: Path, raw: dict[str, Any]) -> Any:
    """The dir's tokenizer; no tokenizer entry: the byte tokenizer, the only one a model can have without a
    vocab file. (Moves to the model-dir module once quantize writes ``tokenizer.json``.)"""
    from lavin_edge.io.tokenizer import ByteTokenizer, load_tokenizer
    from lavin_edge.merge import tokenizer_path

    try:
        tok_file = tokenizer_path(path, raw)
        return ByteTokenizer() if tok_file is None else load_tokenizer(tok_file)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise ModelDirError(f"{path}: tokenizer: {e}") from e


def head_w4_parts(head: torch.Tensor, dim: int) -> list[GPTQTensors]:
    """An fp head [vocab, dim] as two 4-bit passes: RTN of W, then RTN of the residual W - W4(W) (group 64),
    ~8-bit accuracy for 1/4 of the fp32 bytes. A single 4-bit pass flipped a third of SmolLM2's top-1
    predictions; the residual pass brings it back. (Moves to the quantize step, which will store the parts.)"""
    from lavin_edge.quantize.gptq import rtn_quantize
    from lavin_edge.quantize.pack import pack_linear

    gs = next((g for g in (64, 32) if dim % g == 0), -1)

    def rtn(w: torch.Tensor) -> GPTQTensors:
        t = pack_linear(rtn_quantize(w, 4, gs, True), 4, "gptq")
        return GPTQTensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], "gptq", gs)

    hi = rtn(head)
    return [hi, rtn(head - hi.dequantize())]


def take_linear(sd: Mapping[str, torch.Tensor], name: str, q: dict[str, Any]) -> torch.Tensor | GPTQTensors:
    if f"{name}.weight" in sd:
        return sd[f"{name}.weight"]
    keys = [f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")]
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ModelDirError(f"tensor {name}.weight (or its GPTQ tensors {missing}) missing from the model")
    return GPTQTensors(*(sd[k] for k in keys), q["checkpoint_format"], q["group_size"])  # type: ignore[arg-type]


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
            lm_head = backend.sum_linear(head_w4_parts(head, llm.dim))
        else:
            lm_head = backend.linear(head)
        layers = [_layer(cfg, sd, i, quant, backend) for i in range(llm.n_layers)]
    except KeyError as e:
        raise ModelDirError(f"tensor {e} missing from the model") from e
    vision, proj = _vision(cfg, sd, backend)
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


def _vision(cfg: LavinConfig, sd: Mapping[str, torch.Tensor], backend: Backend
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
