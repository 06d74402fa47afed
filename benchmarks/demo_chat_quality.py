"""The demo as a chat model (issue 15): does text-only chat stay the base LLM's, do follow-up turns answer
about the right image, and do single turns stay right, for the fp (merged) and 4-bit (quantized) demo.

- text: on the held-out self-distilled instructions (``[[data]] type = "self-distill"``, split "test", never
  trained on), teacher-forced top-1 agreement with the frozen base's own greedy answers, and perplexity of
  those answers and of held-out prose (standard-library docstrings, ``quantize.quality.stdlib_paragraphs``),
  demo against base (``lavin_edge.text_fidelity``);
- follow-ups: yes/no as the 2nd or 3rd turn about one easy-vqa test image, or right after ``/image``
  (``lavin_edge.chat.followups``), through ``ChatSession`` on the chat engine;
- single turn: easy-vqa test questions, one fresh conversation each, judged as ``lavin-edge eval`` judges.

    LAVIN_EDGE_DEMO_DIR=/tmp/demo python benchmarks/demo_chat_quality.py [--followups 200] [--single 1000]

The demo is built from the shipped adapters if needed. Results go to benchmarks/demo_chat_quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lavin_edge.chat.demo import demo_model_dir
from lavin_edge.chat.followups import followup_cases, run_followups
from lavin_edge.chat.sampling import GenerationConfig
from lavin_edge.chat.session import ChatSession
from lavin_edge.config import AdapterConfig
from lavin_edge.data.sources import Problems, load_easy_vqa, load_self_distill
from lavin_edge.evaluate import judge_open
from lavin_edge.merge import load_merged
from lavin_edge.quantize.pipeline import load_quantized_as_fp
from lavin_edge.quantize.quality import stdlib_paragraphs
from lavin_edge.runtime import Engine
from lavin_edge.text_fidelity import text_fidelity
from lavin_edge.training.base import BaseSpec, build_base


def single_turn(engine: Engine, n: int, seed: int) -> dict[str, Any]:
    recs = load_easy_vqa("test", Problems(strict=True), "open", limit=n, seed=seed)
    hits: dict[str, list[bool]] = {}
    for r in recs:
        s = ChatSession(engine, GenerationConfig(max_new_tokens=24))
        s.set_image(str(r.image))
        text = s.ask(r.prompt.removeprefix("Instruction: ").removesuffix("\nResponse:"))[0].text
        hits.setdefault(r.meta["kind"], []).append(judge_open(r, text)[1])
    allh = [h for v in hits.values() for h in v]
    return {"n": len(allh), "accuracy": sum(allh) / len(allh),
            "kinds": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(hits.items())}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--followups", type=int, default=200)
    ap.add_argument("--single", type=int, default=1000)
    ap.add_argument("--followups-fp", type=int, default=None, help="cases for the fp engine (default --followups)")
    ap.add_argument("--single-fp", type=int, default=None, help="questions for the fp engine (default --single)")
    ap.add_argument("--texts", type=int, default=40, help="held-out prose paragraphs for perplexity")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", default="benchmarks/demo_chat_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    root = demo_model_dir(quantized=True, build=True).parent
    report: dict[str, Any] = {"demo": str(root)}
    t0 = time.perf_counter()

    base, tok, _ = build_base(BaseSpec("smollm2-135m", "efficientnet-lite0", None, 0), AdapterConfig())
    held_out = load_self_distill(None, "test", Problems(strict=True))
    texts = stdlib_paragraphs("heldout")[:args.texts]
    for name, loader in (("fp", lambda: load_merged(root / "merged")[0]),
                         ("4bit", lambda: load_quantized_as_fp(root / "quantized")[0])):
        report[f"text_{name}"] = text_fidelity(loader(), base.eval(), tok, held_out, texts)
        log(f"text {name}: {json.dumps(report[f'text_{name}'])}")
    del base

    cases = followup_cases(args.followups, seed=0)
    for name, path in (("4bit", root / "quantized"), ("fp", root / "merged")):
        eng = Engine.load(path)
        n_fu = args.followups if name == "4bit" or args.followups_fp is None else args.followups_fp
        if n_fu:
            fu = run_followups(eng, cases[:n_fu])
            report[f"followups_{name}"] = {k: v for k, v in fu.items() if k != "wrong"} | {"wrong": fu["wrong"][:10]}
            log(f"follow-ups {name}: {fu['accuracy']:.3f} {json.dumps(fu['kinds'])}")
        n = args.single if name == "4bit" or args.single_fp is None else args.single_fp
        if n:
            report[f"single_{name}"] = single_turn(eng, n, seed=0)
            log(f"single {name}: {json.dumps(report[f'single_{name}'])}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["threads"] = args.threads
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items()}, indent=2)[:4000])


if __name__ == "__main__":
    main()
