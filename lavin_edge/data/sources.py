"""Data sources -> ``Record`` lists: ScienceQA (QCM-ALE), LLaVA-Instruct conversations, Alpaca, text
instructions answered by the frozen base (self-distillation), prose, and easy-vqa (``lavin_edge.data.easyvqa``);
``load_source`` reads one recipe ``[[data]]`` table.

A record that cannot be used (missing field, missing image file) becomes a ``BadRecord`` with its id and the
reason; ``Problems`` (``lavin_edge.data.records``) collects them so the run can skip them (and count them) or
stop, per a flag."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lavin_edge.data.easyvqa import load_easy_vqa, load_easy_vqa_conversations
from lavin_edge.data.records import LETTERS, DataError, Problems, Record, ale_answer, qcm_prompt, require_fields
from lavin_edge.prompt import chat_prompt

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
        err = require_fields(p, ("question", "choices", "answer"))
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
            if not (isinstance(q, dict) and isinstance(a, dict)) or require_fields(q, ("value",)) or require_fields(
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
        err = require_fields(item, ("instruction", "output")) if isinstance(item, dict) else "not an object"
        if err:
            problems.report(rid, name, err)
            continue
        prompt = chat_prompt(str(item["instruction"]), str(item.get("input") or ""))
        out.append(Record(rid, prompt, " " + str(item["output"]).strip(), None, name))
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
        err = require_fields(item, ("instruction", "answer")) if isinstance(item, dict) else "not an object"
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
