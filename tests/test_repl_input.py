"""The REPL's input (issue 16): a closed stdin (``<&-``) and a pipe end cleanly with exit 0; on a terminal, lines
go through readline, so the up arrow recalls the previous question instead of typing an escape code into it."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import trained_like

from lavin_edge.merge import merge_lavin, save_merged

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TERM": "xterm"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    merged, table = merge_lavin(trained_like(1))
    return save_merged(merged, tmp_path_factory.mktemp("m"), None, {}, table)


def _chat_cmd(model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lavin_edge.cli", "chat", "--model", str(model_dir), "--backend", "torch",
            "--max-new-tokens", "2", "--json", "--threads", "1"]


def test_closed_stdin_exits_cleanly(model_dir: Path) -> None:
    cmd = " ".join(f"'{c}'" for c in _chat_cmd(model_dir))
    r = subprocess.run(["bash", "-c", f"exec {cmd} <&-"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "stdin is closed" in r.stderr and r.stdout == ""


def test_piped_stdin_reads_lines_until_the_end(model_dir: Path) -> None:
    r = subprocess.run(_chat_cmd(model_dir), input="first\nsecond\n", env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line)["question"] for line in r.stdout.splitlines()] == ["first", "second"]
    assert ">>>" not in r.stderr  # no prompts when not interactive


def _read_until(fd: int, buf: bytearray, needle: bytes, start: int, timeout: float) -> int:
    """Read the terminal into ``buf`` until ``needle`` appears at or after ``start``; its position, or -1."""
    end = time.monotonic() + timeout
    while buf.find(needle, start) < 0 and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf.find(needle, start)


def test_terminal_up_arrow_recalls_the_previous_question(model_dir: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(_chat_cmd(model_dir), stdin=slave, stdout=slave, stderr=slave, env=ENV,
                            close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        at = _read_until(master, buf, b">>> ", 0, 120)
        assert at >= 0, buf.decode(errors="replace")
        os.write(master, b"hello there\r")
        at = _read_until(master, buf, b'"question"', at, 120)
        at = _read_until(master, buf, b">>> ", at, 60)
        assert at >= 0, buf.decode(errors="replace")
        os.write(master, b"\x1b[A\r")  # up arrow, Enter: the previous question again
        at = _read_until(master, buf, b'"question"', at, 120)
        at = _read_until(master, buf, b">>> ", max(at, 0), 60)
        assert at >= 0, buf.decode(errors="replace")
        os.write(master, b"/exit\r")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = buf.decode(errors="replace")
    questions = [json.loads(line[line.index("{"):])["question"] for line in text.splitlines()
                 if '"question"' in line]
    assert questions == ["hello there", "hello there"], text
    assert proc.returncode == 0


def test_animated_image_warns_on_stderr_in_chat(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    import warnings

    from click.testing import CliRunner
    from PIL import Image

    from lavin_edge.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # chat replaces it; restored after
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    res = CliRunner().invoke(main, ["chat", "--model", str(model_dir), "--image", str(gif), "--prompt", "What?",
                                    "--backend", "torch", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr and "animated image (3 frames): using its first frame" in res.stderr
    assert "animated" not in res.stdout  # stdout stays the answer only
