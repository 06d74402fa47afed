"""Output directories appear whole or not at all (lavin_edge.io.outdir)."""

from __future__ import annotations

import os

import pytest

from lavin_edge.io.outdir import (
    COMPLETE_MARKER,
    OutputDirError,
    atomic_dir,
    check_output,
    is_complete,
    require_complete,
)


def test_published_only_when_complete(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "a.bin").write_bytes(b"x" * 10)
        assert not out.exists()
    assert (out / COMPLETE_MARKER).is_file() and is_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary sibling left


def test_error_keeps_the_previous_output(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as d:
        (d / "a.bin").write_bytes(b"new")
        raise RuntimeError("killed")
    assert (out / "a.bin").read_bytes() == b"old" and is_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep").write_text("1")
    with pytest.raises(OutputDirError, match="--overwrite"):
        check_output(out)
    with atomic_dir(out, overwrite=True) as d:
        (d / "new").write_text("2")
    assert not (out / "keep").exists() and (out / "new").read_text() == "2"
    check_output(tmp_path / "empty-ok")  # a missing output is fine
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")  # and so is an empty one


def test_output_overlapping_an_input_is_refused(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for out in (src, src / "sub", tmp_path):
        with pytest.raises(OutputDirError, match="input"):
            check_output(out, overwrite=True, inputs=[src])


def test_incomplete_or_damaged_dirs_are_refused(tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(OutputDirError, match="incomplete"):
        require_complete(d)
    out = tmp_path / "full"
    with atomic_dir(out) as t:
        (t / "w.bin").write_bytes(b"x" * 100)
    os.truncate(out / "w.bin", 50)
    with pytest.raises(OutputDirError, match="50 bytes, 100"):
        require_complete(out)
    (out / "w.bin").unlink()
    with pytest.raises(OutputDirError, match="missing"):
        require_complete(out)
