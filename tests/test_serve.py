"""`lavin-edge serve` on a tiny quantized model built in code, on 127.0.0.1: the official openai client (plain and
streaming), greedy answers equal to the engine's own loop and the same alone or batched, the chat prompt format,
and every bad input or limit answered with OpenAI's error shape while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402
from test_serve_batch import quantized_tiny_dir  # noqa: E402

from lavin_edge.prompt import conversation_ids  # noqa: E402
from lavin_edge.runtime import Engine  # noqa: E402
from lavin_edge.runtime.sampling import GenerationConfig  # noqa: E402
from lavin_edge.serve.images import ImageLimits  # noqa: E402
from lavin_edge.serve.server import ServeOptions, build_app  # noqa: E402

KEY = "test-key"

# One thread: on 2 shared cores, OpenMP barriers of a second thread stall every op (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.scheduler = None

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def png_data_url(color: tuple[int, int, int] = (255, 0, 0), size: int = 64) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized_tiny_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(d / "blue.png")
    (d.parent / "secret.png").write_bytes((d / "blue.png").read_bytes())
    return d


@pytest.fixture(scope="module", params=["inline", "thread"])
def server(qdir: Path, files_dir: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """Every server test runs with prefill on the decode loop and on a thread of its own."""
    limits = ImageLimits(max_bytes=20_000, max_pixels=300 * 300, allow_files=files_dir)
    app, _ = build_app(Engine.load(qdir), "tiny", ServeOptions(slots=3, max_queue=8, limits=limits,
                                                               prefill=request.param))
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One slot, no queue, an API key, a long context: for 401, 503 and disconnects."""
    qdir = quantized_tiny_dir(tmp_path_factory.mktemp("long"), max_seq_len=4096)
    app, scheduler = build_app(Engine.load(qdir), "tiny", ServeOptions(slots=1, max_queue=0, api_key=KEY,
                                                                       prefill="thread"))
    with LiveServer(app) as s:
        s.scheduler = scheduler
        yield s


def _client(url: str, key: str = "unused"):  # noqa: ANN202
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _greedy_reference(qdir: Path, question: str, n: int) -> str:
    eng = Engine.load(qdir)
    ids, _ = conversation_ids(eng.tokenizer, [], question)
    return eng.generate(ids, GenerationConfig(max_new_tokens=n), stop_ids=set()).text


def test_openai_client_plain_and_streaming(server: LiveServer, qdir: Path) -> None:
    client = _client(server.url)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = [{"role": "user", "content": "What shape is it?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    eng = Engine.load(qdir)
    assert r.usage.prompt_tokens == len(conversation_ids(eng.tokenizer, [], "What shape is it?")[0])
    assert text == _greedy_reference(qdir, "What shape is it?", 12)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_raw_sse_ends_with_done(server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_multi_turn_image_and_stop(server: LiveServer, qdir: Path) -> None:
    """An image in content parts and a history: the prompt is chat's format (prompt_tokens counts it); stop
    strings end the answer without including them; the same request gives the same greedy answer."""
    eng = Engine.load(qdir)
    url = png_data_url()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Colour?"},
                                         {"type": "image_url", "image_url": {"url": url}}]},
            {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Sure?"}]
    body = {"messages": msgs, "max_tokens": 8, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    ids, _ = conversation_ids(eng.tokenizer, [("Colour?", eng.tokenizer.encode("Red."))], "Sure?", eng.n_visual)
    assert r["usage"]["prompt_tokens"] == len(ids)
    answer = r["choices"][0]["message"]["content"]
    r2 = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r2["choices"][0]["message"]["content"] == answer
    if len(answer) > 2:
        stop = answer[1:3]
        r3 = httpx.post(server.url + "/v1/chat/completions", json={**body, "stop": [stop]}, timeout=60).json()
        assert r3["choices"][0]["finish_reason"] == "stop"
        assert r3["choices"][0]["message"]["content"] == answer[:answer.index(stop)]


def test_batched_requests_answer_as_alone(server: LiveServer) -> None:
    """Five concurrent greedy requests (text and image) on 3 slots: each answer equals the one it got alone."""
    def ask(i: int) -> str:
        content: list = [{"type": "text", "text": f"question number {i}?"}]
        if i % 2:
            content.append({"type": "image_url", "image_url": {"url": png_data_url((40 * i, 0, 0))}})
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 10 + i, "temperature": 0}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    alone = [ask(i) for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        together = list(pool.map(ask, range(5)))
    assert together == alone


def test_seeded_sampling_is_reproducible(server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 1.0,
            "top_p": 0.9, "seed": 7}
    a, b = (httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json() for _ in range(2))
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def _err(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


def _image_request(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                       {"type": "image_url", "image_url": {"url": url}}]}]}


@pytest.mark.parametrize("body,words", [
    ({"messages": "hi"}, ["messages"]),
    ({"messages": []}, ["messages"]),
    ({"messages": [{"role": "robot", "content": "hi"}]}, ["role", "robot"]),
    ({"messages": [{"role": "user", "content": 5}]}, ["content"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, ["temperature"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, ["top_p"]),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, ["stream"]),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, ["stop"]),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, ["last message"]),
    (_image_request("data:image/png;base64,@@@"), ["base64"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()}}]}]}, ["not an image"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/cat.png"}}]}]}, ["data:", "fetches nothing"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://../secret.png"}}]}]},
     ["outside"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     ["outside"]),
])
def test_bad_requests_are_400(server: LiveServer, body: dict, words: list[str]) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    _err(r, 400, *words)


def test_malformed_json_too_large_and_context(server: LiveServer) -> None:
    url = server.url + "/v1/chat/completions"
    _err(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    big = png_data_url(size=200)  # under both limits: 200x200 pixels of one colour compress to < 1 KB
    noise = Image.frombytes("RGB", (120, 120), torch.randint(0, 256, (120 * 120 * 3,), dtype=torch.uint8).numpy()
                            .tobytes())
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    heavy = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()  # ~43 KB > 20 KB
    def part(u: str) -> dict:
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                           {"type": "image_url", "image_url": {"url": u}}]}]}

    _err(httpx.post(url, json=part(heavy)), 413, "bytes")
    _err(httpx.post(url, json=part(png_data_url(size=400))), 413, "pixels")
    assert httpx.post(url, json={**part(big), "max_tokens": 2}, timeout=60).status_code == 200
    ok = httpx.post(url, json={**part("file://blue.png"), "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text
    err = _err(httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 400}]}), 400, "context")
    assert err["code"] == "context_length_exceeded" and "256" in err["message"] and "tokens" in err["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still serving


def test_api_key_queue_full_and_disconnect(keyed: LiveServer) -> None:
    url = keyed.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "temperature": 0, "stream": True}
    _err(httpx.post(url, json=body), 401, "API key")
    _err(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401, "API key")
    _err(httpx.get(keyed.url + "/v1/models"), 401)
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as c, c.stream("POST", url, json=body, headers=auth) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        assert httpx.get(keyed.url + "/health").json()["active"] == 1
        busy = httpx.post(url, json={**body, "stream": False}, headers=auth)
        _err(busy, 503, "busy")
        assert busy.headers["Retry-After"] == "1"
    # The client hung up mid-stream with 2000 tokens asked: the slot frees at the next token it cannot send,
    # long before the 2000 steps the request would have run.
    deadline = time.time() + 60
    while httpx.get(keyed.url + "/health").json()["active"] and time.time() < deadline:
        time.sleep(0.01)
    assert httpx.get(keyed.url + "/health").json()["active"] == 0
    assert keyed.scheduler.steps < 1000
    r = httpx.post(url, json={**body, "stream": False, "max_tokens": 3}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    client = _client(keyed.url, KEY)
    assert client.chat.completions.create(model="x", messages=body["messages"], max_tokens=2).usage.total_tokens


def test_page_and_unknown_routes(server: LiveServer) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "app.js" in page.text and "http" not in page.text.split("<body>")[1]
    assert "v1/chat/completions" in httpx.get(server.url + "/app.js").text
    _err(httpx.get(server.url + "/v1/nothing"), 404)
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_serve_help_lists_every_option() -> None:
    from click.testing import CliRunner

    from lavin_edge.cli import main

    out = CliRunner().invoke(main, ["serve", "--help"]).output
    for opt in ("--model", "--host", "--port", "--device", "--slots", "--api-key", "--max-queue", "--allow-files",
                "--max-image-bytes", "--max-image-pixels", "--max-context"):
        assert opt in out
    assert "127.0.0.1" in out


def test_json_shape_of_health(server: LiveServer) -> None:
    h = httpx.get(server.url + "/health").json()
    assert h["slots"] == 3 and json.dumps(h)


def test_prefill_placement_rule() -> None:
    from lavin_edge.serve.server import prefill_on_thread

    assert prefill_on_thread("auto", threads=1, cores=2) and not prefill_on_thread("auto", threads=2, cores=2)
    assert prefill_on_thread("thread", threads=8, cores=2) and not prefill_on_thread("inline", threads=1, cores=64)
    with pytest.raises(ValueError, match="prefill"):
        prefill_on_thread("both")


def test_bench_serve_sampled_requests(qdir: Path) -> None:
    """`bench serve` end to end (server subprocess, streaming clients) on the tiny model with sampled requests
    (--temperature, --top-p): every request completes with its token count and the report names the settings."""
    from lavin_edge.bench.serve import run_serve_bench

    out = run_serve_bench(model=str(qdir), clients=(1, 2), requests=2, new_tokens=5, threads=1, print_results=False,
                          with_llamacpp=False, temperature=1.0, top_p=0.9)
    assert (out["temperature"], out["top_p"]) == (1.0, 0.9)
    for row in out["rows"]:
        assert row["failed"] == 0 and row["completed"] == row["sent"] == 2 * row["clients"], row
        assert row["aggregate_tok_s"] > 0


def test_bench_serve_images_without_a_checkout(tmp_path: Path) -> None:
    """An installed package has no examples/ beside it: the bench then sends easy-vqa's test images."""
    from lavin_edge.bench.serve import _images

    urls = _images(tmp_path)
    assert len(urls) == 4 and all(u.startswith("data:image/png;base64,") for u in urls)
    assert len(set(urls)) == 4
