"""Eval: answer parsing, unparsable answers count as wrong, the ScienceQA category table, and the CLI on a
ScienceQA-layout export of easy-vqa with a freshly trained tiny artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import lavin_edge.evaluate as ev
from lavin_edge.cli import main as cli_main
from lavin_edge.config import AdapterConfig
from lavin_edge.data import Record, export_easy_vqa_scienceqa
from lavin_edge.training.base import BaseSpec, build_base
from lavin_edge.training.config import TrainConfig
from lavin_edge.training.loop import train


def test_parse_answer() -> None:
    assert ev.parse_answer(" The answer is B. BECAUSE: x") == "B"
    assert ev.parse_answer("blah The answer is C") == "C"
    assert ev.parse_answer("The answer is b.") is None
    assert ev.parse_answer("I think (A)") is None


def _rec(rid: str, label: str, **meta: object) -> Record:
    return Record(rid, "Question: q\nContext: N/A\nOptions: (A) x (B) y\nResponse:", f" The answer is {label}.",
                  None, "t", {"label": label, "choices": ["x", "y"], **meta})


def test_unparsable_is_wrong_and_categories(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, _ = build_base(BaseSpec("preset:tiny", "preset:tiny"), AdapterConfig())
    recs = [
        _rec("1", "A", subject="natural science", grade="grade2", has_text=True, has_image=False),
        _rec("2", "B", subject="social science", grade="grade9", has_text=False, has_image=False),
        _rec("3", "A", subject="language science", grade="grade7", has_text=False, has_image=False),
        _rec("4", "B", subject="natural science", grade="grade1", has_text=False, has_image=False),
    ]
    outputs = {"1": " The answer is A.", "2": " The answer is A.", "3": "gibberish", "4": "The answer is B"}
    monkeypatch.setattr(ev, "generate", lambda m, t, rec, n, img: outputs[rec.id])
    res = ev.evaluate_records(model, tok, recs)
    assert res["n"] == 4 and res["correct"] == 2 and res["accuracy"] == 0.5
    assert res["unparsable"] == ["3"]
    cats = res["categories"]
    assert cats["NAT"] == {"n": 2, "accuracy": 1.0} and cats["SOC"]["accuracy"] == 0.0
    assert cats["LAN"] == {"n": 1, "accuracy": 0.0}
    assert cats["TXT"] == {"n": 1, "accuracy": 1.0} and cats["NO"] == {"n": 3, "accuracy": 1 / 3}
    assert "IMG" not in cats
    assert cats["G1-6"] == {"n": 2, "accuracy": 1.0} and cats["G7-12"] == {"n": 2, "accuracy": 0.0}
    assert cats["Avg"]["accuracy"] == 0.5
    assert "unparsable answers (counted wrong): 1" in ev.format_table(res)


def test_easy_vqa_yes_no_answer_is_the_last_word(monkeypatch: pytest.MonkeyPatch) -> None:
    """Open easy-vqa answers: colour/shape by exact match; yes/no by the output's last word, so a plain " no" and
    an explained " It is a red circle, so there is no blue shape: yes." both count (its earlier "no" is not the
    answer), and an output not ending in yes/no is unparsable."""
    model, tok, _ = build_base(BaseSpec("preset:tiny", "preset:tiny"), AdapterConfig())

    def rec(rid: str, answer: str, kind: str) -> Record:
        return Record(rid, "Instruction: q?\nResponse:", " " + answer, None, "easy-vqa",
                      {"kind": kind, "answer": answer})

    recs = [rec("1", "no", "yes/no"), rec("2", "yes", "yes/no"), rec("3", "no", "yes/no"), rec("4", "yes", "yes/no"),
            rec("5", "red", "color"), rec("6", "circle", "shape")]
    outputs = {"1": " no", "2": " It is a red circle, so there is no blue shape: yes.",
               "3": " It is a red circle, so there is no blue shape: yes.",
               "4": " yes, it is a", "5": " red.", "6": " It is a circle"}
    monkeypatch.setattr(ev, "generate", lambda m, t, r, n, img: outputs[r.id])
    res = ev.evaluate_records(model, tok, recs)
    assert [p["correct"] for p in res["predictions"]] == [True, True, False, False, True, False]
    assert res["unparsable"] == ["4"]


def test_score_path_picks_an_option() -> None:
    model, tok, _ = build_base(BaseSpec("preset:tiny", "preset:tiny"), AdapterConfig())
    rec = _rec("1", "B", subject="natural science", grade="grade1", has_text=False, has_image=False)
    out = ev.predict(model.eval(), tok, rec, "score", 8, None)
    assert out["pred"] in ("A", "B") and out["parsed"]
    scores = ev.score_candidates(model, tok, rec, [" The answer is A.", " The answer is B."], None)
    assert len(scores) == 2 and all(s < 0 for s in scores)


def test_cli_eval_on_scienceqa_layout(tmp_path: Path) -> None:
    root = export_easy_vqa_scienceqa(tmp_path / "sqa", {"train": 16, "test": 6})
    art = tmp_path / "art"
    train(TrainConfig(data=[{"type": "scienceqa", "root": str(root), "split": "train"}], max_seq_len=160,
                      batch_size=4, max_steps=2, epochs=1, lr=1e-3, threads=1, progress=False, out_dir=str(art)))
    out = tmp_path / "res.json"
    res = CliRunner().invoke(cli_main, ["eval", str(art), "--data", str(root), "--split", "test", "--limit", "4",
                                        "--max-new-tokens", "20", "--json", str(out), "--no-progress",
                                        "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "Avg" in res.output and "IMG" in res.output
    data = json.loads(out.read_text())
    assert data["n"] == 4 and set(data["categories"]) >= {"NAT", "IMG", "G1-6", "Avg"}
    assert len(data["predictions"]) == 4 and all("output" in p for p in data["predictions"])
    # an untrained tiny model does not write "The answer is X": those count as wrong and are listed
    assert data["correct"] + len(data["unparsable"]) <= 4
