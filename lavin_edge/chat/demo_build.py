"""Build the out-of-the-box demo model on first use, from the adapter file that ships in this package.

``demo_adapters/`` holds what ``lavin-edge train recipes/demo-chat.toml`` produced from the adapters of
``recipes/demo.toml`` (``adapters.safetensors``, 2.9 MB, its ``config.json`` with the recipe, the held-out
``eval.json`` and ``train_log.jsonl``). The frozen bases
come from the two asset packages (SmolLM2-135M-Instruct GGUF, EfficientNet-Lite0), so the first chat runs
the project's own ``merge`` and ``quantize`` (GPTQ, 4-bit, group 64, symmetric) once and caches the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lavin_edge.chat.demo import MERGED_NAME, QUANTIZED_NAME
from lavin_edge.modeldir import FORMAT_VERSION

ADAPTERS_DIR = Path(__file__).resolve().parent / "demo_adapters"
# The GPTQ settings of the demo (`lavin-edge quantize --group-size 64 --sym --asym-calib 0.25 --calib-samples 32
# --calib-len 112 --calib-recipe recipes/demo-chat.toml --eval-texts 0`): SmolLM2's 576 inputs are not divisible
# by 128. Calibration draws from the adapters' own training data (their recipe's [[data]], recorded in
# config.json): conversations with their earlier turns, self-distilled instructions, prose, single questions;
# on the 4-bit demo it answered more follow-ups right than docstrings + single questions did (README).
# (``lavin_edge.quantize.step.QuantizeOptions`` fields; a plain dict so that chat, which checks the fingerprint
# at every start, need not import the quantizer.)
QUANTIZE_OPTIONS = {"group_size": 64, "sym": True, "asym_calib": 0.25, "calib_samples": 32, "calib_len": 112,
                    "eval_texts": 0}
# Written beside merged/ and quantized/ once both exist: what they were built from.
STAMP_NAME = "demo_source.json"


def shipped_fingerprint() -> str:
    """sha256 over the shipped adapter files, the quantize settings and the model-dir format version: a cached
    demo built from anything else (an older release's adapters, other GPTQ settings, an older format) is stale."""
    h = hashlib.sha256()
    for name in ("adapters.safetensors", "config.json"):
        h.update(name.encode())
        h.update((ADAPTERS_DIR / name).read_bytes())
    h.update(json.dumps(QUANTIZE_OPTIONS, sort_keys=True).encode())
    h.update(f"format_version {FORMAT_VERSION}".encode())
    return h.hexdigest()


def built_fingerprint(root: Path) -> str | None:
    """The fingerprint a demo under ``root`` was built from; None when it carries no stamp (built by hand)."""
    try:
        return str(json.loads((root / STAMP_NAME).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_demo(root: Path, echo: Callable[[str], None] = print, fresh: bool = False) -> Path:
    """merge + quantize the shipped adapters into ``root/merged`` and ``root/quantized``; returns the
    quantized dir. Both steps write all or nothing (``lavin_edge.modeldir``), so an interrupted build leaves
    nothing half-written behind. What exists is kept unless ``fresh`` or its stamp names other adapters."""
    from lavin_edge import merge
    from lavin_edge.quantize import step

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
        merge.merge_dir(ADAPTERS_DIR, merged, llm="smollm2-135m", vision="efficientnet-lite0", overwrite=True)
    if not (quantized / "config.json").is_file():
        echo("GPTQ-quantizing the merged LLM to 4 bits (group 64), calibrated on the adapters' training data")
        # The build's report goes through echo (stderr for chat: `chat --prompt` promises stdout holds only the answer).
        # Adapters without a recorded recipe calibrate on docstrings and easy-vqa questions (the quantizer's default).
        calib_data = json.loads((ADAPTERS_DIR / "config.json").read_text()).get("recipe", {}).get("data")
        step.quantize_dir(merged, quantized, step.QuantizeOptions(**QUANTIZE_OPTIONS, calib_data=calib_data),
                          overwrite=True, echo=echo)
    if stamp != fingerprint:
        tmp = root / f".{STAMP_NAME}.tmp"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "adapters": str(ADAPTERS_DIR)}, indent=2) + "\n")
        os.replace(tmp, root / STAMP_NAME)
    return quantized
