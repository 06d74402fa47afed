"""How close an adapted model's text route stays to its frozen base: teacher-forced top-1 agreement with the
base's own greedy answers, and perplexity (of those answers, and of held-out prose), model against base.

LaVIN's routing is meant to let one model take text-only instructions "without compromising" the LLM. With
targets written by the base itself (``lavin_edge.data.self_distill``), the base agrees with them at ~100% by
construction; an adapted model that left the text route alone does too. Works on any model with
``forward(Batch) -> logits`` aligned with the input ids (``LaVIN``, ``MergedLaVIN``, a dequantized 4-bit one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lavin_edge.data.records import Record
from lavin_edge.model.lavin import IGNORE_INDEX, Example, collate, encode_example
from lavin_edge.runtime.compare import top1_matches


def record_examples(tok: Any, records: Sequence[Record]) -> list[Example]:
    """Text-only records as scored sequences: the answer's tokens, plus EOS only where the base stopped there
    (``meta["complete"]`` false: the answer was cut at the generation limit, so EOS was not the base's)."""
    out = []
    for r in records:
        ex = encode_example(tok, r.prompt, r.answer, False, 0, history=r.history)
        if not r.meta.get("complete", True):
            ex = Example(ex.input_ids[:-1], ex.labels[:-1], ex.image_pos)
        out.append(ex)
    return out


def text_examples(tok: Any, texts: Sequence[str], max_len: int = 128) -> list[Example]:
    """Prose as text-modality sequences ``[BOS]["Image: N/A"][text]``, every text token scored."""
    out = []
    for t in texts:
        prefix = encode_example(tok, "", None, False, 0).input_ids
        ids = tok.encode(t)[:max_len - len(prefix)]
        out.append(Example(prefix + ids, [IGNORE_INDEX] * len(prefix) + ids, -1))
    return out


@torch.no_grad()
def score(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> dict[str, Any]:
    """Over the labelled tokens of ``examples``: how many there are, how many the model's top-1 prediction
    matches, and their summed negative log-likelihood; ``top1`` lists each example's predicted ids."""
    was_training = getattr(model, "training", False)
    model.eval()
    n = agree = 0
    nll = 0.0
    top1: list[list[int]] = []
    for s in range(0, len(examples), batch_size):
        batch = collate(list(examples[s:s + batch_size]), [None] * len(examples[s:s + batch_size]), pad_id)
        logits = model(batch)[:, :-1].float()
        target = batch.labels[:, 1:]
        keep = target != IGNORE_INDEX
        pred = logits.argmax(-1)
        lp = -F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
        n += int(keep.sum())
        agree += top1_matches(logits, target, keep)
        nll -= float((lp * keep).sum())
        top1 += [pred[i][keep[i]].tolist() for i in range(pred.shape[0])]
    model.train(was_training)
    return {"tokens": n, "agree": agree, "nll": nll, "top1": top1}


def text_fidelity(model: Any, base: Any, tok: Any, records: Sequence[Record], texts: Sequence[str] = (),
                  max_len: int = 128) -> dict[str, Any]:
    """``model`` against ``base`` on held-out self-distilled ``records`` (answers written by ``base``) and prose
    ``texts``: top-1 agreement with the answers' tokens (teacher-forced), answer and prose perplexity of both,
    and the model/base perplexity ratios."""
    rec_ex = record_examples(tok, records)
    out: dict[str, Any] = {"instructions": len(records)}
    for name, m in (("model", model), ("base", base)):
        s = score(m, rec_ex, tok.pad_id)
        out[name] = {"answer_tokens": s["tokens"], "top1_agreement": s["agree"] / max(s["tokens"], 1),
                     "answer_perplexity": math.exp(s["nll"] / max(s["tokens"], 1))}
        if texts:
            t = score(m, text_examples(tok, texts, max_len), tok.pad_id)
            out[name]["text_perplexity"] = math.exp(t["nll"] / max(t["tokens"], 1))
            out[name]["text_tokens"] = t["tokens"]
    out["answer_perplexity_ratio"] = out["model"]["answer_perplexity"] / out["base"]["answer_perplexity"]
    if texts:
        out["text_perplexity_ratio"] = out["model"]["text_perplexity"] / out["base"]["text_perplexity"]
    return out
