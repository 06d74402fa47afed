"""The web page at / in a real headless Chromium (the system's package, driven by Selenium): pick an image, ask,
the answer streams in and equals what the API gives for the same conversation; a follow-up question keeps the
history. Skipped where Chromium or its driver is not installed (.ci/run installs both)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

from PIL import Image  # noqa: E402
from test_serve import LiveServer  # noqa: E402
from test_serve_batch import quantized_tiny_dir  # noqa: E402

from lavin_edge.runtime import Engine  # noqa: E402
from lavin_edge.serve.server import ServeOptions, build_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium / chromedriver not installed"),
              pytest.mark.usefixtures("one_thread")]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    qdir = quantized_tiny_dir(tmp_path_factory.mktemp("page"))
    app, _ = build_app(Engine.load(qdir), "tiny", ServeOptions(slots=2))
    with LiveServer(app) as s:
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


def _api_answer(url: str, messages: list[dict]) -> str:
    body = {"messages": messages, "max_tokens": 128, "temperature": 0}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"]


def test_pick_image_ask_and_follow_up(server: LiveServer, browser, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    drv = browser
    drv.get(server.url + "/")
    wait = WebDriverWait(drv, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    drv.find_element(By.ID, "image").send_keys(str(image))
    wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
    drv.find_element(By.ID, "question").send_keys("What colour is it?")
    drv.find_element(By.ID, "send").click()
    answers = lambda d: d.find_elements(By.CSS_SELECTOR, "#log .a")  # noqa: E731
    wait.until(lambda d: len(answers(d)) == 1 and answers(d)[0].get_attribute("data-done") == "1")
    shown = answers(drv)[0].text
    url = drv.find_element(By.ID, "preview").get_attribute("src")
    first = [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                          {"type": "image_url", "image_url": {"url": url}}]}]
    want = _api_answer(server.url, first)
    assert "error" not in answers(drv)[0].get_attribute("class")
    assert shown == want.strip() and shown

    drv.find_element(By.ID, "question").send_keys("Are you sure?")
    drv.find_element(By.ID, "send").click()
    wait.until(lambda d: len(answers(d)) == 2 and answers(d)[1].get_attribute("data-done") == "1")
    follow = first + [{"role": "assistant", "content": want}, {"role": "user", "content": "Are you sure?"}]
    assert answers(drv)[1].text == _api_answer(server.url, follow).strip()
