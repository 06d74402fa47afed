"""`serve`'s limits in the numbers the user set (issue 26, rows 2, 7, 8): a port in use is one line before the
model loads, the 503 of a full queue names --max-queue, and a decompression bomb's 413 names
--max-image-pixels, not Pillow's own limit."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_serve_batch import quantized_tiny_dir  # noqa: E402

from lavin_edge.cli import main  # noqa: E402
from lavin_edge.runtime import Engine  # noqa: E402
from lavin_edge.serve.images import ImageLimits  # noqa: E402
from lavin_edge.serve.scheduler import Job  # noqa: E402
from lavin_edge.serve.server import ServeOptions, build_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized_tiny_dir(tmp_path_factory.mktemp("limits"))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost nothing (Pillow reads the size from IHDR)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def _image_body(raw: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


@pytest.mark.parametrize("side", [5000, 20000])  # under, then over twice Pillow's own limit (178,956,970)
def test_image_bomb_413_names_the_servers_limit(qdir: Path, side: int) -> None:
    app, _ = build_app(Engine.load(qdir), "tiny", ServeOptions(limits=ImageLimits(max_pixels=1_000_000)))
    r = TestClient(app).post("/v1/chat/completions", json=_image_body(_png_header(side, side)))
    assert r.status_code == 413, r.text
    msg = r.json()["error"]["message"]
    assert "limit of 1000000 pixels (--max-image-pixels)" in msg and f"{side * side} pixels" in msg, msg
    assert "178956970" not in msg and "89478485" not in msg


def test_server_limit_above_pillows_own(qdir: Path) -> None:
    """--max-image-pixels above Pillow's default: an image between the two is not refused by Pillow."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    try:
        app, _ = build_app(Engine.load(qdir), "tiny", ServeOptions(limits=ImageLimits(max_pixels=400_000_000)))
        r = TestClient(app).post("/v1/chat/completions", json=_image_body(_png_header(15000, 15000)))
        # 225M pixels: over twice Pillow's default, under the server's: decoded (and found truncated), not a 413.
        assert r.status_code == 400 and "truncated or corrupt" in r.json()["error"]["message"], r.text
    finally:
        Image.MAX_IMAGE_PIXELS = before


def test_queue_full_503_names_max_queue(qdir: Path) -> None:
    app, scheduler = build_app(Engine.load(qdir), "tiny", ServeOptions(slots=2, max_queue=3))
    # The scheduler is not started (no lifespan): submitted jobs wait, as behind busy slots.
    n = 0
    while True:
        try:
            scheduler.submit(Job(None, lambda ev: None))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - QueueFull
            break
        n += 1
    assert n > 3  # the free slots' share waits too: the queue's momentary length is not the user's number
    r = TestClient(app).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    msg = r.json()["error"]["message"]
    assert msg == "server busy: all 2 slots taken and 3 requests waiting (--max-queue 3); retry later", msg
    assert str(n) not in re.findall(r"\d+", msg)


def test_port_in_use_is_one_line_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import lavin_edge.serve.server as server

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(server, "load_app", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(main, ["serve", "--model", "/nonexistent", "--port", str(port)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [f"error: port {port} is in use (another server on 127.0.0.1:{port}?); "
                                               "choose another with --port"]


def test_serve_answers_on_the_socket_it_bound(qdir: Path) -> None:
    """The real command in a child on --port 0: the socket bound before the load is the one uvicorn serves."""
    from lavin_edge.bench.child import module_command

    # The package these tests imported (installed, with its extension), not the checkout's source tree.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(module_command("lavin_edge.cli", "serve", "--model", str(qdir), "--port", "0",
                                           "--threads", "1", "--log-level", "warning"),
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"serving q on http://127\.0\.0\.1:(\d+)/", line)
        assert m and m.group(1), line
        url = f"http://127.0.0.1:{m.group(1)}"
        deadline = time.time() + 60
        while True:
            try:
                h = httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and json.loads(r.text)["usage"]["completion_tokens"] <= 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
