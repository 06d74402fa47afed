"""The easy-vqa dataset that ships in the ``easy-vqa`` package (64x64 images of one coloured shape): what its
questions ask (answer kinds, the colour or shape a yes/no question names, negation), the facts its answers state
about each image, balanced and explained targets, and its loaders: open answers or ScienceQA-style multiple
choice, multi-turn conversations about one image, and a ScienceQA-layout export."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lavin_edge.data.records import LETTERS, DataError, Problems, Record, ale_answer, followup_prompt, qcm_prompt
from lavin_edge.prompt import chat_prompt

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASY_VQA_YESNO = ("yes", "no")


def easy_vqa_kind(answer: str) -> str:
    if answer in EASY_VQA_YESNO:
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


EASY_VQA_KINDS = ("yes/no", "yes/no:shape", "yes/no:color", "shape", "color")


def _question_words(question: str) -> set[str]:
    """An easy-vqa question's words ("Is there not a red shape?" -> {"is", "there", "not", "a", "red", "shape"})."""
    return set(question.lower().rstrip("?").split())


def easy_vqa_kinds_of(question: str, answer: str) -> set[str]:
    """The ``kinds`` filter names a question matches: its answer kind, and for yes/no questions whether they
    ask about a shape ("is there a circle?") or a colour ("is there a red shape?")."""
    kind = easy_vqa_kind(answer)
    if kind != "yes/no":
        return {kind}
    return {kind, "yes/no:shape" if _question_words(question) & set(EASY_VQA_SHAPES) else "yes/no:color"}


def easy_vqa_candidates(answer: str) -> tuple[str, ...]:
    """The answers that make sense for the question's kind (its answer tells which)."""
    return {"yes/no": EASY_VQA_YESNO, "shape": EASY_VQA_SHAPES, "color": EASY_VQA_COLORS}[easy_vqa_kind(answer)]


def _stable_rng(key: str, seed: int) -> random.Random:
    # hash() is salted per process; option orders must be identical on every rank and every run.
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little"))


def balance_answers(indices: Sequence[int], questions: Sequence[str], answers: Sequence[str], seed: int
                    ) -> list[int]:
    """Keep, for every question text, equally many records of each of its answers (seeded choice), so the
    question alone predicts nothing and only the image can (VQA v2's reason for balanced pairs). In easy-vqa
    "is there a red shape?" is "no" 7 times in 8: unbalanced, a model learns to answer "no" to it without
    looking. A question text seen with a single answer is dropped: it can teach nothing but that answer."""
    groups: dict[str, dict[str, list[int]]] = {}
    for n in indices:
        groups.setdefault(questions[n], {}).setdefault(answers[n], []).append(n)
    rng = random.Random(seed)
    kept: list[int] = []
    for q in sorted(groups):
        by_answer = groups[q]
        if len(by_answer) < 2:
            continue
        m = min(len(v) for v in by_answer.values())
        for a in sorted(by_answer):
            kept += rng.sample(by_answer[a], m)
    return sorted(kept)


def easy_vqa_asked(question: str) -> tuple[str, str]:
    """(the colour or shape a yes/no question asks about, how the answer names it): ("red", "red shape")
    for "is there a red shape?", ("circle", "circle") for "is there not a circle?"."""
    words = _question_words(question)
    for c in EASY_VQA_COLORS:
        if c in words:
            return c, f"{c} shape"
    for s in EASY_VQA_SHAPES:
        if s in words:
            return s, s
    raise DataError(f"easy-vqa yes/no question names no colour or shape: {question!r}")


def easy_vqa_negated(question: str) -> bool:
    """Whether a yes/no question is negated ("is there not a circle?", "is no red shape present?")."""
    return bool(_question_words(question) & {"not", "no"})


def easy_vqa_image_facts(questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
                         ) -> dict[int, tuple[str, str]]:
    """{image id: (colour, shape)} for the images whose colour and shape the split's own questions state
    (an open answer, or a yes/no answer about one colour or shape); ~78% of easy-vqa's images."""
    colour: dict[int, str] = {}
    shape: dict[int, str] = {}
    for q, a, iid in zip(questions, answers, image_ids, strict=True):
        if a in EASY_VQA_COLORS:
            colour[iid] = a
        elif a in EASY_VQA_SHAPES:
            shape[iid] = a
        elif (a == "yes") != easy_vqa_negated(q):  # the question's colour/shape is in the image
            word = easy_vqa_asked(q)[0]
            (colour if word in EASY_VQA_COLORS else shape)[iid] = word
    return {iid: (colour[iid], shape[iid]) for iid in colour.keys() & shape.keys()}


def explained_answer(question: str, colour: str, shape: str, answer: str) -> str:
    """The target of an explained yes/no answer, one step per clause: what the image shows, whether the
    asked colour/shape is there, then the answer as the last word (evaluation reads the last word).

    The answer is (asked colour/shape present) XOR (question negated). On balanced data neither half predicts
    it alone, so a target that jumps from the image to the answer (" It is a black circle, so no.") gives
    gradient descent nothing to start from: rank-8 adapters on SmolLM2-135M stayed at 50% with it. Here the
    middle clause depends on the comparison alone, and the last word on two words already in the context
    (its "a"/"no" and the question's "not"/"no"); the demo learns it to 100% (README, "How the demo learned
    yes/no"; ``experiments/yes_no_targets.py``)."""
    word, named = easy_vqa_asked(question)
    there = "a" if word in (colour, shape) else "no"
    return f" It is a {colour} {shape}, so there is {there} {named}: {answer}."


def load_easy_vqa(split: str, problems: Problems, mode: str = "open", limit: int | None = None, seed: int = 0,
                  name: str = "easy-vqa", kinds: Sequence[str] | None = None, balance: bool = False,
                  explain: bool = False) -> list[Record]:
    """The easy-vqa package's questions (``split`` = train | test) over its 64x64 images.

    ``mode="open"``: ``Instruction: {q}\\nResponse:`` -> `` {answer}``. ``mode="mc"``: ScienceQA-style
    multiple choice over the candidates of the question's kind, options shuffled per question (stable
    across processes), target `` The answer is X.``. ``kinds`` filters by question kind, ``balance`` keeps
    every answer of a question text equally often (:func:`balance_answers`), then ``limit`` keeps a seeded
    random subset. ``explain`` (open mode): yes/no targets become :func:`explained_answer`, and yes/no
    questions about an image whose colour and shape the split does not state are left out."""
    import easy_vqa

    if split not in ("train", "test"):
        raise DataError(f"easy-vqa split must be 'train' or 'test', not {split!r}")
    if mode not in ("open", "mc"):
        raise DataError(f"easy-vqa mode must be 'open' or 'mc', not {mode!r}")
    qs, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    if kinds is not None:
        unknown = set(kinds) - set(EASY_VQA_KINDS)
        if unknown:
            raise DataError(f"easy-vqa kinds are {', '.join(EASY_VQA_KINDS)}; got {sorted(unknown)}")
    order = [n for n in range(len(qs)) if kinds is None or easy_vqa_kinds_of(qs[n], answers[n]) & set(kinds)]
    facts: dict[int, tuple[str, str]] = {}
    if explain:
        if mode != "open":
            raise DataError("easy-vqa explain needs mode 'open'")
        facts = easy_vqa_image_facts(qs, answers, image_ids)
        order = [n for n in order if answers[n] not in EASY_VQA_YESNO or image_ids[n] in facts]
    if balance:
        order = balance_answers(order, qs, answers, seed)
    if limit is not None and limit < len(order):
        random.Random(seed).shuffle(order)
        order = sorted(order[:limit])
    out = []
    for n in order:
        q, a, iid = qs[n], answers[n], image_ids[n]
        rid = f"{split}-{n}"
        path = paths.get(iid)
        if path is None or not Path(path).is_file():
            problems.report(rid, name, f"image {iid} not found")
            continue
        meta: dict[str, Any] = {"kind": easy_vqa_kind(a), "answer": a, "image_id": iid}
        if mode == "open":
            target = explained_answer(q, *facts[iid], a) if explain and a in EASY_VQA_YESNO else " " + a
            out.append(Record(rid, chat_prompt(q), target, path, name, meta))
            continue
        choices = list(easy_vqa_candidates(a))
        _stable_rng(rid, seed).shuffle(choices)
        letter = LETTERS[choices.index(a)]
        meta.update(label=letter, choices=choices, has_image=True, has_text=False)
        out.append(Record(rid, qcm_prompt(q, "", choices), ale_answer(letter), path, name, meta))
    return out


def export_easy_vqa_scienceqa(root: str | Path, splits: dict[str, int], seed: int = 0) -> Path:
    """Write a ScienceQA-layout copy of easy-vqa (``problems.json``, ``pid_splits.json``,
    ``images/{split}/{qid}/image.png``) with ``splits`` = {"train": n, "test": m} questions each: real data
    in the ScienceQA format, for tests and for trying ``lavin-edge eval`` without ScienceQA itself."""
    import shutil

    root = Path(root)
    probs: dict[str, Any] = {}
    pid: dict[str, list[str]] = {}
    for split, n in splits.items():
        src = "train" if split == "train" else "test"
        recs = load_easy_vqa(src, Problems(strict=True), mode="mc", limit=n, seed=seed)
        pid[split] = []
        for r in recs:
            qid = f"{split}{r.id.split('-')[1]}"
            d = root / "images" / split / qid
            d.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(r.image, d / "image.png")  # type: ignore[arg-type]
            q = r.prompt.split("\n", 1)[0].removeprefix("Question: ")
            probs[qid] = {"question": q, "choices": r.meta["choices"], "answer": r.meta["choices"].index(
                r.meta["answer"]), "hint": "", "image": "image.png", "subject": "natural science",
                "grade": "grade1", "lecture": "", "solution": "", "split": split}
            pid[split].append(qid)
    (root / "problems.json").write_text(json.dumps(probs))
    (root / "pid_splits.json").write_text(json.dumps(pid))
    return root


def easy_vqa_yes_no_answer(question: str, colour: str, shape: str) -> str:
    """The answer of an easy-vqa yes/no question about an image showing one ``colour`` ``shape``: (the asked
    colour/shape is the image's) XOR (the question is negated). It reproduces all 22,829 such answers of the
    train split whose image's colour and shape the split states."""
    present = easy_vqa_asked(question)[0] in (colour, shape)
    return "yes" if present != easy_vqa_negated(question) else "no"


def load_easy_vqa_conversations(split: str, problems: Problems, limit: int, seed: int = 0,
                                min_turns: int = 2, max_turns: int = 3, name: str = "easy-vqa-chat"
                                ) -> list[Record]:
    """``limit`` conversations of ``min_turns``..``max_turns`` turns about one easy-vqa image of ``split``, every
    answer in the loss: what a chat follow-up looks like. The turns ask the split's own question texts (yes/no
    ones with explained targets, colour and shape ones with one-word targets) about an image whose colour and
    shape the split states; each yes/no turn is "yes" or "no" with equal odds (so neither the question nor the
    earlier turns predict it), and the last turn is always yes/no (the follow-up that the single-turn demo got
    wrong). The record's ``meta`` describes the last turn, like a single-turn easy-vqa record's."""
    import easy_vqa

    if split not in ("train", "test"):
        raise DataError(f"easy-vqa split must be 'train' or 'test', not {split!r}")
    if not 1 <= min_turns <= max_turns:
        raise DataError(f"easy-vqa-chat turns must satisfy 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
    qs, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    facts = easy_vqa_image_facts(qs, answers, image_ids)
    yes_no = sorted({q for q, a in zip(qs, answers, strict=True) if a in EASY_VQA_YESNO})
    colour_qs = sorted({q for q, a in zip(qs, answers, strict=True) if a in EASY_VQA_COLORS})
    shape_qs = sorted({q for q, a in zip(qs, answers, strict=True) if a in EASY_VQA_SHAPES})
    images = sorted(iid for iid in facts if paths.get(iid) is not None)
    rng = random.Random(seed)
    out: list[Record] = []
    for c in range(limit):
        iid = rng.choice(images)
        colour, shape = facts[iid]
        n_turns = rng.randint(min_turns, max_turns)
        turns: list[tuple[str, str, str]] = []  # (question, target, kind)
        for t in range(n_turns):
            kind = "yes/no" if t == n_turns - 1 else rng.choice(("yes/no", "yes/no", "color", "shape"))
            if kind == "yes/no":
                want = rng.choice(EASY_VQA_YESNO)
                q = rng.choice([x for x in yes_no if easy_vqa_yes_no_answer(x, colour, shape) == want])
                turns.append((q, explained_answer(q, colour, shape, want), want))
            elif kind == "color":
                # "what color is the circle?" is only asked about a circle.
                fits = [x for x in colour_qs if not (_question_words(x) & (set(EASY_VQA_SHAPES) - {shape}))]
                turns.append((rng.choice(fits), " " + colour, colour))
            else:
                # "what is the teal shape?" is only asked about a teal one.
                fits = [x for x in shape_qs if not (_question_words(x) & (set(EASY_VQA_COLORS) - {colour}))]
                turns.append((rng.choice(fits), " " + shape, shape))
        path = paths[iid]
        if not Path(path).is_file():
            problems.report(f"{split}-chat-{c}", name, f"image {iid} not found")
            continue
        prompts = [chat_prompt(q) if t == 0 else followup_prompt(q) for t, (q, _, _) in enumerate(turns)]
        history = [(p, a) for p, (_, a, _) in zip(prompts[:-1], turns[:-1], strict=True)]
        last_q, last_target, last_answer = turns[-1]
        meta = {"kind": "yes/no", "answer": last_answer, "image_id": iid, "turns": n_turns, "colour": colour,
                "shape": shape, "questions": [q for q, _, _ in turns]}
        out.append(Record(f"{split}-chat-{c}", prompts[-1], last_target, path, name, meta, history))
    return out
