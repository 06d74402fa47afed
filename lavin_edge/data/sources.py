"""Data sources -> ``Record`` lists: ScienceQA (QCM-ALE), LLaVA-Instruct conversations, Alpaca, the easy-vqa
dataset that ships in the ``easy-vqa`` package (open answers or ScienceQA-style multiple choice, and multi-turn
conversations about one image), and text instructions answered by the frozen base (self-distillation).

A record that cannot be used (missing field, missing image file) becomes a ``BadRecord`` with its id and the
reason; ``Problems`` collects them so the run can skip them (and count them) or stop, per a flag."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lavin_edge.prompt import chat_prompt

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
    return "\n" + chat_prompt(instruction)


def qcm_prompt(question: str, context: str, choices: list[str]) -> str:
    """The QCM part of ScienceQA's QCM-ALE format."""
    opts = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    ctx = context.strip() or "N/A"
    return f"Question: {question.strip()}\nContext: {ctx}\nOptions: {opts}\nResponse:"


def ale_answer(letter: str, lecture: str = "", solution: str = "") -> str:
    """The ALE target. The leading space makes ``Response: The`` tokenise as in running text (BPE)."""
    because = " ".join(s.strip() for s in (lecture, solution) if s and s.strip())
    return f" The answer is {letter}." + (f" BECAUSE: {because}" if because else "")


def _require(d: dict, keys: Iterable[str]) -> str | None:
    missing = [k for k in keys if k not in d or d[k] is None]
    return f"missing field(s) {missing}" if missing else None


# ---------------------------------------------------------------------------------------------- ScienceQA

def load_scienceqa(root: str | Path, split: str, problems: Problems, with_explanation: bool = True,
                   name: str = "scienceqa") -> list[Record]:
    """``root/problems.json``, ``root/pid_splits.json``, images at ``root/images/{split}/{qid}/image.png``."""
    root = Path(root)
    probs = json.loads((root / "problems.json").read_text())
    splits = json.loads((root / "pid_splits.json").read_text())
    if split not in splits:
        raise DataError(f"{root}/pid_splits.json has no split {split!r} (has {sorted(splits)})")
    out = []
    for qid in splits[split]:
        qid = str(qid)
        p = probs.get(qid)
        if p is None:
            problems.report(qid, name, "id listed in pid_splits.json but absent from problems.json")
            continue
        err = _require(p, ("question", "choices", "answer"))
        if err:
            problems.report(qid, name, err)
            continue
        choices = list(p["choices"])
        ans = p["answer"]
        if not isinstance(ans, int) or not 0 <= ans < len(choices) or len(choices) > len(LETTERS):
            problems.report(qid, name, f"answer index {ans!r} out of range for {len(choices)} choices")
            continue
        image = None
        if p.get("image"):
            image = str(root / "images" / split / qid / str(p["image"]))
            if not Path(image).is_file():
                problems.report(qid, name, f"image file not found: {image}")
                continue
        hint = str(p.get("hint") or "")
        letter = LETTERS[ans]
        answer = ale_answer(letter, p.get("lecture", "") if with_explanation else "",
                            p.get("solution", "") if with_explanation else "")
        meta = {"label": letter, "choices": choices, "subject": p.get("subject", ""),
                "grade": p.get("grade", ""), "has_text": bool(hint.strip()), "has_image": image is not None}
        out.append(Record(qid, qcm_prompt(p["question"], hint, choices), answer, image, name, meta))
    return out


# ---------------------------------------------------------------------------------------------- LLaVA / Alpaca

def load_llava(path: str | Path, image_folder: str | Path | None, problems: Problems, name: str = "llava"
               ) -> list[Record]:
    """LLaVA-Instruct JSON: a list of ``{id, image?, conversations: [{from: human|gpt, value}, ...]}``.

    Each (human, gpt) turn becomes one sample, as LaVIN trains its chatbot; the ``<image>`` marker is removed
    (the visual tokens have their own place in the sequence)."""
    data = json.loads(Path(path).read_text())
    out = []
    for n, item in enumerate(data):
        rid = str(item.get("id", n))
        convs = item.get("conversations")
        if not isinstance(convs, list) or not convs:
            problems.report(rid, name, "missing field 'conversations'")
            continue
        image = None
        if item.get("image"):
            if image_folder is None:
                problems.report(rid, name, "record has an image but no image folder was given")
                continue
            image = str(Path(image_folder) / str(item["image"]))
            if not Path(image).is_file():
                problems.report(rid, name, f"image file not found: {image}")
                continue
        turns = 0
        for k in range(0, len(convs) - 1, 2):
            q, a = convs[k], convs[k + 1]
            if not (isinstance(q, dict) and isinstance(a, dict)) or _require(q, ("value",)) or _require(
                    a, ("value",)):
                problems.report(f"{rid}#{k // 2}", name, "turn without a 'value'")
                continue
            if q.get("from") not in ("human", "user") or a.get("from") not in ("gpt", "assistant"):
                problems.report(f"{rid}#{k // 2}", name, f"unexpected speakers {q.get('from')!r}/{a.get('from')!r}")
                continue
            text = str(q["value"]).replace("<image>", "").strip()
            out.append(Record(f"{rid}#{k // 2}", chat_prompt(text), " " + str(a["value"]).strip(), image, name))
            turns += 1
        if turns == 0:
            problems.report(rid, name, "no (human, gpt) turn")
    return out


def load_alpaca(path: str | Path, problems: Problems, name: str = "alpaca") -> list[Record]:
    """Alpaca JSON: a list of ``{instruction, input, output}``; text only."""
    data = json.loads(Path(path).read_text())
    out = []
    for n, item in enumerate(data):
        rid = str(item.get("id", n))
        err = _require(item, ("instruction", "output")) if isinstance(item, dict) else "not an object"
        if err:
            problems.report(rid, name, err)
            continue
        prompt = chat_prompt(str(item["instruction"]), str(item.get("input") or ""))
        out.append(Record(rid, prompt, " " + str(item["output"]).strip(), None, name))
    return out


# ---------------------------------------------------------------------------------------------- easy-vqa

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


# ---------------------------------------------------------------------------------------------- self-distill

def load_self_distill(path: str | Path | None, split: str, problems: Problems, limit: int | None = None,
                      seed: int = 0, name: str = "self-distill") -> list[Record]:
    """Text-only instructions answered by the frozen base itself (``lavin_edge.data.self_distill``): JSONL lines
    ``{instruction, answer, split}``; ``path`` defaults to the shipped SmolLM2-135M file. The answer is kept
    exactly as the base wrote it (leading space included), so its tokens are the base's own."""
    from lavin_edge.data.self_distill import DEFAULT_PATH

    if split not in ("train", "test"):
        raise DataError(f"self-distill split must be 'train' or 'test', not {split!r}")
    p = Path(path) if path is not None else DEFAULT_PATH
    if not p.is_file():
        raise DataError(f"self-distill file not found: {p} (write it with python scripts/make_self_distill.py)")
    out = []
    for n, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            problems.report(f"line {n + 1}", name, f"not JSON: {e.msg}")
            continue
        err = _require(item, ("instruction", "answer")) if isinstance(item, dict) else "not an object"
        if err:
            problems.report(f"line {n + 1}", name, err)
            continue
        if item.get("split", "train") != split:
            continue
        out.append(Record(f"{split}-{n}", chat_prompt(str(item["instruction"])), str(item["answer"]), None, name,
                          {"instruction": str(item["instruction"]), "complete": bool(item.get("complete", True))}))
    if limit is not None and limit < len(out):
        out = random.Random(seed).sample(out, limit)
    return out


# ---------------------------------------------------------------------------------------------- prose

def load_prose(problems: Problems, limit: int | None = None, seed: int = 0, name: str = "prose") -> list[Record]:
    """Text-only prose: the calibration half of the standard library's docstring paragraphs
    (``lavin_edge.data.prose``; the held-out half is never read here). Each paragraph is the answer of an
    empty prompt, so all its tokens are scored; ``text_loss = "kl"`` is required (its targets are the frozen
    base's predictions, not the text: the text route learns to read prose as the base does)."""
    from lavin_edge.data.prose import stdlib_paragraphs

    paras = stdlib_paragraphs("calibration")
    out = [Record(f"prose-{i}", "", p, None, name, {"kind": "prose"}) for i, p in enumerate(paras)]
    if limit is not None and limit < len(out):
        out = random.Random(seed).sample(out, limit)
    return out


# ---------------------------------------------------------------------------------------------- dispatch

def load_source(spec: dict[str, Any], problems: Problems, split: str | None = None) -> list[Record]:
    """One ``[[data]]`` table of a recipe: ``type`` = scienceqa | llava | alpaca | easy-vqa | easy-vqa-chat |
    self-distill | prose, plus its fields.

    ``split`` overrides the table's split (eval uses the test split of the same source)."""
    kind = spec.get("type")
    name = str(spec.get("name", kind))
    if kind == "scienceqa":
        return load_scienceqa(spec["root"], split or spec.get("split", "train"), problems,
                              spec.get("explanation", True), name)
    if kind == "llava":
        return load_llava(spec["path"], spec.get("image_folder"), problems, name)
    if kind == "alpaca":
        return load_alpaca(spec["path"], problems, name)
    if kind == "easy-vqa":
        return load_easy_vqa(split or spec.get("split", "train"), problems, spec.get("mode", "open"),
                             spec.get("limit"), spec.get("seed", 0), name, spec.get("kinds"),
                             bool(spec.get("balance", False)), bool(spec.get("explain", False)))
    if kind == "easy-vqa-chat":
        return load_easy_vqa_conversations(split or spec.get("split", "train"), problems, int(spec.get("limit", 1000)),
                                           spec.get("seed", 0), int(spec.get("min_turns", 2)),
                                           int(spec.get("max_turns", 3)), name)
    if kind == "self-distill":
        return load_self_distill(spec.get("path"), split or spec.get("split", "train"), problems, spec.get("limit"),
                                 spec.get("seed", 0), name)
    if kind == "prose":
        return load_prose(problems, spec.get("limit"), spec.get("seed", 0), name)
    raise DataError(f"unknown data source type {kind!r} (expected scienceqa, llava, alpaca, easy-vqa, "
                    "easy-vqa-chat, self-distill or prose)")
