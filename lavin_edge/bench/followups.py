"""Follow-up turns in chat, measured as a user meets them: a yes/no question about an easy-vqa test image asked
as the 2nd or 3rd turn of a conversation (earlier turns answered by the model itself, not teacher-forced), or
right after ``/image`` switched to another image (``ChatSession.set_image``: a new conversation).

The cases come from ``load_easy_vqa_conversations("test", ...)``: test-split images and question texts, the
follow-up's answer "yes" or "no" with equal odds. The answer is the output's last word, read as ``lavin-edge
eval`` reads it; ``explained_right`` also checks the explanation names this image's colour and shape (the
single-turn demo answered about the previous image: "It is a brown triangle" for a red one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lavin_edge.chat.session import ChatSession
from lavin_edge.data.easyvqa import load_easy_vqa_conversations
from lavin_edge.data.records import Problems, Record
from lavin_edge.runtime.sampling import GenerationConfig


@dataclass
class FollowUpCase:
    image: str  # the image of the earlier turns
    earlier: list[str]  # questions asked (and answered by the model) before the follow-up
    question: str  # the yes/no follow-up
    answer: str  # "yes" | "no"
    colour: str  # of the image the follow-up is about
    shape: str
    new_image: str | None = None  # switched to with /image just before the follow-up

    @property
    def kind(self) -> str:
        return "after /image" if self.new_image else f"turn {len(self.earlier) + 1}"


def followup_cases(n: int, seed: int = 0) -> list[FollowUpCase]:
    """``n`` cases, alternately the same image (the follow-up as turn 2 or 3) and after ``/image`` to an image
    of another colour and shape (after a 2-3 turn conversation about the first)."""
    convs = load_easy_vqa_conversations("test", Problems(strict=True), 3 * n, seed, 2, 3)
    out: list[FollowUpCase] = []
    spare = list(convs[n:])
    for i, c in enumerate(convs[:n]):
        qs = c.meta["questions"]
        if i % 2 == 0:
            out.append(FollowUpCase(str(c.image), qs[:-1], qs[-1], c.meta["answer"], c.meta["colour"], c.meta["shape"]))
            continue
        other: Record = next(o for o in spare if o.meta["colour"] != c.meta["colour"]
                             and o.meta["shape"] != c.meta["shape"])
        spare.remove(other)
        out.append(FollowUpCase(str(c.image), qs, other.meta["questions"][-1], other.meta["answer"],
                                other.meta["colour"], other.meta["shape"], str(other.image)))
    return out


def run_followups(engine: Any, cases: list[FollowUpCase], max_new_tokens: int = 24,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Ask every case through a ``ChatSession`` on ``engine`` (greedy); accuracy overall and per kind."""
    from lavin_edge.evaluate import YES_NO_END_RE

    rows = []
    for k, case in enumerate(cases):
        session = ChatSession(engine, GenerationConfig(max_new_tokens=max_new_tokens))
        session.set_image(case.image)
        for q in case.earlier:
            session.ask(q)
        if case.new_image is not None:
            session.set_image(case.new_image)
        text = session.ask(case.question)[0].text
        m = YES_NO_END_RE.search(text)
        said = m.group(1).lower() if m else None
        rows.append({"kind": case.kind, "question": case.question, "answer": case.answer, "output": text.strip(),
                     "correct": said == case.answer,
                     "explained_right": f"It is a {case.colour} {case.shape}," in text})
        if progress is not None:
            progress(k + 1, len(cases))
    kinds: dict[str, dict[str, Any]] = {}
    for name in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == name]
        kinds[name] = {"n": len(sel), "accuracy": sum(r["correct"] for r in sel) / len(sel),
                       "explained_right": sum(r["explained_right"] for r in sel) / len(sel)}
    n = len(rows)
    return {"n": n, "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
            "explained_right": sum(r["explained_right"] for r in rows) / n if n else 0.0, "kinds": kinds,
            "wrong": [r for r in rows if not r["correct"]]}
