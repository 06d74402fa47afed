"""Merged and quantized model directories: the one module that writes, reads and validates them.

``merge`` and ``quantize`` write through :func:`write_model_dir`; ``chat``, ``eval`` and ``bench`` read through
:func:`load_model_dir` (or :func:`read_config` + :func:`load_tensors`). Every problem is a
:class:`ModelDirError` naming the directory and what is wrong. The layout is documented in
docs/model-format.md; in short:

- ``config.json``: ``format`` (``"lavin-edge-merged"``), ``format_version`` (2), ``lavin_config``,
  ``position_offset``, ``tokenizer``, ``routing_table``, ``source``; quantized dirs add ``quantization_config``
  and ``lm_head_w4``;
- ``model.safetensors``: the tensors (LLM in Meta naming at the top level, ``vision.*``, ``visual_proj.*``;
  quantized linears as the four GPTQ tensors of ``lavin_edge.kernels.gptq_format``; the lm_head's served
  4-bit form as ``output.hi.*`` + ``output.lo.*``);
- ``tokenizer.json`` (+ the special ids in ``config.json``) or ``tokenizer.model``;
- ``lavin-edge-complete.json``, written last (``lavin_edge.io.outdir``): a directory without it, or whose files
  changed size since, is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lavin_edge.config import LavinConfig
from lavin_edge.io.outdir import MODEL_FORMAT, OutputDirError, atomic_dir, require_complete

if TYPE_CHECKING:  # reading config.json and the tokenizer needs no PyTorch (lavin_edge.runtime.numpy_engine)
    import torch

    from lavin_edge.kernels.gptq_format import GPTQTensors

__all__ = ["FORMAT", "FORMAT_VERSION", "HEAD_PARTS", "LINEAR_NAMES", "POSITION_OFFSET", "ModelDir", "ModelDirError",
           "load_model_dir", "load_tensors", "quant_settings", "read_config", "take_linear", "validate_tensors",
           "write_model_dir", "write_tokenizer"]

FORMAT = MODEL_FORMAT  # also the completeness marker's: io.outdir recognises model dirs by it
# 2: completeness marker, tokenizer.json with its special ids (no GGUF reference), the lm_head's 4-bit form.
FORMAT_VERSION = 2
POSITION_OFFSET = 1
TENSORS_FILE = "model.safetensors"
# The LLM linears of each layer, in execution order.
LINEAR_NAMES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
                "feed_forward.w2")
# The lm_head as served with the kernels: value + residual, two symmetric 4-bit RTN passes (gptq_format.residual_w4).
HEAD_PARTS = ("output.hi", "output.lo")
HEAD_RESCORE_TOP = 8  # logits of that 4-bit head re-scored from the fp weight rows at run time (RescoredHead)


class ModelDirError(ValueError):
    """A model directory that is not what the command expects (missing, incomplete, not merged, wrong version,
    tensors that do not match the config ...)."""


# ----------------------------------------------------------------------------------------------- writing

def write_tokenizer(tokenizer: Any, out: Path) -> dict[str, Any] | None:
    """Put ``tokenizer`` into the directory ``out`` and return its ``config.json`` entry.

    ``tokenizer``: a loaded ``lavin_edge.io.tokenizer.Tokenizer`` (a GGUF vocab is written as ``tokenizer.json``
    with its special ids recorded, so chat never parses the GGUF again), a path (``.gguf``, ``tokenizer.json``,
    ``tokenizer.model`` or a directory with one; loaded first), ``"bytes"`` or None."""
    from lavin_edge.io.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer

    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(tokenizer, ByteTokenizer):
        return {"builtin": "bytes"}
    if isinstance(tokenizer, HFTokenizer):
        return {"file": "tokenizer.json", **tokenizer.save(out / "tokenizer.json")}
    if isinstance(tokenizer, SentencePieceTokenizer):
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
        return {"file": "tokenizer.model"}
    raise TypeError(f"cannot store a tokenizer of type {type(tokenizer).__name__}")


def write_model_dir(out: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Any = None,
                    extra_files: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write a complete model directory at ``out``, all or nothing (``io.outdir.atomic_dir``).

    ``config``: every ``config.json`` key but ``format``, ``format_version`` and ``tokenizer`` (added here);
    ``extra_files``: more text files by name (``quantize_config.json`` ...). An existing ``out`` is refused
    unless ``overwrite`` (the old one stays until the new one is complete)."""
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite=overwrite, marker={"format": FORMAT, "format_version": FORMAT_VERSION}) as tmp:
        cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, **config,
               "tokenizer": write_tokenizer(tokenizer, tmp)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE),
                  metadata={"format": FORMAT})
        # The temporary directory is created 0700 and safetensors writes 0600; model directories are shared like
        # any other output.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.chmod(tmp / TENSORS_FILE, 0o666 & ~umask)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(out)


# ----------------------------------------------------------------------------------------------- reading

def read_config(model_dir: str | Path, allow_quantized: bool = True) -> dict[str, Any]:
    """``config.json`` of a complete merged or quantized directory; ModelDirError for anything else."""
    d = Path(model_dir)
    if not d.exists():
        raise ModelDirError(f"{d}: model directory not found")
    if not d.is_dir():
        raise ModelDirError(f"{d}: not a directory (expected a merged or quantized model dir)")
    f = d / "config.json"
    if not f.is_file():
        hint = " (it looks like trained adapters: run `lavin-edge merge` first)" if (
            d / "adapters.safetensors").exists() else ""
        raise ModelDirError(f"{d}: no config.json (not a lavin-edge model dir){hint}")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ModelDirError(f"{f}: not valid JSON ({e})") from e
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt != FORMAT:
        hint = " (it looks like trained adapters: run `lavin-edge merge` first)" if (
            d / "adapters.safetensors").exists() else ""
        raise ModelDirError(f"{d}: not a merged model (config.json format is {fmt!r}, expected {FORMAT!r}){hint}")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        again = "quantize" if "quantization_config" in cfg else "merge"
        raise ModelDirError(f"{d}: format_version {version!r}, this lavin-edge reads {FORMAT_VERSION}: re-run "
                            f"`lavin-edge {again}` with this version to rewrite it")
    try:
        require_complete(d, "model directory")
    except OutputDirError as e:
        raise ModelDirError(str(e)) from None
    if not allow_quantized and "quantization_config" in cfg:
        qc = cfg["quantization_config"]
        what = (f"{qc.get('bits', '?')}-bit, group size {qc.get('group_size', '?')}" if isinstance(qc, dict)
                else "quantized")
        raise ModelDirError(f"{d} is already quantized ({what}); this step takes a merged, unquantized model "
                            "dir (the output of `lavin-edge merge`)")
    if not (d / TENSORS_FILE).is_file():
        raise ModelDirError(f"{d}: {TENSORS_FILE} missing")
    return cfg


def lavin_config(cfg: dict[str, Any], model_dir: str | Path = "") -> LavinConfig:
    try:
        return LavinConfig.from_dict(cfg["lavin_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{model_dir}: config.json does not describe a LaVIN model ({e})") from e


def load_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(model_dir) / TENSORS_FILE
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ModelDirError(f"{f}: unreadable safetensors file ({e})") from e


def quant_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What reading the GPTQ tensors needs: ``checkpoint_format``, ``group_size``, and ``lm_head_w4`` (the stored
    head's settings, or None)."""
    q = cfg.get("quantization_config") or {}
    try:
        if q and int(q.get("bits", 4)) != 4:
            raise ModelDirError(f"quantization_config bits={q.get('bits')}: only 4-bit GPTQ is served")
        return {"checkpoint_format": q.get("checkpoint_format", "gptq"), "group_size": int(q.get("group_size", 128)),
                "lm_head_w4": cfg.get("lm_head_w4")}
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"quantization_config is malformed ({e})") from e


def take_linear(sd: Mapping[str, torch.Tensor], name: str, q: dict[str, Any]) -> torch.Tensor | GPTQTensors:
    """Linear ``name`` as its fp ``.weight`` or its four GPTQ tensors."""
    from lavin_edge.kernels.gptq_format import PACKED_SUFFIXES, GPTQTensors

    if f"{name}.weight" in sd:
        return sd[f"{name}.weight"]
    keys = [f"{name}.{s}" for s in PACKED_SUFFIXES]
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ModelDirError(f"tensor {name}.weight (or its GPTQ tensors {missing}) missing from the model")
    return GPTQTensors(*(sd[k] for k in keys), q["checkpoint_format"], q["group_size"])  # type: ignore[arg-type]


def stored_head(sd: Mapping[str, torch.Tensor], q: dict[str, Any]) -> tuple[GPTQTensors, GPTQTensors] | None:
    """The lm_head's stored 4-bit value + residual, or None when the directory has none."""
    head = q.get("lm_head_w4")
    if not head:
        return None
    hq = {"checkpoint_format": head.get("checkpoint_format", "gptq"), "group_size": int(head["group_size"])}
    hi, lo = (take_linear(sd, p, hq) for p in HEAD_PARTS)
    return hi, lo  # type: ignore[return-value]  # take_linear of packed names gives GPTQTensors


def _expect(sd: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> None:
    t = sd.get(name)
    if t is None:
        raise ModelDirError(f"{where}: tensor {name} missing")
    if tuple(t.shape) != shape:
        raise ModelDirError(f"{where}: {name} has shape {list(t.shape)}, the config says {list(shape)}: the tensors "
                            "do not match config.json (rewrite the directory)")


def _expect_linear(sd: Mapping[str, torch.Tensor], name: str, n: int, k: int, gs: int, where: str) -> None:
    if f"{name}.weight" in sd:
        _expect(sd, f"{name}.weight", (n, k), where)
        return
    g = 1 if gs <= 0 else k // gs
    if gs > 0 and k % gs:
        raise ModelDirError(f"{where}: {name} has {k} inputs, not divisible by the group size {gs}")
    for suffix, shape in (("qweight", (k // 8, n)), ("qzeros", (g, (n + 7) // 8)), ("scales", (g, n)),
                          ("g_idx", (k,))):
        _expect(sd, f"{name}.{suffix}", shape, where)


def validate_tensors(cfg: LavinConfig, sd: Mapping[str, torch.Tensor], q: dict[str, Any], where: str = "") -> None:
    """Every LLM tensor present with the shape the config gives (a mismatch is a ModelDirError here, not a
    shape error deep in a kernel)."""
    llm = cfg.llm
    d, hd, v = llm.dim, llm.head_dim, llm.vocab_size
    shapes = {"attention.wq": (llm.n_heads * hd, d), "attention.wk": (llm.n_kv_heads * hd, d),
              "attention.wv": (llm.n_kv_heads * hd, d), "attention.wo": (d, llm.n_heads * hd),
              "feed_forward.w1": (llm.ffn_dim, d), "feed_forward.w3": (llm.ffn_dim, d),
              "feed_forward.w2": (d, llm.ffn_dim)}
    _expect(sd, "tok_embeddings.weight", (v, d), where)
    _expect(sd, "norm.weight", (d,), where)
    if not llm.tie_embeddings:
        if "output.weight" not in sd and "output.qweight" not in sd:
            raise ModelDirError(f"{where}: tensor output.weight missing (embeddings are not tied)")
        _expect_linear(sd, "output", v, d, q["group_size"], where)
    for i in range(llm.n_layers):
        p = f"layers.{i}."
        for n in ("attention_norm.weight", "ffn_norm.weight"):
            _expect(sd, p + n, (d,), where)
        for name, (n_out, k) in shapes.items():
            _expect_linear(sd, p + name, n_out, k, q["group_size"], where)
    head = q.get("lm_head_w4")
    if head:
        for part in HEAD_PARTS:
            _expect_linear(sd, part, v, d, int(head["group_size"]), where)


def tokenizer_path(model_dir: str | Path, config: dict[str, Any]) -> Path | None:
    """Where the model's tokenizer file lives (``Path("bytes")`` for the built-in byte tokenizer), or None."""
    entry = config.get("tokenizer")
    if not entry:
        return None
    if "builtin" in entry:
        return Path(entry["builtin"])
    return Path(model_dir) / entry["file"]


def load_tokenizer_of(model_dir: str | Path, config: dict[str, Any]) -> Any:
    """The model's tokenizer; a directory without one gets the byte tokenizer (the only one a model can have
    without a vocab file)."""
    from lavin_edge.io.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

    entry = config.get("tokenizer")
    try:
        if not entry:
            return ByteTokenizer()
        path = tokenizer_path(model_dir, config)
        if "bos_id" in entry and path is not None and path.suffix == ".json":
            return HFTokenizer.from_file(path, entry)
        return load_tokenizer(path)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as e:
        raise ModelDirError(f"{model_dir}: tokenizer: {e}") from e


@dataclass
class ModelDir:
    """A loaded model directory: everything the runtime needs, nothing it must recompute."""

    path: Path
    config: dict[str, Any]  # config.json as written
    lavin: LavinConfig
    tensors: dict[str, torch.Tensor]  # file naming (LLM tensors at the top level)
    quant: dict[str, Any]  # quant_settings()
    tokenizer: Any

    @property
    def position_offset(self) -> int:
        return int(self.config.get("position_offset", POSITION_OFFSET))

    @property
    def quantized(self) -> bool:
        return "quantization_config" in self.config


def load_model_dir(path: str | Path, allow_quantized: bool = True) -> ModelDir:
    """Read and validate a complete model directory (config, tensors against the config, tokenizer)."""
    path = Path(path)
    raw = read_config(path, allow_quantized)
    cfg = lavin_config(raw, path)
    quant = quant_settings(raw)
    sd = load_tensors(path)
    validate_tensors(cfg, sd, quant, str(path))
    return ModelDir(path, raw, cfg, sd, quant, load_tokenizer_of(path, raw))
