"""Build the out-of-the-box demo model on first use, from the adapter file that ships in this package.

``demo_adapters/`` holds what ``lavin-edge train train/demo.toml`` produced (``adapters.safetensors``,
2.9 MB, and its ``config.json``; reproduce it with ``python benchmarks/train_demo.py``). The frozen bases
come from the two asset packages (SmolLM2-135M-Instruct GGUF, EfficientNet-Lite0), so the first chat runs
the project's own ``merge`` and ``quantize`` (GPTQ, 4-bit, group 64, symmetric) once and caches the result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lavin_edge.chat.demo import MERGED_NAME, QUANTIZED_NAME

ADAPTERS_DIR = Path(__file__).resolve().parent / "demo_adapters"
# The GPTQ settings of the demo: SmolLM2's 576 inputs are not divisible by 128.
QUANTIZE_ARGS = ["--group-size", "64", "--sym", "--calib-samples", "32", "--calib-len", "64", "--eval-texts", "0"]


def build_demo(root: Path, echo: Callable[[str], None] = print) -> Path:
    """merge + quantize the shipped adapters into ``root/merged`` and ``root/quantized``; returns the
    quantized dir. Each result is written to a temporary dir and renamed, so an interrupted build leaves
    nothing half-written behind."""
    from lavin_edge.commands.quantize import command as quantize_command
    from lavin_edge.merge import merge_dir

    if not (ADAPTERS_DIR / "adapters.safetensors").is_file():
        raise FileNotFoundError(f"the demo adapters are missing from this install ({ADAPTERS_DIR})")
    root.mkdir(parents=True, exist_ok=True)
    merged, quantized = root / MERGED_NAME, root / QUANTIZED_NAME
    if not (merged / "config.json").is_file():
        echo(f"building the demo model (once) in {root}: merging the shipped adapters into SmolLM2 + EfficientNet")
        _atomic_dir(merged, lambda tmp: merge_dir(ADAPTERS_DIR, tmp, llm="smollm2-135m", vision="efficientnet-lite0"))
    if not (quantized / "config.json").is_file():
        echo("GPTQ-quantizing the merged LLM to 4 bits (group 64), calibrated on easy-vqa and text")
        # The build's report goes to stderr: `chat --prompt` promises stdout holds only the answer.
        with contextlib.redirect_stdout(sys.stderr):
            _atomic_dir(quantized, lambda tmp: quantize_command.main([str(merged), str(tmp), *QUANTIZE_ARGS],
                                                                     standalone_mode=False))
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
