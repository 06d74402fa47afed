"""Data: image preprocessing and its errors, ScienceQA / LLaVA / Alpaca / easy-vqa sources, bad records,
mixed text-only + image batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lavin_edge.data import (
    DataError,
    ImageError,
    LavinDataset,
    Problems,
    collate_items,
    export_easy_vqa_scienceqa,
    load_alpaca,
    load_easy_vqa,
    load_image,
    load_llava,
    load_scienceqa,
)
from lavin_edge.data.image import IMAGENET_MEAN, IMAGENET_STD
from lavin_edge.io.tokenizer import ByteTokenizer


def _png(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: int = 64) -> Path:
    Image.new("RGB", (size, size), color).save(path)
    return path


# ------------------------------------------------------------------------------------------------ images

def test_load_image_resizes_and_normalises(tmp_path: Path) -> None:
    x = load_image(_png(tmp_path / "red.png", (255, 0, 0), 40), size=56)
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    want = torch.tensor([(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                         -IMAGENET_MEAN[2] / IMAGENET_STD[2]])
    assert torch.allclose(x[:, 28, 28], want, atol=1e-5)
    # grey-scale and RGBA files come out as 3 channels
    Image.new("L", (10, 10), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (10, 10), (0, 0, 255, 10)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "g.png", 16).shape == (3, 16, 16)
    assert load_image(tmp_path / "a.png", 16).shape == (3, 16, 16)


def test_load_image_is_bicubic_without_crop(tmp_path: Path) -> None:
    # a wide image keeps both halves: no centre crop cuts the blue half away
    im = Image.new("RGB", (200, 50), (255, 0, 0))
    im.paste((0, 0, 255), (100, 0, 200, 50))
    im.save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 32)
    assert x[2, 16, 2] < 0 < x[2, 16, 29]  # blue channel low on the left, high on the right
    ref = torch.tensor(list(im.resize((32, 32), Image.Resampling.BICUBIC).get_flattened_data()), dtype=torch.float32)
    assert torch.allclose(x[0].flatten() * IMAGENET_STD[0] + IMAGENET_MEAN[0], ref[:, 0] / 255, atol=1e-5)


@pytest.mark.parametrize("case", ["missing", "not_image", "truncated", "bomb"])
def test_load_image_errors(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / f"{case}.png"
    reason = {"missing": "not found", "not_image": "not an image", "truncated": "truncated",
              "bomb": "decompression bomb"}[case]
    if case == "not_image":
        p.write_text("hello, I am text")
    elif case == "truncated":
        _png(tmp_path / "ok.png", (1, 2, 3), 64)
        data = (tmp_path / "ok.png").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "bomb":
        _png(p, size=64)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 px: over the limit
    with pytest.raises(ImageError, match=reason) as e:
        load_image(p)
    assert e.value.path == str(p) and isinstance(e.value, ValueError)


# ------------------------------------------------------------------------------------------------ ScienceQA

def _scienceqa(root: Path) -> Path:
    (root / "images" / "train" / "1").mkdir(parents=True)
    _png(root / "images" / "train" / "1" / "image.png")
    probs = {
        "1": {"question": "Which color?", "choices": ["red", "blue"], "answer": 0, "hint": "Look.",
              "image": "image.png", "subject": "natural science", "grade": "grade3", "lecture": "Colors.",
              "solution": "It is red."},
        "2": {"question": "Pick B.", "choices": ["x", "y", "z"], "answer": 1, "hint": "", "image": None,
              "subject": "language science", "grade": "grade8", "lecture": "", "solution": ""},
        "3": {"question": "No image file", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "subject": "social science", "grade": "grade2"},
        "4": {"question": "Missing choices", "answer": 0},
    }
    (root / "problems.json").write_text(json.dumps(probs))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "3", "4", "5"], "test": []}))
    return root


def test_scienceqa_prompt_and_bad_records(tmp_path: Path) -> None:
    root = _scienceqa(tmp_path)
    problems = Problems()
    recs = load_scienceqa(root, "train", problems)
    assert [r.id for r in recs] == ["1", "2"]
    assert recs[0].prompt == "Question: Which color?\nContext: Look.\nOptions: (A) red (B) blue\nResponse:"
    assert recs[0].answer == " The answer is A. BECAUSE: Colors. It is red."
    assert recs[0].image == str(root / "images/train/1/image.png")
    assert recs[1].prompt == "Question: Pick B.\nContext: N/A\nOptions: (A) x (B) y (C) z\nResponse:"
    assert recs[1].answer == " The answer is B." and recs[1].image is None
    assert recs[1].meta["label"] == "B" and recs[1].meta["grade"] == "grade8"
    bad = {b.id: b.reason for b in problems.bad}
    assert set(bad) == {"3", "4", "5"}
    assert "image file not found" in bad["3"] and "choices" in bad["4"] and "absent" in bad["5"]
    with pytest.raises(DataError, match="3"):
        load_scienceqa(root, "train", Problems(strict=True))


def test_unreadable_image_is_a_bad_record(tmp_path: Path) -> None:
    root = _scienceqa(tmp_path)
    (root / "images" / "train" / "1" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    problems = Problems()
    recs = load_scienceqa(root, "train", problems)
    ds = LavinDataset(recs, ByteTokenizer(), 6, 64, 512, problems)
    assert len(ds) == 1 and ds.records[0].id == "2"
    assert any(b.id == "1" and "unusable image" in b.reason for b in problems.bad)
    with pytest.raises(DataError, match="unusable image"):
        LavinDataset(recs, ByteTokenizer(), 6, 64, 512, Problems(strict=True))


def test_scienceqa_export_of_easy_vqa_round_trips(tmp_path: Path) -> None:
    root = export_easy_vqa_scienceqa(tmp_path / "sqa", {"train": 6, "test": 4})
    problems = Problems(strict=True)
    recs = load_scienceqa(root, "test", problems)
    assert len(recs) == 4 and all(r.image and Path(r.image).is_file() for r in recs)
    for r in recs:
        assert r.meta["choices"][ord(r.meta["label"]) - 65] in ("yes", "no", "circle", "rectangle", "triangle",
                                                                   "red", "green", "blue", "black", "gray",
                                                                   "teal", "brown", "yellow")


# ------------------------------------------------------------------------------------------------ chat data

def test_llava_turns_and_alpaca(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "a.jpg")
    llava = [
        {"id": "x", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "y", "image": "missing.jpg", "conversations": [
            {"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]},
        {"id": "z", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "w"},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    problems = Problems()
    recs = load_llava(tmp_path / "llava.json", imgs, problems)
    assert [r.id for r in recs] == ["x#0", "x#1", "z#0"]
    assert recs[0].prompt == "Instruction: What is it?\nResponse:" and recs[0].answer == " A square."
    assert recs[1].prompt == "Instruction: Color?\nResponse:" and recs[1].image == str(imgs / "a.jpg")
    assert recs[2].image is None
    assert {b.id for b in problems.bad} == {"y", "w"}

    alpaca = [{"instruction": "Add.", "input": "1+1", "output": "2"}, {"instruction": "Say hi.", "output": "hi"},
              {"input": "no instruction"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    problems = Problems()
    recs_a = load_alpaca(tmp_path / "alpaca.json", problems)
    assert recs_a[0].prompt == "Instruction: Add.\n1+1\nResponse:" and recs_a[0].answer == " 2"
    assert recs_a[1].prompt == "Instruction: Say hi.\nResponse:" and recs_a[1].image is None
    assert [b.id for b in problems.bad] == ["2"]

    # one batch mixing text-only and image samples: each row routed by its own modality token
    tok = ByteTokenizer()
    ds = LavinDataset(recs + recs_a, tok, 6, 32, 256, Problems())
    batch = collate_items([ds[i] for i in range(len(ds))], tok.pad_id)
    assert batch.modality.tolist() == [1, 1, 0, 0, 0]
    assert batch.images is not None and batch.images.shape == (5, 3, 32, 32)
    assert batch.images[2:].abs().sum() == 0  # text rows: zero placeholder images
    assert ds.counts()["with_image"] == 2 and ds.counts()["text_only"] == 3


def test_truncation_keeps_answer_or_reports(tmp_path: Path) -> None:
    from lavin_edge.data.records import Record

    tok = ByteTokenizer()
    recs = [Record("long-answer", "Instruction: q\nResponse:", " " + "a" * 100),
            Record("long-prompt", "Instruction: " + "q" * 100 + "\nResponse:", " a")]
    problems = Problems()
    ds = LavinDataset(recs, tok, 6, 32, 64, problems)
    assert len(ds) == 1 and len(ds.examples[0].input_ids) == 63
    assert [b.id for b in problems.bad] == ["long-prompt"]


# ------------------------------------------------------------------------------------------------ easy-vqa

def test_easy_vqa_open_and_multiple_choice() -> None:
    problems = Problems(strict=True)
    open_recs = load_easy_vqa("test", problems, "open", limit=50, seed=3)
    assert len(open_recs) == 50 and all(Path(r.image).is_file() for r in open_recs)  # type: ignore[arg-type]
    assert open_recs[0].prompt.startswith("Instruction: ") and open_recs[0].answer == " " + open_recs[0].meta[
        "answer"]
    mc = load_easy_vqa("test", problems, "mc", limit=50, seed=3)
    assert [r.id for r in mc] == [r.id for r in open_recs]  # same seeded subset
    again = load_easy_vqa("test", problems, "mc", limit=50, seed=3)
    assert [r.prompt for r in mc] == [r.prompt for r in again]  # option order is stable
    for r in mc:
        letter = r.meta["label"]
        assert r.meta["choices"][ord(letter) - 65] == r.meta["answer"]
        assert r.answer == f" The answer is {letter}."
        assert "Options: (A) " in r.prompt
    assert len({r.meta["label"] for r in mc}) > 1  # shuffled: the letter is not constant
    full = load_easy_vqa("test", Problems(), "open")
    assert len(full) == 9673


def test_easy_vqa_kinds_filter_rebalances() -> None:
    from lavin_edge.data.easyvqa import easy_vqa_kind, load_easy_vqa
    from lavin_edge.data.records import DataError
    from lavin_edge.data.sources import load_source

    colour = load_easy_vqa("train", Problems(), "open", limit=50, kinds=["color"])
    assert len(colour) == 50 and {easy_vqa_kind(r.answer.strip()) for r in colour} == {"color"}
    via_recipe = load_source({"type": "easy-vqa", "kinds": ["shape"], "limit": 20}, Problems())
    assert {easy_vqa_kind(r.answer.strip()) for r in via_recipe} == {"shape"}
    with pytest.raises(DataError, match="kinds"):
        load_easy_vqa("train", Problems(), kinds=["colour"])


def test_easy_vqa_yes_no_subkinds_split_shape_from_colour_questions() -> None:
    from lavin_edge.data.easyvqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, easy_vqa_kinds_of, load_easy_vqa

    assert easy_vqa_kinds_of("is there not a circle?", "no") == {"yes/no", "yes/no:shape"}
    assert easy_vqa_kinds_of("is there a red shape in the image?", "yes") == {"yes/no", "yes/no:color"}
    assert easy_vqa_kinds_of("what color is the triangle?", "red") == {"color"}

    def words(r) -> set[str]:  # noqa: ANN001
        return set(r.prompt.lower().replace("?", " ").split())

    shape_q = load_easy_vqa("train", Problems(), "open", limit=40, kinds=["yes/no:shape"])
    colour_q = load_easy_vqa("train", Problems(), "open", limit=40, kinds=["yes/no:color"])
    assert len(shape_q) == len(colour_q) == 40
    assert all(r.answer.strip() in ("yes", "no") for r in shape_q + colour_q)
    assert all(words(r) & set(EASY_VQA_SHAPES) and not words(r) & set(EASY_VQA_COLORS) for r in shape_q)
    assert all(words(r) & set(EASY_VQA_COLORS) and not words(r) & set(EASY_VQA_SHAPES) for r in colour_q)
    both = load_easy_vqa("train", Problems(), "open", kinds=["yes/no:shape", "yes/no:color"])
    assert len(both) == len(load_easy_vqa("train", Problems(), "open", kinds=["yes/no"]))


def test_easy_vqa_balance_leaves_the_question_text_no_prior() -> None:
    """``balance``: every question text keeps each of its answers equally often, so a text-only guess (the
    majority answer of the same text) is at chance, while unbalanced easy-vqa gives it ~80% on yes/no."""
    from collections import Counter

    from lavin_edge.data.easyvqa import balance_answers, load_easy_vqa
    from lavin_edge.data.sources import load_source

    def text_prior(recs: list) -> float:
        by_text: dict[str, Counter] = {}
        for r in recs:
            by_text.setdefault(r.prompt, Counter())[r.answer] += 1
        return sum(c.most_common(1)[0][1] for c in by_text.values()) / len(recs)

    plain = load_easy_vqa("train", Problems(), "open", kinds=["yes/no"])
    balanced = load_easy_vqa("train", Problems(), "open", kinds=["yes/no"], balance=True)
    assert text_prior(plain) > 0.75
    assert text_prior(balanced) == 0.5
    assert Counter(r.answer for r in balanced) == {" yes": len(balanced) // 2, " no": len(balanced) // 2}
    # through a recipe table, with a limit; a text seen with one answer only is dropped
    assert len(load_source({"type": "easy-vqa", "kinds": ["yes/no"], "balance": True, "limit": 40}, Problems())) == 40
    assert balance_answers([0, 1, 2], ["a?", "a?", "b?"], ["yes", "no", "yes"], 0) == [0, 1]


def test_easy_vqa_explained_yes_no_targets_agree_with_their_answers() -> None:
    """``explain``: yes/no targets state the image's colour and shape, whether the asked colour/shape is there,
    then the answer; every clause is checked against the question and its gold answer for every record (the
    facts come from other questions)."""
    import re

    from lavin_edge.data.easyvqa import easy_vqa_asked, easy_vqa_negated, load_easy_vqa

    recs = load_easy_vqa("train", Problems(), "open", kinds=["yes/no"], explain=True)
    assert len(recs) > 20000  # most of the 28k yes/no questions: images with known colour and shape
    pat = re.compile(r"^ It is a (\w+) (\w+), so there is (a|no) (\w+(?: shape)?): (yes|no)\.$")
    seen = set()
    for r in recs:
        m = pat.match(r.answer)
        assert m, r.answer
        colour, shape, there, named, answer = m.groups()
        assert answer == r.meta["answer"]
        question = r.prompt.split("\n")[0].removeprefix("Instruction: ")
        word = easy_vqa_asked(question)[0]
        assert named in (word, f"{word} shape")
        present = word in (colour, shape)
        assert there == ("a" if present else "no")
        negated = easy_vqa_negated(question)
        assert answer == ("no" if present == negated else "yes"), (r.prompt, r.answer)
        seen.add((there, negated))
    assert len(seen) == 4  # the colour/shape present and absent, plain and negated questions
    assert easy_vqa_asked("is no red shape present?") == ("red", "red shape")
    assert easy_vqa_negated("is no red shape present?") and not easy_vqa_negated("is a circle present?")
    with pytest.raises(DataError, match="names no colour or shape"):
        easy_vqa_asked("is there a cat?")
    others = load_easy_vqa("train", Problems(), "open", limit=30, kinds=["color", "shape"], explain=True)
    assert all(r.answer == " " + r.meta["answer"] for r in others)  # open answers stay one word
    with pytest.raises(DataError, match="explain"):
        load_easy_vqa("train", Problems(), "mc", limit=5, explain=True)
