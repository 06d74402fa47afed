"""Held-out prompts to check the demo with: easy-vqa *test* questions, never trained on."""

from __future__ import annotations

from typing import Any


def held_out_prompts(engine: Any, n: int = 40) -> list[tuple[list[int], int, Any]]:
    """easy-vqa *test* questions (never trained on) as (ids, image_pos, image) for ``engine``'s tokenizer."""
    from lavin_edge.data.easyvqa import load_easy_vqa
    from lavin_edge.data.image import load_image
    from lavin_edge.data.records import Problems
    from lavin_edge.model.lavin import encode_example

    recs = load_easy_vqa("test", Problems(strict=False), mode="open", limit=n, seed=1234)
    size = engine.cfg.vision.image_size
    out = []
    for r in recs:
        ex = encode_example(engine.tokenizer, r.prompt, None, True, engine.n_visual)
        out.append((ex.input_ids, ex.image_pos, load_image(r.image, size)))
    return out
