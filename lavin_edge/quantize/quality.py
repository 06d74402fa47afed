"""Quality of a model before and after quantization: perplexity on held-out text, accuracy on held-out
questions with images; plus the calibration sets built from the same sources.

Text that ships offline: the docstrings of Python's standard library (``lavin_edge.data.prose``), whose
calibration and held-out halves are disjoint, so perplexity is never measured on text the quantizer
calibrated on."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lavin_edge.model.lavin import TokenizerLike, encode_example
from lavin_edge.model.merged import MergedLaVIN
from lavin_edge.prompt import TEXT_PREFIX
from lavin_edge.quantize.pipeline import CalibSample


def text_samples(tok: TokenizerLike, texts: Iterable[str], max_len: int) -> list[CalibSample]:
    """Text-modality sequences ``[BOS]["Image: N/A"][text]`` cut to ``max_len`` tokens."""
    out = []
    for t in texts:
        ex = encode_example(tok, t, None, False, 0)
        out.append(CalibSample(ex.input_ids[:max_len], -1, None))
    return out


def packed_text_samples(tok: TokenizerLike, paragraphs: Sequence[str], n: int, max_len: int) -> list[CalibSample]:
    """Up to ``n`` text-modality sequences of ``max_len`` tokens, each filled with consecutive paragraphs
    (short paragraphs alone would waste the Hessian on prefix tokens and give few rows per sequence)."""
    out: list[CalibSample] = []
    buf: list[str] = []
    for p in paragraphs:
        buf.append(p)
        ids = encode_example(tok, " ".join(buf), None, False, 0).input_ids
        if len(ids) >= max_len:
            out.append(CalibSample(ids[:max_len], -1, None))
            buf = []
            if len(out) == n:
                break
    if buf and len(out) < n:
        out.append(CalibSample(encode_example(tok, " ".join(buf), None, False, 0).input_ids[:max_len], -1, None))
    return out


def record_samples(records: Sequence[Any], tok: TokenizerLike, n_visual: int, image_size: int, max_len: int,
                   drop_images: bool = False) -> list[CalibSample]:
    """Training records (``lavin_edge.data.records.Record``: prompt, answer, image path, earlier turns) as the
    model reads them, answers included. ``drop_images`` turns them into text-modality samples."""
    from lavin_edge.data.image import load_image

    out = []
    for r in records:
        has_image = r.image is not None and not drop_images
        ex = encode_example(tok, r.prompt, r.answer, has_image, n_visual, history=r.history)
        ids = ex.input_ids[:max_len]
        if has_image and ex.image_pos + n_visual > len(ids):
            continue  # the image would be cut: not a sample the model ever serves
        image = load_image(r.image, image_size) if has_image else None
        out.append(CalibSample(ids, ex.image_pos, image))
    return out


@torch.no_grad()
def perplexity(model: MergedLaVIN, tok: TokenizerLike, texts: Iterable[str], max_len: int = 256) -> float:
    """exp(mean NLL) of the text tokens (the "Image: N/A" prefix conditions but is not scored), text modality."""
    n_prefix = 1 + len(tok.encode(TEXT_PREFIX))
    nll, count = 0.0, 0
    for s in text_samples(tok, texts, max_len):
        ids = torch.tensor([s.input_ids])
        if ids.shape[1] <= n_prefix:
            continue
        logits = model.llm.forward_embeds(model.llm.tok_embeddings(ids), torch.zeros(1, dtype=torch.long))
        lp = F.log_softmax(logits[0, n_prefix - 1:-1].float(), -1)
        tgt = ids[0, n_prefix:]
        nll -= float(lp.gather(1, tgt[:, None]).sum())
        count += tgt.numel()
    if count == 0:
        raise ValueError("no text tokens to score")
    return math.exp(nll / count)


@torch.no_grad()
def answer_accuracy(model: MergedLaVIN, tok: TokenizerLike, records: Sequence[Any], image_size: int,
                    max_new_tokens: int = 8) -> tuple[float, list[str]]:
    """Greedy answers to ``records`` (prompt, image), judged as ``lavin-edge eval`` judges open answers
    (:func:`lavin_edge.evaluate.judge_open`). Returns (accuracy, the decoded answers)."""
    from lavin_edge.data.image import load_image
    from lavin_edge.evaluate import judge_open

    if not records:
        raise ValueError("no evaluation records")
    stops = set(getattr(tok, "stop_ids", None) or {tok.eos_id})
    answers, hits = [], 0
    for r in records:
        has_image = r.image is not None
        ex = encode_example(tok, r.prompt, None, has_image, model.n_visual)
        image = load_image(r.image, image_size) if has_image else None
        out = model.generate_greedy(ex.input_ids, ex.image_pos, image, max_new_tokens, stops)
        text = tok.decode(out)  # type: ignore[attr-defined]
        answers.append(text)
        hits += judge_open(r, text)[1]
    return hits / len(records), answers


def compare(fp: MergedLaVIN, quant: MergedLaVIN, tok: TokenizerLike, texts: Sequence[str] = (),
            records: Sequence[Any] = (), max_len: int = 256, max_new_tokens: int = 8) -> dict[str, float]:
    """fp vs 4-bit: perplexity on ``texts`` and accuracy on ``records`` (each skipped when empty)."""
    out: dict[str, float] = {}
    if texts:
        out["ppl_fp"] = perplexity(fp, tok, texts, max_len)
        out["ppl_q"] = perplexity(quant, tok, texts, max_len)
        out["ppl_rise"] = out["ppl_q"] / out["ppl_fp"] - 1
    if records:
        size = fp.cfg.vision.image_size
        out["acc_fp"] = answer_accuracy(fp, tok, records, size, max_new_tokens)[0]
        out["acc_q"] = answer_accuracy(quant, tok, records, size, max_new_tokens)[0]
        out["acc_drop_points"] = 100 * (out["acc_fp"] - out["acc_q"])
    return out
