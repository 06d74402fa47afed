"""Top-1 agreement: how often one model's next-token argmax is another's (or the target token). ``top1_matches``
is the count every quality figure uses (``top1_agreement`` of two engines here, ``bench.text_fidelity`` against
the base's answers, ``bench.quality`` against the fp and exact 4-bit references)."""

from __future__ import annotations

import torch

from lavin_edge.modality import modality_of
from lavin_edge.runtime.engine import Engine


def top1_matches(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """How many positions of ``logits`` [..., V] have their argmax equal to ``targets`` [...] (token ids; another
    model's argmax for agreement between models), counting only where ``mask`` is true when given."""
    same = logits.argmax(-1) == targets
    return int((same & mask).sum() if mask is not None else same.sum())


def top1_agreement(ref: Engine, other: Engine, prompts: list[tuple[list[int], int, torch.Tensor | None]],
                   answer_tokens: int = 8, all_positions: bool = False) -> float:
    """Top-1 agreement of ``other``'s next-token predictions with ``ref``'s on ``prompts`` ((ids, image_pos,
    image or None) each).

    Default: where the model answers. ``ref`` greedily continues each prompt (up to ``answer_tokens``, stop
    token included); both engines then read prompt + that continuation in one pass (teacher forcing) and
    their argmax is compared at every position that predicts an answer token. ``all_positions`` compares
    every prompt position instead (harsher: inside a prompt the next token is often a near tie)."""
    from lavin_edge.runtime.sampling import GenerationConfig

    same = total = 0
    for ids, pos, image in prompts:
        mod = modality_of(pos)
        seq, first, last = ids, 0, len(ids)
        if not all_positions:
            ref.reset(mod)
            visual = ref.encode_image(image) if image is not None else None
            res = ref.generate(ids, GenerationConfig(max_new_tokens=answer_tokens), pos, visual)
            stop = [ref.history[-1]] if res.stats.stop_reason == "eos" else []
            seq = ids + res.ids + stop
            first, last = len(ids) - 1, len(seq) - 1
        logits = []
        for e in (ref, other):
            e.reset(mod)
            visual = e.encode_image(image) if image is not None else None
            logits.append(e.forward(e.embed_prompt(seq, pos, visual), last_only=False)[first:last])
        same += top1_matches(logits[1], logits[0].argmax(-1))
        total += logits[0].shape[0]
    return same / max(total, 1)
