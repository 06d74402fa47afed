"""``python scripts/make_self_distill.py``, the command that writes the shipped self-distilled answers, run on a
random tiny base: its batched greedy answers are each prompt's batch-1 greedy answer (issue 24: the script called
the LLM's forward with its arguments out of order and failed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lavin_edge.config import AdapterConfig
from lavin_edge.data.self_distill import instructions, split_of
from lavin_edge.model.lavin import encode_example
from lavin_edge.prompt import chat_prompt
from lavin_edge.training.base import BaseSpec, build_base

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_self_distill.py"


def _script_main():  # noqa: ANN202 - the script's main
    spec = importlib.util.spec_from_file_location("make_self_distill", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_script_answers_as_the_base_does_one_prompt_at_a_time(tmp_path: Path, capsys: pytest.CaptureFixture
                                                              ) -> None:
    out = tmp_path / "answers.jsonl"
    _script_main()(["--llm", "preset:tiny", "--limit", "12", "--max-new-tokens", "5", "--threads", "1",
                    "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    texts = instructions()[:12]
    assert [r["instruction"] for r in rows] == texts
    assert [r["split"] for r in rows] == [split_of(t) for t in texts]
    assert "12 answers" in capsys.readouterr().out
    # The same frozen base, each prompt alone through LaVIN.generate_greedy (the reference greedy loop).
    model, tok, _ = build_base(BaseSpec("preset:tiny", "efficientnet-lite0", None, 0), AdapterConfig())
    model.eval()
    stops = set(getattr(tok, "stop_ids", {tok.eos_id}))
    for row, text in zip(rows, texts, strict=True):
        ex = encode_example(tok, chat_prompt(text), None, False, model.n_visual)
        ids = model.generate_greedy(ex.input_ids, ex.image_pos, None, 5, stops)
        assert row["answer"] == tok.decode(ids) and row["complete"] == (len(ids) < 5), text
