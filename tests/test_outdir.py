"""Output directories appear whole or not at all (lavin_edge.io.outdir)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    with atomic_dir(out) as d:
        (d / "keep").write_text("1")
    with pytest.raises(OutputDirError, match="--overwrite"):
        check_output(out)
    with atomic_dir(out, overwrite=True) as d:  # an earlier output of the same kind: replaced
        (d / "new").write_text("2")
    assert not (out / "keep").exists() and (out / "new").read_text() == "2"
    check_output(tmp_path / "empty-ok")  # a missing output is fine
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")  # and so is an empty one


@pytest.mark.parametrize("kind", ["user files", "another kind", "no marker"])
def test_overwrite_never_deletes_what_is_not_an_earlier_output(tmp_path, kind):
    """--overwrite replaces an earlier output of the same kind or an empty dir; a dir of the user's own files,
    a training run, or a dir without the completeness marker is refused and left as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "userfile.txt").write_text("mine")
    if kind == "another kind":
        (out / COMPLETE_MARKER).write_text(json.dumps({"complete": True, "format": "lavin-edge-run", "files": {}}))
    if kind == "no marker":
        (out / "config.json").write_text("{}")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputDirError, match="replaces only") as e:
        check_output(out, overwrite=True, what="merge output")
    assert "nothing was deleted" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(OutputDirError, match="replaces only"), atomic_dir(out, overwrite=True) as d:
        (d / "new").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == before and (out / "userfile.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_run_leaves_a_temp_dir_the_next_run_removes(tmp_path):
    """kill -9 inside atomic_dir (a process that kills itself while writing) leaves a hidden sibling; the next
    run into the same output removes it and says so, and the output is the new one."""
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "a.bin").write_bytes(b"old")
    code = ("import os, signal, sys; from lavin_edge.io.outdir import atomic_dir\n"
            "with atomic_dir(sys.argv[1], overwrite=True) as d:\n"
            "    (d / 'a.bin').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=Path(__file__).parents[1])
    assert res.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p.name != "model"]
    assert len(left) == 1 and left[0].startswith(".model.tmp-")
    assert (out / "a.bin").read_bytes() == b"old"  # the old output intact
    with pytest.warns(UserWarning, match="removed .*interrupted run"), atomic_dir(out, overwrite=True) as d:
        (d / "a.bin").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "a.bin").read_bytes() == b"new"


def test_stale_siblings_rules(tmp_path):
    """Dead process id: removed; live one (this process's parent, another host's): kept; an older release's
    name: removed once untouched for an hour; a replaced output renamed aside by a killed run goes back."""
    from lavin_edge.io.outdir import LEGACY_STALE_S, StaleOutputRemoved, _host_tag, remove_stale_siblings

    out = tmp_path / "q"
    host = _host_tag()
    dead = tmp_path / f".q.tmp-{_dead_pid()}-{host}-abc"
    live = tmp_path / f".q.tmp-{os.getppid()}-{host}-abc"
    other_host = tmp_path / f".q.tmp-{_dead_pid()}-{'0' * 8 if host != '0' * 8 else '1' * 8}-abc"
    old_legacy, new_legacy = tmp_path / ".q.tmp-k2j4h5_x", tmp_path / ".q.tmp-zz9y8x7w"
    unrelated = tmp_path / ".qq.tmp-1-00000000-abc"
    for d in (dead, live, other_host, old_legacy, new_legacy, unrelated):
        d.mkdir()
        (d / "t.bin").write_bytes(b"1")
    hour_ago = time.time() - LEGACY_STALE_S - 60
    for p in (old_legacy / "t.bin", old_legacy):
        os.utime(p, (hour_ago, hour_ago))
    with pytest.warns(StaleOutputRemoved) as got:
        done = remove_stale_siblings(out)
    assert len(done) == len(got) == 2 and all("removed" in m for m in done)
    assert not dead.exists() and not old_legacy.exists()
    assert live.exists() and other_host.exists() and new_legacy.exists() and unrelated.exists()
    # Killed between its two renames: the previous output is aside, `out` is absent.
    aside = tmp_path / f".q.old-{_dead_pid()}-{host}-abc"
    with atomic_dir(tmp_path / "build") as d:
        (d / "w.bin").write_bytes(b"prev")
    os.rename(tmp_path / "build", aside)
    with pytest.warns(StaleOutputRemoved, match="restored"):
        check_output(out, overwrite=True)
    assert (out / "w.bin").read_bytes() == b"prev" and is_complete(out) and not aside.exists()


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
