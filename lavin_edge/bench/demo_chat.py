"""The demo as a chat model (issue 15): does text-only chat stay the base LLM's, do follow-up turns answer
about the right image, and do single turns stay right, for the fp (merged) and 4-bit (quantized) demo.

- text: on the held-out self-distilled instructions (``[[data]] type = "self-distill"``, split "test", never
  trained on), teacher-forced top-1 agreement with the frozen base's own greedy answers, and perplexity of
  those answers and of held-out prose (standard-library docstrings, ``lavin_edge.data.prose``),
  demo against base (``lavin_edge.bench.text_fidelity``);
- follow-ups: yes/no as the 2nd or 3rd turn about one easy-vqa test image, or right after ``/image``
  (``lavin_edge.bench.followups``), through ``ChatSession`` on the chat engine;
- single turn: easy-vqa test questions, one fresh conversation each, judged as ``lavin-edge eval`` judges.

    LAVIN_EDGE_DEMO_DIR=/tmp/demo lavin-edge bench demo-chat [--followups 200] [--single 1000] [--report F]

The demo is built from the shipped adapters if needed. The last recorded results are in
docs/benchmarks/demo_chat_quality.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch

from lavin_edge.bench.followups import followup_cases, run_followups
from lavin_edge.bench.text_fidelity import text_fidelity
from lavin_edge.chat.session import ChatSession
from lavin_edge.config import AdapterConfig
from lavin_edge.data.easyvqa import load_easy_vqa
from lavin_edge.data.prose import stdlib_paragraphs
from lavin_edge.data.records import Problems
from lavin_edge.data.sources import load_self_distill
from lavin_edge.demo.build import demo_model_dir
from lavin_edge.evaluate import judge_open
from lavin_edge.merge import load_merged
from lavin_edge.quantize.files import load_quantized_as_fp
from lavin_edge.runtime import Engine
from lavin_edge.runtime.sampling import GenerationConfig
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


def run_demo_chat_bench(followups: int = 200, single: int = 1000, followups_fp: int | None = None,
                        single_fp: int | None = None, texts: int = 40,
                        log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Text fidelity, follow-up turns and single turns of the demo, fp and 4-bit (see the module docstring).
    ``followups_fp`` / ``single_fp``: cases for the fp engine (default: the 4-bit counts)."""
    root = demo_model_dir(quantized=True, build=True).parent
    report: dict[str, Any] = {"demo": str(root)}
    t0 = time.perf_counter()

    base, tok, _ = build_base(BaseSpec("smollm2-135m", "efficientnet-lite0", None, 0), AdapterConfig())
    held_out = load_self_distill(None, "test", Problems(strict=True))
    paragraphs = stdlib_paragraphs("heldout")[:texts]
    for name, loader in (("fp", lambda: load_merged(root / "merged")[0]),
                         ("4bit", lambda: load_quantized_as_fp(root / "quantized")[0])):
        report[f"text_{name}"] = text_fidelity(loader(), base.eval(), tok, held_out, paragraphs)
        log(f"text {name}: {json.dumps(report[f'text_{name}'])}")
    del base

    cases = followup_cases(max(followups, followups_fp or 0), seed=0)
    for name, path in (("4bit", root / "quantized"), ("fp", root / "merged")):
        eng = Engine.load(path)
        n_fu = followups if name == "4bit" or followups_fp is None else followups_fp
        if n_fu:
            fu = run_followups(eng, cases[:n_fu])
            report[f"followups_{name}"] = {k: v for k, v in fu.items() if k != "wrong"} | {"wrong": fu["wrong"][:10]}
            log(f"follow-ups {name}: {fu['accuracy']:.3f} {json.dumps(fu['kinds'])}")
        n = single if name == "4bit" or single_fp is None else single_fp
        if n:
            report[f"single_{name}"] = single_turn(eng, n, seed=0)
            log(f"single {name}: {json.dumps(report[f'single_{name}'])}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["threads"] = torch.get_num_threads()
    return report
