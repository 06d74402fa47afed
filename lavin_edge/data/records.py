"""What every data source yields: ``Record`` (one sample before tokenisation), ``BadRecord`` and ``Problems`` (the
records a run skipped, or the error that stops it), and the prompt formats sources share (ScienceQA's QCM-ALE,
a conversation's follow-up turn)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lavin_edge.prompt import turn_prompt

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Record:
    """One training/eval sample before tokenisation. ``answer`` excludes EOS; ``image`` is a path or None.

    ``prompt``/``answer`` are the (last) turn. ``meta`` carries what eval needs: ``label`` (the correct option
    letter for multiple choice), ``choices``, and the ScienceQA category fields (``subject``, ``grade``,
    ``has_text``, ``has_image``)."""

    id: str
    prompt: str
    answer: str
    image: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # Earlier turns of a conversation, (prompt, answer) each, all answers in the loss; follow-up prompts start
    # with a newline (``followup_prompt``), as ``ChatSession`` lays a conversation out.
    history: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class BadRecord:
    id: str
    source: str
    reason: str

    def __str__(self) -> str:
        return f"[{self.source}] {self.id}: {self.reason}"


class DataError(ValueError):
    """Raised when a bad record is found and the run was asked to fail on bad records."""


@dataclass
class Problems:
    """Bad records seen so far. With ``strict`` the first one raises ``DataError``."""

    strict: bool = False
    bad: list[BadRecord] = field(default_factory=list)

    def report(self, rid: str, source: str, reason: str) -> None:
        rec = BadRecord(str(rid), source, reason)
        if self.strict:
            raise DataError(f"bad record {rec} (run without --strict-data to skip bad records)")
        self.bad.append(rec)

    def summary(self) -> str:
        return f"{len(self.bad)} bad record(s) skipped" + "".join(f"\n  {b}" for b in self.bad[:20]) + (
            f"\n  ... and {len(self.bad) - 20} more" if len(self.bad) > 20 else "")


# ---------------------------------------------------------------------------------------------- prompts

def followup_prompt(instruction: str) -> str:
    """A conversation's second and later turns: the chat format on a new line (``ChatSession`` encodes them so)."""
    return turn_prompt(instruction, first=False)


def qcm_prompt(question: str, context: str, choices: list[str]) -> str:
    """The QCM part of ScienceQA's QCM-ALE format."""
    opts = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    ctx = context.strip() or "N/A"
    return f"Question: {question.strip()}\nContext: {ctx}\nOptions: {opts}\nResponse:"


def ale_answer(letter: str, lecture: str = "", solution: str = "") -> str:
    """The ALE target. The leading space makes ``Response: The`` tokenise as in running text (BPE)."""
    because = " ".join(s.strip() for s in (lecture, solution) if s and s.strip())
    return f" The answer is {letter}." + (f" BECAUSE: {because}" if because else "")


def require_fields(d: dict, keys: Iterable[str]) -> str | None:
    missing = [k for k in keys if k not in d or d[k] is None]
    return f"missing field(s) {missing}" if missing else None
