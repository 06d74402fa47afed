"""The trained artifact, a directory: ``adapters.safetensors`` (the trainable state dict, a few MB),
``config.json`` (the LavinConfig + where the base came from, so ``merge``/``eval`` can rebuild it) and
``trainer_state.pt`` (optimizer, schedule, RNG and data position, for an exact ``--resume``).

Every file is written to a temporary name in the same directory (``stage_*``) and renamed over the old one;
``train`` stages all the files of a save before it renames any (``lavin_edge.training.rundir``).
Also: import of the reference implementation's ``checkpoint-*.pth`` adapter keys."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ADAPTERS = "adapters.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"


def stage(path: Path, write: Callable[[str], None]) -> Path:
    """Write a file's new content to a temporary sibling (``.NAME.*.tmp``) and return it; the caller renames
    it over ``path`` (os.replace) when every file of a save is staged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; artifacts are meant to be shared like any other output file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Path(tmp)


def stage_adapters(state: dict[str, torch.Tensor], out_dir: str | Path, metadata: dict[str, str] | None = None
                   ) -> tuple[Path, Path]:
    """(staged temporary file, final path) of ``adapters.safetensors``."""
    path = Path(out_dir) / ADAPTERS
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return stage(path, lambda p: save_file(tensors, p, metadata=metadata or {})), path


def stage_json(obj: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    return stage(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=True))), path


def stage_trainer_state(state: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    path = Path(out_dir) / TRAINER_STATE
    return stage(path, lambda p: torch.save(state, p)), path


def save_adapters(state: dict[str, torch.Tensor], out_dir: str | Path, metadata: dict[str, str] | None = None
                  ) -> Path:
    tmp, path = stage_adapters(state, out_dir, metadata)
    os.replace(tmp, path)
    return path


def load_adapters(path: str | Path) -> dict[str, torch.Tensor]:
    """``path``: an artifact directory or the safetensors file itself."""
    p = Path(path)
    return load_file(str(p / ADAPTERS if p.is_dir() else p))


def save_json(obj: dict[str, Any], path: str | Path) -> Path:
    tmp, path = stage_json(obj, path)
    os.replace(tmp, path)
    return path


def save_trainer_state(state: dict[str, Any], out_dir: str | Path) -> Path:
    tmp, path = stage_trainer_state(state, out_dir)
    os.replace(tmp, path)
    return path


def load_trainer_state(out_dir: str | Path) -> dict[str, Any]:
    # weights_only=False: the state holds python RNG tuples and numpy state, written by this code.
    return torch.load(Path(out_dir) / TRAINER_STATE, map_location="cpu", weights_only=False)


def load_artifact_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / CONFIG).read_text())


# --------------------------------------------------------------------------- reference checkpoint import

_REF_ADAPTER_PARTS = {"conv_A": "down", "conv_B": "up_b", "conv_D": "up_d", "expert_weights": "router"}
_REF_PROJ_PARTS = {"conv_A": "inp.0", "conv_B": "out"}


def reference_key(key: str) -> str | None:
    """Our name for a reference (``checkpoint-*.pth``) key, or None for keys that are not adapter parts."""
    key = key.removeprefix("module.")
    m = re.fullmatch(r"layers\.(\d+)\.adapter_attn\.(conv_A|conv_B|conv_D|expert_weights)\.(weight|bias)", key)
    if m:
        return f"llm.layers.{m[1]}.adapter.{_REF_ADAPTER_PARTS[m[2]]}.{m[3]}"
    m = re.fullmatch(r"backbone\.visual\.transformer\.resblocks\.(\d+)\.adapter_attn\."
                     r"(conv_A|conv_B|conv_D|expert_weights)\.(weight|bias)", key)
    if m:
        return f"vision.transformer.resblocks.{m[1]}.adapter.{_REF_ADAPTER_PARTS[m[2]]}.{m[3]}"
    m = re.fullmatch(r"adapter_proj\.(conv_A|conv_B)\.(weight|bias)", key)
    if m:
        return f"visual_proj.{_REF_PROJ_PARTS[m[1]]}.{m[2]}"
    if key == "adapter_modality_embedding.weight":
        return "modality_embedding.weight"
    return None


def convert_reference_state(ref: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename the reference's adapter keys to ours; 1x1 conv weights [out, in, 1] lose the kernel dim.

    Returns (converted, ignored keys). Frozen base weights that such a checkpoint may hold are ignored."""
    out: dict[str, torch.Tensor] = {}
    ignored = []
    for k, v in ref.items():
        name = reference_key(k)
        if name is None:
            ignored.append(k)
            continue
        if v.ndim == 3 and v.shape[-1] == 1:
            v = v[..., 0]
        out[name] = v.float().contiguous()
    return out, ignored
