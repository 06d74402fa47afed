"""Write the demo's self-distilled text data: the frozen base (SmolLM2-135M-Instruct as a LaVIN with zero
adapters, in LaVIN's text-only prompt format) answers ``lavin_edge.data.self_distill.instructions()`` greedily;
the answers go to ``lavin_edge/data/self_distill_smollm2.jsonl`` (one ``{instruction, answer, split}`` per
line), which ships in the package and which ``[[data]] type = "self-distill"`` reads.

    python scripts/make_self_distill.py [--out PATH] [--max-new-tokens 40] [--threads 1] [--limit N]

(``--llm preset:tiny --limit 12``: a quick run on a random tiny model, what tests/test_self_distill.py does.)
"""

from __future__ import annotations

import argparse
import time

import torch

from lavin_edge.config import AdapterConfig
from lavin_edge.data.self_distill import DEFAULT_PATH, greedy_answers, instructions, split_of, write_jsonl
from lavin_edge.model.lavin import encode_example
from lavin_edge.prompt import chat_prompt
from lavin_edge.training.base import BaseSpec, build_base


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Answer the self-distillation instructions with the frozen base.")
    ap.add_argument("--out", default=str(DEFAULT_PATH))
    ap.add_argument("--llm", default="smollm2-135m")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="Answer only the first N instructions.")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # Fresh adapters have zero up-projections: the model is the frozen base (the modality token is isolated).
    model, tok, _ = build_base(BaseSpec(args.llm, "efficientnet-lite0", None, 0), AdapterConfig())
    model.eval()
    texts = instructions()[:args.limit]
    prompts = [encode_example(tok, chat_prompt(t), None, False, model.n_visual).input_ids for t in texts]
    answers = greedy_answers(model, tok, prompts, args.max_new_tokens, batch_size=64,
                             log=lambda m: print(m, flush=True))
    rows = []
    for text, ids in zip(texts, answers, strict=True):
        answer = tok.decode(ids)
        rows.append({"instruction": text, "answer": answer, "split": split_of(text),
                     "complete": len(ids) < args.max_new_tokens, "round_trip": tok.encode(answer) == ids})
    write_jsonl(rows, args.out)
    print(f"{len(rows)} answers ({sum(r['split'] == 'test' for r in rows)} held out, "
          f"{sum(not r['round_trip'] for r in rows)} not re-tokenizing to the same ids) -> {args.out} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
