"""``text_loss = "kl"``: text-only samples are scored against the frozen base's own predictions at every
position, image samples keep their answer CE; the prose source; the recipe rule that ties them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lavin_edge.config import AdapterConfig
from lavin_edge.data.records import Problems
from lavin_edge.data.sources import load_prose
from lavin_edge.model.lavin import IGNORE_INDEX, Batch
from lavin_edge.training.base import BaseSpec, build_base
from lavin_edge.training.config import TrainConfig
from lavin_edge.training.loop import train
from lavin_edge.training.losses import distill_loss_sum, scored_positions, token_loss_sum
from lavin_edge.training.recipe import RecipeError


def _batch() -> Batch:
    ig = IGNORE_INDEX
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 0], [1, 5, 6, 7, 8, 0, 0], [1, 5, 6, 7, 8, 9, 2]])
    labels = torch.tensor([[ig, ig, ig, 7, 8, 9, ig], [ig, ig, ig, ig, 8, ig, ig], [ig, ig, ig, ig, 8, 9, 2]])
    return Batch(ids, labels, torch.tensor([-1, -1, 1]), None)


def test_scored_positions_cover_text_rows_up_to_their_last_answer_token() -> None:
    b = _batch()
    ce = scored_positions(b, False)
    assert ce.tolist() == (b.labels[:, 1:] != IGNORE_INDEX).tolist()
    kl = scored_positions(b, True)
    # Text rows: every position up to the one predicting their last answer token; padding never.
    assert kl[0].tolist() == [True] * 5 + [False]
    assert kl[1].tolist() == [True] * 4 + [False] * 2
    assert kl[2].tolist() == ce[2].tolist()  # the image row keeps its answer positions


@pytest.fixture(scope="module")
def tiny() -> tuple:
    torch.manual_seed(0)
    model, tok, _ = build_base(BaseSpec("preset:tiny", "preset:tiny", None, 0), AdapterConfig(dropout=0.0))
    return model.eval(), tok


def _text_batch(tok, n: int = 3) -> Batch:  # noqa: ANN001
    rows = [[tok.bos_id] + tok.encode(f"Image: N/A a short text number {i} about the sea") for i in range(n)]
    t = max(map(len, rows))
    ids = torch.full((n, t), tok.pad_id)
    labels = torch.full((n, t), IGNORE_INDEX)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, len(r) - 3:len(r)] = torch.tensor(r[-3:])
    return Batch(ids, labels, torch.full((n,), -1), None)


def test_kl_is_zero_for_the_identity_adapters_and_grows_when_they_move(tiny) -> None:  # noqa: ANN001
    model, tok = tiny
    b = _text_batch(tok)
    # Fresh adapters are the identity: the model is its base, so the KL to the base vanishes.
    with torch.no_grad():
        kl, n = distill_loss_sum(model(b), b, model)
    assert n == int(scored_positions(b, True).sum()) > int((b.labels != IGNORE_INDEX).sum())
    assert abs(float(kl)) < 1e-4 * n
    # base_logits is the base whatever the adapters hold.
    base = model.base_logits(b.input_ids)
    with torch.no_grad():
        for blk in model.llm.layers:
            blk.adapter.up_b.bias.normal_(0, 0.5)
        try:
            moved, _ = distill_loss_sum(model(b), b, model)  # inside no_grad
            assert torch.allclose(model.base_logits(b.input_ids), base, atol=1e-5)
        finally:
            for blk in model.llm.layers:
                blk.adapter.up_b.bias.zero_()
    assert float(moved) > 100 * max(abs(float(kl)), 1e-6)


def test_image_rows_keep_their_answer_ce(tiny) -> None:  # noqa: ANN001
    model, tok = tiny
    b = _text_batch(tok)
    size = model.cfg.vision.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    mixed = Batch(b.input_ids, b.labels, torch.tensor([-1, 1, 1]), images)
    logits = model(mixed)
    total, n = distill_loss_sum(logits, mixed, model)
    ce, n_ce = token_loss_sum(logits[1:], b.labels[1:])
    kl, n_kl = distill_loss_sum(logits[:1], Batch(b.input_ids[:1], b.labels[:1], mixed.image_pos[:1], None), model)
    assert n == n_ce + n_kl and n == int(scored_positions(mixed, True).sum())
    assert torch.allclose(total, ce + kl)


def test_prose_source_reads_only_the_calibration_half() -> None:
    from lavin_edge.data.prose import stdlib_paragraphs

    recs = load_prose(Problems(strict=True))
    held = set(stdlib_paragraphs("heldout"))
    assert len(recs) >= 100 and not held & {r.answer for r in recs}
    assert all(r.image is None and r.prompt == "" for r in recs)
    assert len(load_prose(Problems(strict=True), limit=7, seed=1)) == 7


def test_prose_needs_the_kl_text_loss(tmp_path: Path) -> None:
    d = {"data": [{"type": "prose", "limit": 4}], "out_dir": str(tmp_path / "r")}
    with pytest.raises(RecipeError, match="text_loss"):
        TrainConfig.from_dict(d)
    with pytest.raises(RecipeError, match="text_loss"):
        TrainConfig.from_dict(d | {"text_loss": "mse"})
    TrainConfig.from_dict(d | {"text_loss": "kl"})


def test_a_kl_run_pulls_moved_text_adapters_back_to_the_base(tmp_path: Path, tiny) -> None:  # noqa: ANN001
    """Stage 1 (CE on text answers) moves the text route; stage 2 (KL, from stage 1) brings it back to the base."""
    _, tok = tiny
    common = dict(max_seq_len=96, batch_size=4, epochs=3, warmup_epochs=0.0, lr=1e-2, threads=1, progress=False,
                  dropout=0.0)
    data = [{"type": "self-distill", "split": "train", "limit": 8}]
    moved = train(TrainConfig(data=data, out_dir=str(tmp_path / "ce"), **common))  # type: ignore[arg-type]
    back = train(TrainConfig(data=data + [{"type": "prose", "limit": 8}], out_dir=str(tmp_path / "kl"),
                             text_loss="kl", init_adapters=str(tmp_path / "ce"), **common))  # type: ignore[arg-type]
    assert moved is not None and back is not None and back.steps == 12
    b = _text_batch(tok)
    with torch.no_grad():
        kl = [float(distill_loss_sum(r.model.eval()(b), b, r.model)[0]) for r in (moved, back)]
    assert kl[0] > 0.05 and kl[1] < kl[0] / 2, kl
