"""Accuracy of a trained LaVIN on held-out questions.

Multiple choice (ScienceQA format, or easy-vqa as multiple choice): the answer is generated greedily and
parsed with ``The answer is ([A-Z])``; an unparsable answer counts as wrong (no random guess, unlike some
reference scripts) and is listed. Per-category table as in the paper: NAT/SOC/LAN, TXT/IMG/NO, G1-6/G7-12.

Open answers (easy-vqa ``mode = "open"``): the generated text must equal the reference answer (case and
surrounding whitespace/punctuation ignored).

``method = "score"`` is the fast path: instead of decoding, each candidate answer (`` The answer is X.`` per
option, or the easy-vqa answers of the question's kind) is scored by its mean per-token log-likelihood in
one batched forward pass and the best one is taken. It is constrained decoding: it can never be
unparsable, so it reads higher than generation while the model still emits malformed text; reports say
which method was used.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lavin_edge.data.easyvqa import easy_vqa_candidates
from lavin_edge.data.image import ImageError, load_image
from lavin_edge.data.records import LETTERS, Problems, Record, ale_answer
from lavin_edge.data.sources import load_source
from lavin_edge.model.lavin import IGNORE_INDEX, LaVIN, collate, encode_example

ANSWER_RE = re.compile(r"The answer is ([A-Z])")

# ScienceQA's categories: name -> predicate over a record's meta.
CATEGORIES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "NAT": lambda m: m.get("subject") == "natural science",
    "SOC": lambda m: m.get("subject") == "social science",
    "LAN": lambda m: m.get("subject") == "language science",
    "TXT": lambda m: bool(m.get("has_text")),
    "IMG": lambda m: bool(m.get("has_image")),
    "NO": lambda m: not m.get("has_text") and not m.get("has_image"),
    "G1-6": lambda m: m.get("grade") in {f"grade{i}" for i in range(1, 7)},
    "G7-12": lambda m: m.get("grade") in {f"grade{i}" for i in range(7, 13)},
}


YES_NO_END_RE = re.compile(r"\b(yes|no)[.!]?\s*$", re.IGNORECASE)


def parse_answer(text: str) -> str | None:
    m = ANSWER_RE.search(text)
    return m.group(1) if m else None


def _norm(s: str) -> str:
    return s.strip().strip(".!,;:").strip().lower()


def _image(model: LaVIN, rec: Record) -> torch.Tensor | None:
    if rec.image is None:
        return None
    return load_image(rec.image, model.cfg.vision.image_size)


def generate(model: LaVIN, tok: Any, rec: Record, max_new_tokens: int, image: torch.Tensor | None) -> str:
    ex = encode_example(tok, rec.prompt, None, image is not None, model.n_visual)
    dev = next(model.parameters()).device
    ids = model.generate_greedy(ex.input_ids, ex.image_pos, None if image is None else image.to(dev),
                                max_new_tokens, set(getattr(tok, "stop_ids", {tok.eos_id})))
    return tok.decode(ids)


@torch.no_grad()
def score_candidates(model: LaVIN, tok: Any, rec: Record, candidates: list[str], image: torch.Tensor | None
                     ) -> list[float]:
    """Mean per-token log-likelihood of each candidate answer (its tokens and EOS) after the record's prompt.
    The mean, not the sum: a sum favours short answers ("no" over "yellow") whatever the image shows."""
    exs = [encode_example(tok, rec.prompt, c, image is not None, model.n_visual) for c in candidates]
    batch = collate(exs, [image] * len(exs), tok.pad_id).to(next(model.parameters()).device)
    logits = model(batch)[:, :-1].float()
    target = batch.labels[:, 1:]
    lp = -F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    keep = target != IGNORE_INDEX
    return ((lp * keep).sum(1) / keep.sum(1).clamp_min(1)).tolist()


def predict(model: LaVIN, tok: Any, rec: Record, method: str, max_new_tokens: int,
            open_candidates: list[str] | None) -> dict[str, Any]:
    """One record -> {id, pred, label, correct, output, parsed}."""
    image = _image(model, rec)
    mc = "label" in rec.meta
    label = rec.meta["label"] if mc else rec.meta.get("answer", rec.answer.strip())
    if method == "score":
        if mc:
            letters = list(LETTERS[:len(rec.meta["choices"])])
            scores = score_candidates(model, tok, rec, [ale_answer(x) for x in letters], image)
            pred, output = letters[max(range(len(letters)), key=scores.__getitem__)], ""
        else:
            # easy-vqa: the answers of the question's kind (the question says it asks for a colour, a shape,
            # or yes/no), i.e. the options of its multiple-choice form; else the caller's list.
            cands = list(easy_vqa_candidates(label)) if "kind" in rec.meta else (
                open_candidates or [rec.answer.strip()])
            scores = score_candidates(model, tok, rec, [" " + c for c in cands], image)
            pred, output = cands[max(range(len(cands)), key=scores.__getitem__)], ""
        return {"id": rec.id, "pred": pred, "label": label, "correct": _norm(pred) == _norm(label),
                "parsed": True, "output": output}
    if method != "generate":
        raise ValueError(f"unknown eval method {method!r} (generate or score)")
    output = generate(model, tok, rec, max_new_tokens, image)
    if mc:
        parsed = parse_answer(output)
        return {"id": rec.id, "pred": parsed, "label": label, "correct": parsed == label, "parsed": parsed is not None,
                "output": output}
    pred, correct = judge_open(rec, output)
    return {"id": rec.id, "pred": pred, "label": label, "correct": correct, "parsed": pred is not None,
            "output": output}


def judge_open(rec: Record, output: str) -> tuple[str | None, bool]:
    """(the answer read from a generated open ``output``, or None when none can be read; whether it is right).

    An easy-vqa yes/no answer is the output's last word: " no" and an explained " It is a red circle, so
    there is no blue shape: yes." both end with it; anything else is unparsable and wrong. Other answers are
    compared whole, ignoring case, surrounding spaces and a final period."""
    label = rec.meta.get("answer", rec.answer.strip())
    if rec.meta.get("kind") == "yes/no":
        m = YES_NO_END_RE.search(output)
        pred = m.group(1).lower() if m else None
        return pred, pred == _norm(label)
    return output.strip(), _norm(output) == _norm(label)


def evaluate_records(model: LaVIN, tok: Any, records: list[Record], method: str = "generate",
                     max_new_tokens: int = 24, open_candidates: list[str] | None = None,
                     dtype: torch.dtype = torch.float32, problems: Problems | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Accuracy over ``records`` with per-category tables; unusable images are reported and skipped."""
    problems = problems or Problems()
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    rows: list[dict[str, Any]] = []
    used: list[Record] = []
    t0 = time.perf_counter()
    it: Any = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, unit="q", dynamic_ncols=True, file=sys.stderr, desc="eval")
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        for rec in it:
            try:
                rows.append(predict(model, tok, rec, method, max_new_tokens, open_candidates))
            except ImageError as e:
                problems.report(rec.id, rec.source, f"unusable image: {e.reason}")
                continue
            used.append(rec)
    model.train(was_training)
    n = len(rows)
    result: dict[str, Any] = {
        "method": method, "n": n, "correct": sum(r["correct"] for r in rows),
        "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
        "unparsable": [r["id"] for r in rows if not r["parsed"]], "bad_records": [str(b) for b in problems.bad],
        "seconds": time.perf_counter() - t0,
    }
    result["categories"] = category_table(used, rows)
    labels = [str(r["label"]) for r in rows]
    if labels:
        top = max(set(labels), key=labels.count)
        result["majority_answer"] = top
        result["majority_baseline"] = labels.count(top) / n
        # The stronger baseline: the majority answer within each question kind (easy-vqa).
        kinds = [rec.meta.get("kind", "") for rec in used]
        hits = 0
        for k in set(kinds):
            ls = [lab for lab, kk in zip(labels, kinds, strict=True) if kk == k]
            hits += max(ls.count(x) for x in set(ls))
        result["per_kind_majority_baseline"] = hits / n
    result["predictions"] = rows
    return result


def category_table(records: list[Record], rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Accuracy per ScienceQA category (only those with questions), per easy-vqa kind, and the average."""
    table: dict[str, dict[str, float]] = {}
    # ScienceQA categories only for records that carry ScienceQA fields (not easy-vqa open answers).
    sqa = any("has_image" in r.meta for r in records)
    groups: dict[str, Callable[[dict[str, Any]], bool]] = dict(CATEGORIES) if sqa else {}
    for kind in sorted({r.meta["kind"] for r in records if "kind" in r.meta}):
        groups[kind] = lambda m, k=kind: m.get("kind") == k
    for name, pred in groups.items():
        hits = [row["correct"] for rec, row in zip(records, rows, strict=True) if pred(rec.meta)]
        if hits:
            table[name] = {"n": len(hits), "accuracy": sum(hits) / len(hits)}
    if rows:
        table["Avg"] = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows)}
    return table


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'category':<10} {'n':>6} {'acc %':>7}"]
    for name, v in result["categories"].items():
        lines.append(f"{name:<10} {v['n']:>6} {100 * v['accuracy']:>7.2f}")
    lines.append(f"method {result['method']}; unparsable answers (counted wrong): {len(result['unparsable'])}"
                 + (f"; majority baseline {100 * result['majority_baseline']:.2f}% "
                    f"({result['majority_answer']!r})" if "majority_baseline" in result else ""))
    return "\n".join(lines)


def run_eval_spec(model: LaVIN, tok: Any, spec: dict[str, Any], dtype: torch.dtype = torch.float32,
                  log: Callable[..., Any] = print, progress: bool = False) -> dict[str, Any]:
    """The recipe's ``[eval]`` table: a data source table plus ``method``, ``max_new_tokens``, ``limit``.
    ``progress``: a progress bar on stderr."""
    spec = dict(spec)
    method = spec.pop("method", "generate")
    max_new = int(spec.pop("max_new_tokens", 24))
    limit = spec.pop("limit", None)
    problems = Problems()
    records = load_source(spec, problems, split=spec.get("split"))
    if limit is not None and spec.get("type") != "easy-vqa":
        records = records[:int(limit)]
    elif limit is not None:
        records = load_source({**spec, "limit": int(limit)}, problems, split=spec.get("split"))
    cands = None
    if spec.get("type") == "easy-vqa" and spec.get("mode", "open") == "open":
        import easy_vqa

        cands = list(easy_vqa.get_answers())
    result = evaluate_records(model, tok, records, method, max_new, cands, dtype, problems, progress)
    log(format_table(result))
    return result
