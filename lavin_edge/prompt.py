"""The prompt format of a LaVIN sequence, the one definition training (``lavin_edge.model.lavin.encode_example``),
``chat`` and ``serve`` share (``layout`` builds it; the others derive from it):

    BOS "Image: " <n_visual image slots> "Instruction: Q\nResponse:" answer EOS "\nInstruction: ..."

with "Image: N/A" and no slots for a text-only sequence. Each segment is tokenised on its own (a prompt, then its
answer), so training and chat see the same ids. No PyTorch here: the engine without it
(``lavin_edge.runtime.numpy_engine``) builds its prompts from this module too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lavin_edge.modality import NO_IMAGE


class ContextError(ValueError):
    """A prompt that does not fit the context window."""


IMAGE_PREFIX = "Image: "
TEXT_PREFIX = "Image: N/A"


def check_prompt_fits(n_tokens: int, context: int) -> None:
    """ContextError unless a prompt of ``n_tokens`` leaves room for at least one new token."""
    if n_tokens + 1 > context:
        raise ContextError(f"prompt of {n_tokens} tokens exceeds the model's context of {context} tokens "
                           "(shorten the question)")


def budget_note(max_new_tokens: int, n_tokens: int, context: int) -> str | None:
    """The one line ``chat`` prints when ``max_new_tokens`` asks for more than the context leaves after a prompt
    of ``n_tokens`` (an answer stops where the context ends); None when it fits."""
    room = context - n_tokens
    if max_new_tokens <= room:
        return None
    return (f"--max-new-tokens {max_new_tokens} is more than the context leaves: at most {room} new tokens (the "
            f"model's context of {context} tokens less the {n_tokens}-token prompt)")


def chat_prompt(instruction: str, context: str = "") -> str:
    """LaVIN's chat format: ``Instruction: {q}\\nResponse:`` (an Alpaca ``input`` goes on its own line)."""
    body = instruction.strip() + (f"\n{context.strip()}" if context and context.strip() else "")
    return f"Instruction: {body}\nResponse:"


@dataclass
class Layout:
    """A tokenised sequence: ``ids``, which of them are answer tokens (answers and their EOS: what training
    scores), and where the image slots start (``NO_IMAGE``: none)."""

    ids: list[int]
    answer_mask: list[bool]
    image_pos: int


def layout(tok: Any, n_visual: int, turns: Sequence[tuple[str, Sequence[int]]], prompt: str | None = None) -> Layout:
    """The sequence above: the prefix with ``n_visual`` placeholder slots (0: text only), then each turn's
    prompt text (as given: a follow-up carries its own leading newline) and answer ids + EOS, then ``prompt``
    (a generation prompt: no answer) when given."""
    if n_visual:
        ids = [tok.bos_id] + tok.encode(IMAGE_PREFIX)
        image_pos = len(ids)
        ids += [tok.pad_id] * n_visual
    else:
        ids, image_pos = [tok.bos_id] + tok.encode(TEXT_PREFIX), NO_IMAGE
    mask = [False] * len(ids)
    for text, answer_ids in turns:
        q_ids, a_ids = tok.encode(text), [*answer_ids, tok.eos_id]
        ids += q_ids + a_ids
        mask += [False] * len(q_ids) + [True] * len(a_ids)
    if prompt is not None:
        q_ids = tok.encode(prompt)
        ids += q_ids
        mask += [False] * len(q_ids)
    return Layout(ids, mask, image_pos)


def turn_prompt(question: str, first: bool) -> str:
    """A turn's prompt text: the chat format, a follow-up on a new line (``ChatSession`` and training agree)."""
    return ("" if first else "\n") + chat_prompt(question)


def conversation_ids(tok: Any, history: Sequence[tuple[str, list[int]]], question: str, n_visual: int = 0
                     ) -> tuple[list[int], int]:
    """The sequence for asking ``question`` after ``history`` ((question, answer ids) turns), with ``n_visual``
    placeholder slots for an image (0: text only). Returns (ids, image_pos)."""
    turns = [(turn_prompt(q, i == 0), answer_ids) for i, (q, answer_ids) in enumerate(history)]
    seq = layout(tok, n_visual, turns, turn_prompt(question, not history))
    return seq.ids, seq.image_pos
