"""Build the out-of-the-box demo model on first use, from the adapter file that ships in this package.

``demo_adapters/`` holds what ``lavin-edge train train/demo.toml`` produced (``adapters.safetensors``,
2.9 MB, and its ``config.json``; reproduce it with ``python benchmarks/train_demo.py``). The frozen bases
come from the two asset packages (SmolLM2-135M-Instruct GGUF, EfficientNet-Lite0), so the first chat runs
the project's own ``merge`` and ``quantize`` (GPTQ, 4-bit, group 64, symmetric) once and caches the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lavin_edge.chat.demo import MERGED_NAME, QUANTIZED_NAME

ADAPTERS_DIR = Path(__file__).resolve().parent / "demo_adapters"
# The GPTQ settings of the demo: SmolLM2's 576 inputs are not divisible by 128.
QUANTIZE_ARGS = ["--group-size", "64", "--sym", "--asym-calib", "0.25", "--calib-samples", "32", "--calib-len", "64",
                 "--eval-texts", "0"]
# Written beside merged/ and quantized/ once both exist: what they were built from.
STAMP_NAME = "demo_source.json"


def shipped_fingerprint() -> str:
    """sha256 over the shipped adapter files and the quantize settings: a cached demo built from anything
    else (an older release's adapters, other GPTQ settings) is stale."""
    h = hashlib.sha256()
    for name in ("adapters.safetensors", "config.json"):
        h.update(name.encode())
        h.update((ADAPTERS_DIR / name).read_bytes())
    h.update(json.dumps(QUANTIZE_ARGS).encode())
    return h.hexdigest()


def built_fingerprint(root: Path) -> str | None:
    """The fingerprint a demo under ``root`` was built from; None when it carries no stamp (built by hand)."""
    try:
        return str(json.loads((root / STAMP_NAME).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_demo(root: Path, echo: Callable[[str], None] = print, fresh: bool = False) -> Path:
    """merge + quantize the shipped adapters into ``root/merged`` and ``root/quantized``; returns the
    quantized dir. Each result is written to a temporary dir and renamed, so an interrupted build leaves
    nothing half-written behind. What exists is kept unless ``fresh`` or its stamp names other adapters."""
    from lavin_edge.commands.quantize import command as quantize_command
    from lavin_edge.merge import merge_dir

    if not (ADAPTERS_DIR / "adapters.safetensors").is_file():
        raise FileNotFoundError(f"the demo adapters are missing from this install ({ADAPTERS_DIR})")
    root.mkdir(parents=True, exist_ok=True)
    merged, quantized = root / MERGED_NAME, root / QUANTIZED_NAME
    fingerprint = shipped_fingerprint()
    stamp = built_fingerprint(root)
    if (fresh or stamp is not None) and stamp != fingerprint and (merged.exists() or quantized.exists()):
        echo(f"the demo in {root} was not built from the adapters shipped in this install: rebuilding it")
        for d in (quantized, merged):
            shutil.rmtree(d, ignore_errors=True)
        (root / STAMP_NAME).unlink(missing_ok=True)
    if not (merged / "config.json").is_file():
        echo(f"building the demo model (once) in {root}: merging the shipped adapters into SmolLM2 + EfficientNet")
        _atomic_dir(merged, lambda tmp: merge_dir(ADAPTERS_DIR, tmp, llm="smollm2-135m", vision="efficientnet-lite0"))
    if not (quantized / "config.json").is_file():
        echo("GPTQ-quantizing the merged LLM to 4 bits (group 64), calibrated on easy-vqa and text")
        # The build's report goes to stderr: `chat --prompt` promises stdout holds only the answer.
        with contextlib.redirect_stdout(sys.stderr):
            _atomic_dir(quantized, lambda tmp: quantize_command.main([str(merged), str(tmp), *QUANTIZE_ARGS],
                                                                     standalone_mode=False))
    if stamp != fingerprint:
        tmp = root / f".{STAMP_NAME}.tmp"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "adapters": str(ADAPTERS_DIR)}, indent=2) + "\n")
        os.replace(tmp, root / STAMP_NAME)
    return quantized


def _atomic_dir(final: Path, write: Callable[[Path], object]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        shutil.rmtree(tmp)
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
