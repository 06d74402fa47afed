"""Greedy tokens of the PyTorch-free one-shot engine (lavin_edge/runtime/numpy_engine.py) on a small quantized
model, to compare two machines: scripts/arm_check.sh makes the model and the reference tokens on x86-64
(``--make``, needs PyTorch and the repository's tests/ helpers), then runs this again under qemu-aarch64 with
NumPy alone (``--expect``) for each backend there.

Prints the tokens as JSON; with --expect exits 1 (naming the prompt) where one differs from that file's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

QUESTIONS = ("What is here?", "Which shape is it?")
IMAGE = Path(__file__).resolve().parents[1] / "examples" / "easyvqa-red-triangle.png"
NEW_TOKENS = 12
IMAGE_ARRAY = "oneshot_image.npy"  # written into the model dir by --make


def make_model(out: Path) -> Path:
    """A tiny LLM (vocab 264) on EfficientNet-Lite0 with random adapters, GPTQ with act-order: the model of
    tests/test_numpy_engine.py, made by the same helpers."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tests"))
    from test_engine import trained_like
    from test_fused_decode import _quantized_dir

    from lavin_edge.config import preset
    from lavin_edge.data.image import load_image_array

    cfg = preset("tiny", "efficientnet-lite0")
    cfg.llm.vocab_size = 264
    out.mkdir(parents=True, exist_ok=True)
    model = _quantized_dir(trained_like(3, cfg=cfg), out, act_order=True)
    # The preprocessed image travels as an array: the arm64 sysroot has NumPy but no Pillow.
    np.save(model / IMAGE_ARRAY, load_image_array(IMAGE))
    return model


def greedy(model: Path, with_image: bool) -> dict[str, list[int]]:
    from lavin_edge.prompt import conversation_ids
    from lavin_edge.runtime.numpy_engine import NumpyEngine

    eng = NumpyEngine(model)
    visual = eng.encode_image(np.load(model / IMAGE_ARRAY)) if with_image else None
    out = {}
    for q in QUESTIONS:
        for vis in (None, visual) if with_image else (None,):
            ids, pos = conversation_ids(eng.tokenizer, [], q, 0 if vis is None else vis.shape[0])
            got: list[int] = []
            eng.generate(ids, pos, vis, NEW_TOKENS, set(), lambda t, acc=got: acc.append(t) or True)
            out[q + (" [image]" if vis is not None else "")] = got
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the quantized model dir (with --make: where to make it)")
    ap.add_argument("--make", action="store_true", help="make the model first (PyTorch and tests/ needed)")
    ap.add_argument("--image", action="store_true",
                    help="also each question on examples/easyvqa-red-triangle.png (preprocessed by --make)")
    ap.add_argument("--expect", type=Path, help="JSON of tokens this run must reproduce")
    args = ap.parse_args(argv)
    model = make_model(args.model) if args.make else args.model
    if args.make:
        print(f"model: {model}", file=sys.stderr)
    got = greedy(model, args.image)
    print(json.dumps({"model": str(model), "tokens": got}))
    if args.expect is None:
        return 0
    want = json.loads(args.expect.read_text())["tokens"]
    bad = [q for q in got if got[q] != want.get(q)]  # the prompts this run asked (the image ones with --image)
    for q in bad:
        print(f"FAIL {q!r}: {got[q]} != {want.get(q)}", file=sys.stderr)
    return 1 if bad or not got else 0


if __name__ == "__main__":
    sys.exit(main())
