"""Which yes/no target can rank-8 adapters on SmolLM2-135M learn? A text-only check behind recipes/demo.toml's
`explain` format (docs/demo.md, "How the demo learned yes/no").

The image is left out: its colour and shape are given as teacher-forced text in the target, so only the
decision is learned. For each target format, adapters are trained on balanced easy-vqa yes/no questions
(Alpaca JSON, text modality), then the final word (and, for the stepwise format, the middle clause) is read
teacher-forced on held-out test questions, split into plain and negated questions.

    python experiments/yes_no_targets.py [--steps 400] [--train 4000] [--test 400] [--out runs/yes_no_targets]

~13 min per format on 1 thread. Not a CI test. Results go to OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from lavin_edge.data.easyvqa import balance_answers, easy_vqa_image_facts, easy_vqa_negated, explained_answer
from lavin_edge.io.tokenizer import load_tokenizer
from lavin_edge.model.lavin import Batch, encode_example
from lavin_edge.prompt import chat_prompt
from lavin_edge.training.base import resolve_llm
from lavin_edge.training.config import TrainConfig
from lavin_edge.training.loop import train


def direct_answer(question: str, colour: str, shape: str, answer: str) -> str:
    """From the image's facts straight to the answer (the format that stayed at chance)."""
    return f" It is a {colour} {shape}, so {answer}."


FORMATS = {"direct": direct_answer, "stepwise": explained_answer}


def yes_no_records(split: str, fmt: str, n: int, seed: int = 0) -> list[dict]:
    import easy_vqa

    qs, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    facts = easy_vqa_image_facts(qs, answers, image_ids)
    idx = [i for i in range(len(qs)) if answers[i] in ("yes", "no") and image_ids[i] in facts]
    idx = balance_answers(idx, qs, answers, seed)
    random.Random(seed).shuffle(idx)
    return [{"id": i, "instruction": qs[i], "answer": answers[i],
             "output": FORMATS[fmt](qs[i], *facts[image_ids[i]], answers[i]).strip()} for i in idx[:n]]


@torch.no_grad()
def decision_accuracy(model: torch.nn.Module, tok: object, records: list[dict], clause: str) -> dict[str, float]:
    """Teacher-forced: the target up to the word under test, then " yes" vs " no" (``clause="answer"``) or
    " a" vs " no" after "so there is" (``clause="middle"``). Accuracy per plain / negated question."""
    first, second = ("yes", "no") if clause == "answer" else ("a", "no")
    ids_first, ids_second = tok.encode(" " + first)[-1], tok.encode(" " + second)[-1]
    hits: dict[str, list[int]] = {"plain": [0, 0], "negated": [0, 0]}
    for r in records:
        out = " " + r["output"]
        if clause == "answer":
            cut, gold = out.rindex(" " + r["answer"]), r["answer"]
        else:
            cut = out.index("so there is") + len("so there is")
            gold = "a" if out[cut:].startswith(" a ") else "no"
        ids = encode_example(tok, chat_prompt(r["instruction"]), None, False, 0).input_ids + tok.encode(out[:cut])
        t = torch.tensor([ids])
        logits = model(Batch(t, t, torch.tensor([-1]), None))[0, -1]
        pred = first if logits[ids_first] > logits[ids_second] else second
        h = hits["negated" if easy_vqa_negated(r["instruction"]) else "plain"]
        h[0] += pred == gold
        h[1] += 1
    return {k: h / n for k, (h, n) in hits.items() if n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--train", type=int, default=4000, help="balanced training questions per format")
    ap.add_argument("--test", type=int, default=400, help="held-out test questions")
    ap.add_argument("--formats", default="direct,stepwise")
    ap.add_argument("--out", default="runs/yes_no_targets")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict] = {}
    tok = load_tokenizer(resolve_llm("smollm2-135m"))
    for fmt in args.formats.split(","):
        data = out / f"{fmt}_train.json"
        data.write_text(json.dumps(yes_no_records("train", fmt, args.train)))
        cfg = TrainConfig(llm="smollm2-135m", vision="efficientnet-lite0", base_dtype="fp32", max_seq_len=64,
                          batch_size=8, epochs=1, max_steps=args.steps, warmup_epochs=0.05, lr=3e-3, threads=1,
                          out_dir=str(out / fmt), log_every=50, data=[{"type": "alpaca", "path": str(data)}])
        res = train(cfg)
        assert res is not None
        model = res.model
        assert model is not None
        model.eval()
        test = yes_no_records("test", fmt, args.test)
        report[fmt] = {"example": test[0]["output"], "steps": res.steps, "final_word": decision_accuracy(
            model, tok, test, "answer")}
        if fmt == "stepwise":
            report[fmt]["middle_clause"] = decision_accuracy(model, tok, test, "middle")
        print(fmt, json.dumps(report[fmt]))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
