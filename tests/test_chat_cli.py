"""`lavin-edge chat` end to end on a tiny merged model: one-shot answer equals the engine's greedy output,
--json, the REPL commands, history trimming, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from test_engine import trained_like

from lavin_edge.chat.session import ChatSession
from lavin_edge.cli import main
from lavin_edge.merge import merge_lavin, save_merged
from lavin_edge.runtime import Engine
from lavin_edge.runtime.sampling import GenerationConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    merged, table = merge_lavin(trained_like(1))
    return save_merged(merged, tmp_path_factory.mktemp("m"), None, {}, table)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("img") / "shape.png"
    im = Image.new("RGB", (64, 64), "white")
    for x in range(16, 48):
        for y in range(16, 48):
            im.putpixel((x, y), (200, 30, 30))
    im.save(p)
    return p


def run(*args: str, stdin: str | None = None):  # noqa: ANN201
    return CliRunner().invoke(main, ["chat", *args], input=stdin)


def test_prompt_once_prints_only_the_answer(model_dir: Path, image_path: Path) -> None:
    res = run("--model", str(model_dir), "--image", str(image_path), "--prompt", "What shape?",
              "--max-new-tokens", "12", "--backend", "torch")
    assert res.exit_code == 0, res.stderr
    eng = Engine.load(model_dir, backend="torch")
    s = ChatSession(eng, GenerationConfig(max_new_tokens=12))
    s.set_image(image_path)
    expected, _ = s.ask("What shape?")
    assert res.stdout == expected.text.lstrip() + "\n"
    assert res.stderr == ""


def test_json_and_stats(model_dir: Path, image_path: Path) -> None:
    res = run("--model", str(model_dir), "--image", str(image_path), "--prompt", "What colour?", "--json",
              "--stats", "--max-new-tokens", "5", "--backend", "torch")
    assert res.exit_code == 0, res.stderr
    obj = json.loads(res.stdout)
    assert obj["stats"]["new_tokens"] <= 5 and obj["stats"]["prompt_tokens"] > 6
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb"):
        assert obj["stats"][key] >= 0
    assert obj["image"] == str(image_path)


def test_sampling_is_seeded(model_dir: Path) -> None:
    args = ["--model", str(model_dir), "--prompt", "Tell me", "--temperature", "1.5", "--top-k", "50",
            "--top-p", "0.95", "--max-new-tokens", "16", "--backend", "torch"]
    a, b, c = run(*args, "--seed", "1"), run(*args, "--seed", "1"), run(*args, "--seed", "2")
    assert a.exit_code == 0 and a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_repl_commands(model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    script = "\n".join(["What shape?", f"/image {image_path}", "And the colour?", "/image /no/such.png", "/reset",
                        "/bogus", "Again?", "/exit", "never asked"]) + "\n"
    res = run("--model", str(model_dir), "--max-new-tokens", "6", "--json", "--backend", "torch", stdin=script)
    assert res.exit_code == 0, res.stderr
    answers = [json.loads(line) for line in res.stdout.splitlines()]
    assert [a["question"] for a in answers] == ["What shape?", "And the colour?", "Again?"]
    assert answers[0]["image"] is None and answers[1]["image"] == str(image_path)
    assert "file not found" in res.stderr and "history cleared" in res.stderr and "unknown command" in res.stderr


def test_history_trimmed_oldest_first(model_dir: Path) -> None:
    eng = Engine.load(model_dir, backend="torch", max_context=120)
    s = ChatSession(eng, GenerationConfig(max_new_tokens=8))
    notices = []
    for i in range(6):
        _, n = s.ask(f"question number {i}?")
        notices += n
    assert any("trimmed" in n for n in notices)
    assert s.turns[-1].question == "question number 5?"
    assert s.turns[0].question != "question number 0?"
    # The cache must hold exactly the (trimmed) conversation: a fresh prefill of it gives the same next token.
    assert eng.length <= 120


def test_turn_reuses_cache_and_matches_fresh_prefill(model_dir: Path, image_path: Path) -> None:
    eng = Engine.load(model_dir, backend="torch")
    s = ChatSession(eng, GenerationConfig(max_new_tokens=6))
    s.set_image(image_path)
    s.ask("What shape?")
    second, _ = s.ask("And the colour?")
    # Only the new turn was prefilled (plus the last answer token and EOS, never fed during decode).
    assert second.stats.prompt_tokens == len("\nInstruction: And the colour?\nResponse:") + 2
    fresh = ChatSession(Engine.load(model_dir, backend="torch"), GenerationConfig(max_new_tokens=6))
    fresh.set_image(image_path)
    fresh.turns = list(s.turns[:1])
    again, _ = fresh.ask("And the colour?")
    assert again.ids == second.ids


def test_prompt_longer_than_context(model_dir: Path) -> None:
    res = run("--model", str(model_dir), "--prompt", "x" * 400, "--max-context", "64", "--backend", "torch")
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "exceeds the model's context" in res.stderr


@pytest.mark.parametrize("kind", ["missing", "not_image", "truncated", "bomb"])
def test_bad_images(model_dir: Path, image_path: Path, tmp_path: Path, kind: str) -> None:
    p = tmp_path / "bad.png"
    if kind == "not_image":
        p.write_text("hello, I am text")
    elif kind == "truncated":
        # Noise compresses badly, so cutting the file in half cuts into the pixel data (not just IEND).
        Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).rotate(7).save(tmp_path / "full.png")
        full = (tmp_path / "full.png").read_bytes()
        p.write_bytes(full[: len(full) // 2])
    elif kind == "bomb":
        Image.new("1", (20000, 20000)).save(p)  # 400 Mpx, 1-bit: a small file that decodes huge
    res = run("--model", str(model_dir), "--image", str(p), "--prompt", "What?", "--backend", "torch")
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr


def test_bad_model_dirs(tmp_path: Path, model_dir: Path) -> None:
    res = run("--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert res.exit_code == 2 and "not found" in res.stderr
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["format_version"] = 99  # a version this lavin-edge does not read
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    res = run("--model", str(tmp_path), "--prompt", "hi")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "format_version" in res.stderr


def test_help_says_what_the_model_is() -> None:
    res = CliRunner().invoke(main, ["chat", "--help"])
    assert res.exit_code == 0
    assert "SmolLM2-135M" in res.stdout and "easy-vqa" in res.stdout and "cannot" in res.stdout


def test_default_model_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lavin_edge.demo import paths

    monkeypatch.setattr(paths, "demo_roots", lambda: [tmp_path])
    # With the shipped adapters the demo builds itself (tests/test_demo.py); without them: a clear error.
    monkeypatch.setattr(paths, "ADAPTERS_DIR", tmp_path / "no-adapters")
    res = run("--prompt", "hi")
    assert res.exit_code == 2 and "demo model not built" in res.stderr and "lavin-edge train" in res.stderr


def test_one_shot_process_ends_with_everything_written(model_dir: Path, image_path: Path, tmp_path: Path) -> None:
    """The real entry point ends a one-shot chat without the interpreter's teardown (lavin_edge.cli,
    skip_teardown_at_exit): a piped stdout still gets the whole answer, and the exit code is 0."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a block-buffered stdout pipe
    args = ["--model", str(model_dir), "--image", str(image_path), "--prompt", "What colour?", "--json",
            "--max-new-tokens", "5", "--backend", "torch"]
    proc = subprocess.run([sys.executable, "-m", "lavin_edge.cli", "chat", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, want = json.loads(proc.stdout), json.loads(run(*args).stdout)
    got.pop("stats", None)  # timings
    want.pop("stats", None)
    assert got == want and got["answer"]
