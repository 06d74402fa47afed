"""The web page at / in a real headless Chromium (the system's package, driven by Selenium), against a server
with an API key: the model label, an example image, ask, the answer streams and equals what the API gives,
a follow-up, a reload keeps the conversation; Stop (the answer stops, the server frees the slot, the next
question works); a new image and "New conversation"; a non-image file, a damaged one and one over the server's
limit; drag-and-drop and paste; a missing and a wrong API key. Every state is saved as a screenshot at a
desktop width and at 400 px (the folder is printed with a failure). Skipped where Chromium or its driver is
not installed (.ci/run installs both)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import LiveServer, png_data_url  # noqa: E402
from test_serve_batch import quantized_tiny_dir  # noqa: E402

from lavin_edge.runtime import Engine  # noqa: E402
from lavin_edge.serve.images import ImageLimits  # noqa: E402
from lavin_edge.serve.server import ServeOptions, build_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium / chromedriver not installed"),
              pytest.mark.usefixtures("one_thread")]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1280,860")
KEY = "page-key"
MAX_IMAGE_BYTES = 60_000
CONTEXT = 16384  # room for an answer that streams long enough to be stopped
SIZES = {"desktop": (1280, 860), "400px": (400, 860)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    qdir = quantized_tiny_dir(tmp_path_factory.mktemp("page"), max_seq_len=CONTEXT)
    opts = ServeOptions(slots=2, api_key=KEY, limits=ImageLimits(max_bytes=MAX_IMAGE_BYTES))
    app, scheduler = build_app(Engine.load(qdir), "tiny", opts)
    with LiveServer(app) as s:
        s.scheduler = scheduler
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lavin-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={profile}")
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Shots:
    """Screenshots of the page's states, each at a desktop width and at 400 px."""

    def __init__(self, drv, folder: Path) -> None:  # noqa: ANN001
        self.drv, self.folder, self.n = drv, folder, 0

    def __call__(self, state: str) -> None:
        self.n += 1
        for tag, (w, h) in SIZES.items():
            self.drv.set_window_size(w, h)
            self.drv.save_screenshot(str(self.folder / f"{self.n:02d}-{state}-{tag}.png"))
        self.drv.set_window_size(*SIZES["desktop"])


@pytest.fixture
def page(server: LiveServer, browser, tmp_path: Path) -> Iterator[object]:  # noqa: ANN001
    """The page, opened fresh (nothing kept from an earlier test); ``page.shot(state)`` saves screenshots."""
    folder = tmp_path / "screens"
    folder.mkdir()
    print(f"screenshots of each state: {folder}")  # shown with a failure (captured at setup)
    drv = browser
    drv.set_window_size(*SIZES["desktop"])
    drv.get(server.url + "/")
    drv.execute_script("localStorage.clear(); sessionStorage.clear();")
    drv.get(server.url + "/")
    drv.shot = Shots(drv, folder)
    drv.wait = WebDriverWait(drv, 60)
    yield drv
    drv.shot("end")


def _by_id(drv, name: str):  # noqa: ANN001, ANN202
    return drv.find_element(By.ID, name)


def _answers(drv) -> list:  # noqa: ANN001
    return drv.find_elements(By.CSS_SELECTOR, "#log .a")


def _enter_key(drv, key: str) -> None:  # noqa: ANN001
    field = _by_id(drv, "api-key")
    field.clear()
    field.send_keys(key)


def _set(drv, name: str, value: str) -> None:  # noqa: ANN001
    field = _by_id(drv, name)
    field.clear()
    field.send_keys(value)


def _ask(drv, question: str, n: int) -> object:  # noqa: ANN001
    """Type ``question``, send it with Enter, wait for the ``n``-th answer to end; that answer's element."""
    box = _by_id(drv, "question")
    box.clear()
    box.send_keys(question, Keys.ENTER)
    drv.wait.until(lambda d: len(_answers(d)) == n and _answers(d)[-1].get_attribute("data-done") == "1")
    return _answers(drv)[-1]


def _api_answer(url: str, messages: list[dict], max_tokens: int = 512) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    return r.json()["choices"][0]["message"]["content"]


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def _no_broken_images(drv) -> bool:  # noqa: ANN001
    return drv.execute_script("return [...document.images].filter(i => i.offsetParent !== null)"
                              ".every(i => i.complete && i.naturalWidth > 0);")


def _png(path: Path, color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    Image.new("RGB", (64, 64), color).save(path)
    return path


def test_example_ask_stream_follow_up_and_reload(server: LiveServer, page) -> None:  # noqa: ANN001
    drv = page
    drv.wait.until(lambda d: "API key" in _by_id(d, "model").text)  # the server needs one
    assert _by_id(drv, "settings").get_attribute("open") is not None  # settings beside the chat at this width
    drv.shot("needs-key")
    _enter_key(drv, KEY)
    drv.wait.until(lambda d: _by_id(d, "model").text == "tiny")  # the label follows the key
    assert _no_broken_images(drv) and len(drv.find_elements(By.CSS_SELECTOR, "#examples img")) == 4
    drv.shot("welcome")

    drv.find_elements(By.CSS_SELECTOR, "#examples button")[0].click()  # the red triangle, shipped in the package
    drv.wait.until(lambda d: (_by_id(d, "preview").get_attribute("src") or "").startswith("data:image/png"))
    url = _by_id(drv, "preview").get_attribute("src")
    shipped = Path(__file__).parents[1] / "lavin_edge/serve/static/examples/easyvqa-red-triangle.png"
    assert base64.b64decode(url.split(",", 1)[1]) == shipped.read_bytes()
    assert _by_id(drv, "question").get_attribute("value") == "What shape is in the image?"
    drv.shot("example-attached")
    _by_id(drv, "send").click()
    drv.wait.until(lambda d: len(_answers(d)) == 1 and _answers(d)[0].get_attribute("data-done") == "1")
    first = [{"role": "user", "content": [{"type": "text", "text": "What shape is in the image?"},
                                          {"type": "image_url", "image_url": {"url": url}}]}]
    want = _api_answer(server.url, first)
    shown = _answers(drv)[0]
    assert "error" not in shown.get_attribute("class") and shown.text == want.strip() and shown.text
    assert _by_id(drv, "attachment").get_attribute("hidden") is not None  # the image moved into the conversation
    assert drv.find_element(By.CSS_SELECTOR, "#log .conv-image img").get_attribute("src") == url
    drv.shot("answered")

    follow = first + [{"role": "assistant", "content": want}, {"role": "user", "content": "Are you sure?"}]
    assert _ask(drv, "Are you sure?", 2).text == _api_answer(server.url, follow).strip()
    drv.shot("follow-up")

    texts = [a.text for a in _answers(drv)]
    drv.refresh()  # the conversation and the key survive a reload
    drv.wait.until(lambda d: _by_id(d, "model").text == "tiny")
    assert [a.text for a in _answers(drv)] == texts
    drv.shot("reloaded")


def test_stop_frees_the_slot_and_the_next_question_works(server: LiveServer, page,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    drv = page
    # The tiny model decodes thousands of tokens a second: without a pause per step the whole answer can end
    # while the test looks at the streaming state, and Stop is gone before it is pressed.
    step = server.scheduler.decoder.step

    def slow_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.005)
        return step(*args, **kwargs)

    monkeypatch.setattr(server.scheduler.decoder, "step", slow_step)
    _enter_key(drv, KEY)
    _set(drv, "max-tokens", str(CONTEXT))
    steps0 = server.scheduler.steps
    box = _by_id(drv, "question")
    box.send_keys("Tell me a long story", Keys.ENTER)
    drv.wait.until(lambda d: _answers(d) and len(_answers(d)[0].text) > 20)  # text arrives while it streams
    answer = _answers(drv)[0]
    assert answer.get_attribute("data-done") is None and _by_id(drv, "stop").is_displayed()
    assert not _by_id(drv, "send").is_displayed()
    assert _health(server.url)["active"] == 1
    drv.shot("streaming")
    _by_id(drv, "stop").click()
    drv.wait.until(lambda d: answer.get_attribute("data-done") == "1")
    assert answer.get_attribute("data-state") == "stopped" and "error" not in answer.get_attribute("class")
    # The server noticed the closed connection: the slot is free and no more steps run for it.
    deadline = time.time() + 20
    while _health(server.url)["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert _health(server.url)["active"] == 0
    steps, text = server.scheduler.steps, answer.text
    time.sleep(0.5)
    assert server.scheduler.steps == steps and steps - steps0 < CONTEXT // 2 and answer.text == text
    assert _by_id(drv, "send").is_displayed() and not _by_id(drv, "stop").is_displayed()
    drv.shot("stopped")

    _set(drv, "max-tokens", "8")
    nxt = _ask(drv, "And now?", 2)
    assert nxt.get_attribute("data-state") == "done" and "error" not in nxt.get_attribute("class")
    history = [{"role": "user", "content": "Tell me a long story"}, {"role": "assistant", "content": text},
               {"role": "user", "content": "And now?"}]
    # the stopped answer is part of the conversation, as far as it came
    assert nxt.text == _api_answer(server.url, history, 8).strip() or not text
    drv.shot("after-stop")


def test_gone_before_the_answer_starts(server: LiveServer) -> None:
    """Stop pressed right after Send: the client is gone before the first chunk; the job never decodes."""
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": png_data_url(size=256)}}]}],
        "max_tokens": CONTEXT, "temperature": 0, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    steps = server.scheduler.steps
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as c:
        c.sendall(head + body)
    time.sleep(1)
    deadline = time.time() + 20
    while _health(server.url)["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert _health(server.url)["active"] == 0 and server.scheduler.steps - steps < 100


def test_new_image_then_new_conversation(server: LiveServer, page, tmp_path: Path) -> None:  # noqa: ANN001
    drv = page
    _enter_key(drv, KEY)
    _set(drv, "max-tokens", "16")
    _by_id(drv, "image").send_keys(str(_png(tmp_path / "red.png")))
    drv.wait.until(lambda d: _by_id(d, "attachment").is_displayed())
    _ask(drv, "What colour is it?", 1)
    _by_id(drv, "image").send_keys(str(_png(tmp_path / "blue.png", (0, 0, 255))))
    drv.wait.until(lambda d: "new conversation" in _by_id(d, "image-note").text)  # said before sending
    drv.shot("second-image-chosen")
    second = _ask(drv, "And this one?", 2)
    assert "error" not in second.get_attribute("class")
    assert len(drv.find_elements(By.CSS_SELECTOR, "#log .divider")) == 1  # the first conversation stays above
    assert len(drv.find_elements(By.CSS_SELECTOR, "#log .conv-image img")) == 2
    drv.shot("second-conversation")

    _by_id(drv, "image").send_keys(str(_png(tmp_path / "green.png", (0, 255, 0))))
    drv.wait.until(lambda d: _by_id(d, "attachment").is_displayed())
    _by_id(drv, "reset").click()
    assert not _answers(drv) and _by_id(drv, "welcome").is_displayed()
    assert not _by_id(drv, "attachment").is_displayed() and not _by_id(drv, "preview").get_attribute("src")
    assert json.loads(drv.execute_script("return localStorage.getItem('lavin-edge.conversation')")) == []
    drv.shot("new-conversation")
    # The next question carries no history and no image, and the system prompt from the settings.
    _set(drv, "system", "Answer in one word.")
    drv.execute_script("const f = window.fetch; window.sent = [];"  # record the page's request bodies
                       "window.fetch = (u, o) => { if (o && o.body) window.sent.push(JSON.parse(o.body));"
                       " return f(u, o); };")
    got = _ask(drv, "Hello", 1).text
    want = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hello"}]
    (body,) = drv.execute_script("return window.sent;")
    assert body["messages"] == want and body["max_tokens"] == 16 and body["stream"] is True
    assert got == _api_answer(server.url, want, 16).strip()


def test_files_that_are_not_images(server: LiveServer, page, tmp_path: Path) -> None:  # noqa: ANN001
    drv = page
    _enter_key(drv, KEY)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    _by_id(drv, "image").send_keys(str(notes))
    drv.wait.until(lambda d: _by_id(d, "notice").is_displayed())
    assert "notes.txt" in _by_id(drv, "notice").text and "not an image" in _by_id(drv, "notice").text
    assert not _by_id(drv, "attachment").is_displayed() and _no_broken_images(drv)
    drv.shot("text-file-refused")

    fake = tmp_path / "photo.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not")
    _by_id(drv, "image").send_keys(str(fake))
    drv.wait.until(lambda d: "photo.png" in _by_id(d, "notice").text)
    assert "could not be opened" in _by_id(drv, "notice").text
    assert not _by_id(drv, "attachment").is_displayed() and _no_broken_images(drv) and not _answers(drv)
    drv.shot("damaged-image-refused")

    big = tmp_path / "noise.png"  # a real image over the server's --max-image-bytes: the server's 413, in words
    Image.fromarray((torch.rand(256, 256, 3) * 255).byte().numpy()).save(big)
    assert big.stat().st_size > MAX_IMAGE_BYTES
    _by_id(drv, "image").send_keys(str(big))
    drv.wait.until(lambda d: _by_id(d, "attachment").is_displayed())
    assert not _by_id(drv, "notice").is_displayed()
    err = _ask(drv, "What is it?", 1)
    assert "error" in err.get_attribute("class") and err.text.startswith("The image is too large")
    assert "max-image-bytes" not in err.text and "image_url" not in err.text  # the API's wording: under Details
    drv.shot("server-refused-image")
    again = _ask(drv, "What is it?", 2)  # the refused image is no longer part of the conversation
    assert "error" not in again.get_attribute("class") and not drv.find_elements(By.CSS_SELECTOR, ".conv-image")


def test_drop_and_paste_an_image(server: LiveServer, page) -> None:  # noqa: ANN001
    drv = page
    _enter_key(drv, KEY)
    make = ("const [url, name, type, event] = arguments; const done = arguments[arguments.length - 1];"
            "fetch(url).then(r => r.blob()).then(b => { const dt = new DataTransfer();"
            " dt.items.add(new File([b], name, {type}));"
            " const e = event === 'paste' ? new ClipboardEvent('paste', {clipboardData: dt, bubbles: true,"
            " cancelable: true}) : new DragEvent(event, {dataTransfer: dt, bubbles: true, cancelable: true});"
            " document.getElementById('question').dispatchEvent(e); done(); });")
    green = png_data_url((0, 200, 0))
    drv.execute_async_script(make, green, "dropped.png", "image/png", "dragenter")
    assert _by_id(drv, "drop").is_displayed()
    drv.shot("dragging")
    drv.execute_async_script(make, green, "dropped.png", "image/png", "drop")
    drv.wait.until(lambda d: _by_id(d, "image-name").text == "dropped.png")
    assert not _by_id(drv, "drop").is_displayed() and _by_id(drv, "preview").get_attribute("src") == green
    drv.shot("dropped")
    yellow = png_data_url((220, 220, 0))
    drv.execute_async_script(make, yellow, "image.png", "image/png", "paste")
    drv.wait.until(lambda d: _by_id(d, "preview").get_attribute("src") == yellow)
    text = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    drv.execute_async_script(make, text, "hello.txt", "text/plain", "paste")
    drv.wait.until(lambda d: "not an image" in _by_id(d, "notice").text)
    assert _by_id(drv, "preview").get_attribute("src") == yellow  # the pasted image stays chosen
    drv.shot("pasted")
    answer = _ask(drv, "What colour?", 1)
    assert "error" not in answer.get_attribute("class")


def test_missing_and_wrong_api_key(server: LiveServer, page) -> None:  # noqa: ANN001
    drv = page
    _set(drv, "max-tokens", "0")
    _by_id(drv, "question").send_keys("Hi there", Keys.ENTER)
    drv.wait.until(lambda d: "Max tokens" in _by_id(d, "notice").text)  # checked in the page, nothing sent
    assert not _answers(drv) and _by_id(drv, "question").get_attribute("value") == "Hi there"
    _set(drv, "max-tokens", "8")
    err = _ask(drv, "Hi there", 1)
    assert "error" in err.get_attribute("class") and err.text.startswith("This server needs an API key")
    assert "Bearer" not in err.text and "Authorization" not in err.text
    assert _by_id(drv, "question").get_attribute("value") == "Hi there"  # ready to ask again
    drv.shot("no-key")
    _enter_key(drv, "wrong")
    drv.wait.until(lambda d: "not accepted" in _by_id(d, "model").text)
    err = _ask(drv, "Hi there", 2)
    assert err.text.startswith("The server did not accept this API key")
    drv.shot("wrong-key")
    _enter_key(drv, KEY)
    drv.wait.until(lambda d: _by_id(d, "model").text == "tiny")
    ok = _ask(drv, "Hi there", 3)
    assert "error" not in ok.get_attribute("class")
    # the failed tries are not part of the conversation
    assert ok.text == _api_answer(server.url, [{"role": "user", "content": "Hi there"}], 8).strip()
    drv.shot("right-key")



def test_error_sentences(server: LiveServer, page) -> None:  # noqa: ANN001
    drv = page
    _enter_key(drv, KEY)
    long = "many words " * (CONTEXT // 10)  # over the context: the server's 400 context_length_exceeded
    drv.execute_script("document.getElementById('question').value = arguments[0];", long)
    _by_id(drv, "send").click()
    drv.wait.until(lambda d: _answers(d) and _answers(d)[0].get_attribute("data-done") == "1")
    err = _answers(drv)[0]
    assert err.text.startswith("This question is longer than the model can read. Ask a shorter one.")
    assert "tokens" not in err.text
    drv.shot("too-long")
    # The sentences of errors this server cannot be made to give here (busy, a failed step), as the page maps them.
    sentence = "return plainError(arguments[0], arguments[1], {hadKey: true, followUp: true});"
    busy = drv.execute_script(sentence, 503, {"message": "server busy: all 2 slots busy", "code": "queue_full"})
    failed = drv.execute_script(sentence, 500, {"message": "generation failed: RuntimeError: x"})
    long_chat = drv.execute_script(sentence, 400, {"message": "the prompt is ...", "code": "context_length_exceeded"})
    assert long_chat == "This conversation is longer than the model can read. Start a new conversation."
    assert busy.startswith("The server is busy") and failed.startswith("The model failed while answering")
