"""A multi-turn conversation over one Engine: the sequence layout of training, history reuse through the
KV cache, and oldest-turn-first trimming when the history outgrows the context.

Layout (as ``encode_example`` builds it, docs/demo.md): ``[BOS]["Image: "][visual x 6]`` or
``[BOS]["Image: N/A"]``, then per turn ``Instruction: {q}\\nResponse:`` + the answer ids + EOS, turns after
the first starting on a new line. The demo is trained on conversations laid out exactly so (``encode_example``'s
``history``; tests/test_chat_turns.py checks both give the same ids). One conversation is about one image: a new
image starts a new conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lavin_edge.modality import IMAGE, NO_IMAGE, TEXT, has_image
from lavin_edge.prompt import check_prompt_fits, conversation_ids
from lavin_edge.runtime import Engine, GenerationResult, GenerationStats
from lavin_edge.runtime.sampling import GenerationConfig


@dataclass
class Turn:
    question: str
    answer_ids: list[int]
    answer: str


@dataclass
class ChatSession:
    engine: Engine
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    turns: list[Turn] = field(default_factory=list)
    visual: torch.Tensor | None = None
    image_path: str | None = None
    vision_s: float = 0.0  # time the last image took through the tower (part of the next TTFT)

    @property
    def has_image(self) -> bool:
        """Whether the conversation is about an image (its visual tokens lead every prompt)."""
        return self.visual is not None

    # -- state ---------------------------------------------------------------------------------------
    def set_image(self, path: str | Path) -> bool:
        """Load, preprocess and encode an image (``lavin_edge.data.image.ImageError`` on a bad file, and then
        nothing changes). A new image starts a new conversation: the prompt format carries one image, at the
        start, so earlier turns were about another image and would leak into the answers (the model is trained
        on conversations about one image, ``easy-vqa-chat``). Returns whether history was cleared."""
        import time

        from lavin_edge.data.image import load_image

        image = load_image(path, self.engine.cfg.vision.image_size)
        t0 = time.perf_counter()
        self.visual = self.engine.encode_image(image)
        self.vision_s = time.perf_counter() - t0
        self.image_path = str(path)
        had_history = bool(self.turns)
        self.turns.clear()
        self.engine.reset(IMAGE)
        return had_history

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.turns.clear()
        self.engine.reset(IMAGE if self.has_image else TEXT)

    # -- sequence ------------------------------------------------------------------------------------
    def build(self, question: str) -> tuple[list[int], int, list[str]]:
        """The full sequence for asking ``question`` now, trimmed to fit; returns (ids, image_pos, notices).

        Trimming drops whole turns, oldest first, until the prompt leaves room for the answer (up to
        ``max_new_tokens``, at most a quarter of the context). A prompt that does not fit even alone
        raises ContextError."""
        ctx = self.engine.max_context
        tok = self.engine.tokenizer
        n_visual = self.visual.shape[0] if self.has_image else 0
        check_prompt_fits(len(conversation_ids(tok, [], question, n_visual)[0]), ctx)
        reserve = min(self.gen.max_new_tokens, ctx // 4)
        notices = []
        dropped = 0
        while True:
            kept = self.turns[dropped:]
            ids, image_pos = conversation_ids(tok, [(t.question, t.answer_ids) for t in kept], question, n_visual)
            if len(ids) + reserve <= ctx or not kept:
                break
            dropped += 1
        if dropped:
            del self.turns[:dropped]
            notices.append(f"history trimmed: dropped the {dropped} oldest turn(s) to fit the context of "
                           f"{ctx} tokens")
        return ids, image_pos, notices

    # -- asking --------------------------------------------------------------------------------------
    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> tuple[GenerationResult,
                                                                                       list[str]]:
        """Answer ``question`` in the conversation; streams through ``on_text``. Returns the result and any
        notices (history trimmed)."""
        eng = self.engine
        ids, image_pos, notices = self.build(question)
        modality = IMAGE if self.has_image else TEXT
        # Reuse the cache up to the longest common prefix with what it holds (same modality only).
        common = 0
        if eng.modality == modality:
            hist = eng.history
            limit = min(len(hist), len(ids) - 1)  # at least one new token must be prefilled
            while common < limit and hist[common] == ids[common]:
                common += 1
            if self.visual is not None and image_pos < common < image_pos + self.visual.shape[0]:
                common = image_pos  # never resume inside the visual tokens: refeed them whole
        if common == 0:
            eng.reset(modality)
        else:
            eng.rewind(common)
        new_ids = ids[common:]
        # The visual tokens are refed whole or not at all (kept in the cache), see above.
        new_pos = image_pos - common if has_image(image_pos) and image_pos >= common else NO_IMAGE
        stats = GenerationStats(vision_s=self.vision_s)
        self.vision_s = 0.0
        result = eng.generate(new_ids, self.gen, new_pos, self.visual if has_image(new_pos) else None, on_text,
                              stats)
        self.turns.append(Turn(question, result.ids, result.text))
        return result, notices
