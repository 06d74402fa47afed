"""Multi-turn chat and multi-turn training agree: ``ChatSession`` lays a conversation out exactly as
``encode_example(..., history=...)`` does for a training sample (same ids, same image position), a trained
model's greedy continuation of a conversation is the same through both, and ``/image`` starts a new
conversation. Also the data sources behind the demo's chat training: easy-vqa conversations and the
self-distilled text instructions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from test_engine import merged_dir, trained_like

from lavin_edge.chat.session import ChatSession, Turn
from lavin_edge.cli import main
from lavin_edge.data.easyvqa import easy_vqa_image_facts, easy_vqa_yes_no_answer, load_easy_vqa_conversations
from lavin_edge.data.image import load_image
from lavin_edge.data.records import DataError, Problems, followup_prompt
from lavin_edge.data.sources import load_self_distill
from lavin_edge.model.lavin import IGNORE_INDEX, encode_example
from lavin_edge.prompt import chat_prompt
from lavin_edge.runtime import Engine
from lavin_edge.runtime.sampling import GenerationConfig


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    model = trained_like(3)
    return model, merged_dir(model, tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("img")
    out = []
    for name, colour in (("red.png", (200, 30, 30)), ("blue.png", (30, 30, 200))):
        im = Image.new("RGB", (64, 64), "white")
        for x in range(16, 48):
            for y in range(16, 48):
                im.putpixel((x, y), colour)
        im.save(d / name)
        out.append(d / name)
    return out[0], out[1]


def test_session_layout_is_the_training_layout(model_and_dir, image_paths) -> None:
    _, path = model_and_dir
    eng = Engine.load(path, backend="torch")
    tok = eng.tokenizer
    s = ChatSession(eng)
    s.set_image(image_paths[0])
    turns = [("what color is the shape?", " red"), ("is there a circle?", " It is a red square, so no.")]
    s.turns = [Turn(q, tok.encode(a), a) for q, a in turns]
    ids, image_pos, _ = s.build("is there not a red shape?")
    history = [(chat_prompt(turns[0][0]), turns[0][1]), (followup_prompt(turns[1][0]), turns[1][1])]
    ex = encode_example(tok, followup_prompt("is there not a red shape?"), None, True, eng.n_visual, history=history)
    assert ids == ex.input_ids and image_pos == ex.image_pos
    # Every earlier answer (and its EOS) is in the loss of a training sample, the prompts are not.
    trained = encode_example(tok, followup_prompt("is there not a red shape?"), " yes", True, eng.n_visual,
                             history=history)
    labelled = [t for t, lab in zip(trained.input_ids, trained.labels, strict=True) if lab != IGNORE_INDEX]
    want = tok.encode(" red") + [tok.eos_id] + tok.encode(turns[1][1]) + [tok.eos_id] + tok.encode(" yes") + [
        tok.eos_id]
    assert labelled == want
    # Text only: the same, without the visual tokens.
    t = ChatSession(Engine.load(path, backend="torch"))
    t.turns = [Turn("hi", tok.encode(" hello"), " hello")]
    ids, image_pos, _ = t.build("and then?")
    ex = encode_example(tok, followup_prompt("and then?"), None, False, eng.n_visual,
                        history=[(chat_prompt("hi"), " hello")])
    assert ids == ex.input_ids and image_pos == -1


def test_conversation_continues_as_the_training_model_reads_it(model_and_dir, image_paths) -> None:
    """The engine's greedy answer to a 3rd turn, with its KV cache reused from the turns before, is the trained
    model's greedy continuation of the training layout of the same conversation. (The earlier answers are
    set as text, since a random tiny model's own bytes need not decode to text that re-encodes the same.)"""
    model, path = model_and_dir
    eng = Engine.load(path, backend="torch")
    tok = eng.tokenizer
    s = ChatSession(eng, GenerationConfig(max_new_tokens=5))
    s.set_image(image_paths[0])
    s.turns = [Turn("what shape?", tok.encode(" a square"), " a square")]
    s.ask("and the colour?")  # fills the cache; its answer is then replaced, as if the model had said " red"
    s.turns[1] = Turn("and the colour?", tok.encode(" red"), " red")
    third, _ = s.ask("is it red?")
    history = [(chat_prompt("what shape?"), " a square"), (followup_prompt("and the colour?"), " red")]
    ex = encode_example(tok, followup_prompt("is it red?"), None, True, model.n_visual, history=history)
    ref = model.generate_greedy(ex.input_ids, ex.image_pos, load_image(image_paths[0], model.cfg.vision.image_size),
                                5, {tok.eos_id})
    assert third.ids == ref


def test_new_image_starts_a_new_conversation(model_and_dir, image_paths) -> None:
    _, path = model_and_dir
    eng = Engine.load(path, backend="torch")
    s = ChatSession(eng, GenerationConfig(max_new_tokens=4))
    s.set_image(image_paths[0])
    s.ask("what shape?")
    assert s.set_image(image_paths[1]) is True and s.turns == []
    after, _ = s.ask("what colour?")
    fresh = ChatSession(Engine.load(path, backend="torch"), GenerationConfig(max_new_tokens=4))
    assert fresh.set_image(image_paths[1]) is False
    alone, _ = fresh.ask("what colour?")
    assert after.ids == alone.ids  # nothing of the first image's conversation is left
    # The REPL says so.
    script = f"what shape?\n/image {image_paths[1]}\nwhat colour?\n"
    res = CliRunner().invoke(main, ["chat", "--model", str(path), "--image", str(image_paths[0]), "--json",
                                    "--max-new-tokens", "4", "--backend", "torch"], input=script)
    assert res.exit_code == 0, res.stderr
    assert "new conversation; history cleared" in res.stderr
    answers = [json.loads(line) for line in res.stdout.splitlines()]
    assert answers[1]["answer"] == alone.text.strip()


def test_easy_vqa_conversations() -> None:
    recs = load_easy_vqa_conversations("train", Problems(strict=True), 200, seed=0, min_turns=2, max_turns=4)
    assert {len(r.history) + 1 for r in recs} == {2, 3, 4}
    assert all(r.history[0][0].startswith("Instruction: ") for r in recs)
    assert all(p.startswith("\nInstruction: ") for r in recs for p, _ in r.history[1:]) and all(
        r.prompt.startswith("\nInstruction: ") for r in recs)
    # The last turn is yes/no, yes and no about equally often; its target ends with the answer.
    answers = [r.meta["answer"] for r in recs]
    assert set(answers) == {"yes", "no"} and 0.4 < answers.count("yes") / len(answers) < 0.6
    assert all(r.answer.endswith(f": {r.meta['answer']}.") for r in recs)
    # Colour/shape questions never name another shape/colour than the image's.
    for r in recs:
        for p, a in r.history:
            words = set(p.lower().replace("?", " ").split())
            assert not words & ({"circle", "rectangle", "triangle"} - {r.meta["shape"]}) or a.startswith(" It is")
    with pytest.raises(DataError):
        load_easy_vqa_conversations("train", Problems(), 3, min_turns=3, max_turns=2)


def test_yes_no_rule_matches_easy_vqa_test_answers() -> None:
    import easy_vqa

    qs, answers, iids = easy_vqa.get_test_questions()
    facts = easy_vqa_image_facts(qs, answers, iids)
    checked = [(q, a, iid) for q, a, iid in zip(qs, answers, iids, strict=True) if a in ("yes", "no") and iid in facts]
    assert len(checked) > 1000
    assert all(easy_vqa_yes_no_answer(q, *facts[iid]) == a for q, a, iid in checked)


def test_self_distill_source(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "Say hi.", "answer": " Hi!", "split": "train"}\n'
                 '{"instruction": "Count to 3.", "answer": " 1, 2, 3", "split": "test", "complete": false}\n'
                 'not json\n{"instruction": "x"}\n')
    problems = Problems()
    train = load_self_distill(p, "train", problems)
    assert [(r.prompt, r.answer, r.image) for r in train] == [(chat_prompt("Say hi."), " Hi!", None)]
    assert len(problems.bad) == 2
    test = load_self_distill(p, "test", Problems())
    assert test[0].answer == " 1, 2, 3" and test[0].meta["complete"] is False
    with pytest.raises(DataError):
        load_self_distill(tmp_path / "missing.jsonl", "train", Problems())


def test_shipped_self_distill_data_has_a_held_out_split() -> None:
    train = load_self_distill(None, "train", Problems(strict=True))
    test = load_self_distill(None, "test", Problems(strict=True))
    assert len(test) >= 50 and len(train) >= 250
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    # The base's answers as it gave them: an empty one (it stopped at once) is kept, but they are rare.
    assert sum(not r.answer.strip() for r in train + test) <= 3
