"""Build the out-of-the-box demo model on first use, from the adapter file that ships in this package.

``adapters/`` holds what ``lavin-edge train recipes/demo-chat.toml`` produced from the adapters of
``recipes/demo.toml`` (``adapters.safetensors``, 2.9 MB, its ``config.json`` with the recipe, the held-out
``eval.json`` and ``train_log.jsonl``). The frozen bases
come from the two asset packages (SmolLM2-135M-Instruct GGUF, EfficientNet-Lite0), so the first chat runs
the project's own ``merge`` and ``quantize`` (GPTQ, 4-bit, group 64, symmetric) once and caches the result.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from lavin_edge.demo import paths


def build_demo(root: Path, echo: Callable[[str], None] = print, fresh: bool = False) -> Path:
    """merge + quantize the shipped adapters into ``root/merged`` and ``root/quantized``; returns the
    quantized dir. Both steps write all or nothing (``lavin_edge.modeldir``), so an interrupted build leaves
    nothing half-written behind. What exists is kept unless ``fresh`` or its stamp names other adapters."""
    from lavin_edge import merge
    from lavin_edge.quantize import run

    if not (paths.ADAPTERS_DIR / "adapters.safetensors").is_file():
        raise FileNotFoundError(f"the demo adapters are missing from this install ({paths.ADAPTERS_DIR})")
    root.mkdir(parents=True, exist_ok=True)
    merged, quantized = root / paths.MERGED_NAME, root / paths.QUANTIZED_NAME
    fingerprint = paths.shipped_fingerprint()
    stamp = paths.built_fingerprint(root)
    if (fresh or stamp is not None) and stamp != fingerprint and (merged.exists() or quantized.exists()):
        echo(f"the demo in {root} was not built from the adapters shipped in this install: rebuilding it")
        for d in (quantized, merged):
            shutil.rmtree(d, ignore_errors=True)
        (root / paths.STAMP_NAME).unlink(missing_ok=True)
    if not (merged / "config.json").is_file():
        echo(f"building the demo model (once) in {root}: merging the shipped adapters into SmolLM2 + EfficientNet")
        merge.merge_dir(paths.ADAPTERS_DIR, merged, llm="smollm2-135m", vision="efficientnet-lite0", overwrite=True)
    if not (quantized / "config.json").is_file():
        echo("GPTQ-quantizing the merged LLM to 4 bits (group 64), calibrated on the adapters' training data")
        # The build's report goes through echo (stderr for chat: `chat --prompt` promises stdout holds only the answer).
        # Adapters without a recorded recipe calibrate on docstrings and easy-vqa questions (the quantizer's default).
        calib_data = json.loads((paths.ADAPTERS_DIR / "config.json").read_text()).get("recipe", {}).get("data")
        run.quantize_dir(merged, quantized, run.QuantizeOptions(**paths.QUANTIZE_OPTIONS, calib_data=calib_data),
                         overwrite=True, echo=echo)
    if stamp != fingerprint:
        tmp = root / f".{paths.STAMP_NAME}.tmp"
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "adapters": str(paths.ADAPTERS_DIR)}, indent=2) + "\n")
        os.replace(tmp, root / paths.STAMP_NAME)
    return quantized


def demo_model_dir(quantized: bool = True, build: bool = False) -> Path:
    """The built demo model dir (quantized by default, else the merged fp one). With ``build``, a missing
    demo is built once from the adapters shipped in this package (``build_demo``) under $LAVIN_EDGE_DEMO_DIR
    or ~/.cache/lavin-edge/demo, and a demo there that was built from other adapters (its stamp differs, or
    the cache has none) is rebuilt; otherwise raises DemoModelMissing saying how to build it. A demo under
    the other roots, or one without a stamp under $LAVIN_EDGE_DEMO_DIR, was built by hand and is used as is;
    one that was built automatically from other adapters or by another lavin-edge (its stamp differs) is passed
    over, so a stale cache is never served."""
    name = paths.QUANTIZED_NAME if quantized else paths.MERGED_NAME
    found, shipped, stale = paths.find_demo(name, build)
    if found is not None:
        return found
    auto = paths.auto_root()
    if build and shipped is not None:
        built = build_demo(auto, echo=lambda m: print(m, file=sys.stderr, flush=True), fresh=stale)
        return built if quantized else built.parent / paths.MERGED_NAME
    looked = ", ".join(str(r / name) for r in paths.demo_roots())
    raise paths.DemoModelMissing(f"demo model not built (looked in {looked}); {paths.BUILD_HINT}")
