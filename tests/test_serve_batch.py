"""The batched decode step (lavin_edge.runtime.batch): a sequence's logits are the same, bit for bit, whether it
decodes alone or in a batch with others of other lengths and modalities that join and leave between steps;
greedy tokens equal the engine's own generation loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import quantize_tiny_dir
from test_engine import trained_like

from lavin_edge.config import preset
from lavin_edge.modality import IMAGE, TEXT
from lavin_edge.runtime import Engine
from lavin_edge.runtime.batch import BatchDecoder

# One thread: on 2 shared cores, OpenMP barriers of a second thread stall every op (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def quantized_tiny_dir(root: Path, seed: int = 0, max_seq_len: int = 256) -> Path:
    """A tiny LaVIN with GPTQ-packed (RTN) LLM linears and a vocabulary the W4 head packs (multiple of 8)."""
    cfg = preset("tiny", "tiny")
    cfg.llm.vocab_size = 264
    cfg.llm.max_seq_len = max_seq_len
    return quantize_tiny_dir(trained_like(seed, cfg=cfg), root)


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized_tiny_dir(tmp_path_factory.mktemp("batch"))


def _requests(eng: Engine) -> list[tuple[list[int], int, int, torch.Tensor | None]]:
    """(ids, modality, image_pos, visual): two text prompts and one image prompt of different lengths."""
    tok = eng.tokenizer
    g = torch.Generator().manual_seed(3)
    visual = eng.encode_image(torch.randn(3, 64, 64, generator=g))
    img = [tok.bos_id] + tok.encode("Image: ") + [tok.pad_id] * visual.shape[0] + tok.encode("Instruction: what?")
    return [(tok.encode("Instruction: hi there\nResponse:"), TEXT, -1, None),
            (img, IMAGE, 1 + len(tok.encode("Image: ")), visual),
            (tok.encode("Instruction: a longer question, with more words\nResponse:"), TEXT, -1, None)]


def _alone(dec: BatchDecoder, req: tuple, steps: int) -> list[torch.Tensor]:
    ids, mod, pos, vis = req
    out = [dec.prefill(0, ids, mod, pos, vis)]
    for _ in range(steps):
        out.append(dec.step([0], [int(out[-1].argmax())])[0])
    return out


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_batched_logits_equal_alone(qdir: Path, backend: str) -> None:
    from lavin_edge import kernels

    if backend == "kernels" and kernels.extension() is None:
        pytest.skip("lavin_edge._C not built")
    eng = Engine.load(qdir, backend=backend)
    dec = BatchDecoder(eng, 3)
    reqs = _requests(eng)
    steps = 8
    alone = [_alone(dec, r, steps) for r in reqs]
    # Batch: request 0 in slot 2 alone for two steps, then 1 (slot 0) and 2 (slot 1) join; 0 leaves first.
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}
    slot_of = {0: 2, 1: 0, 2: 1}

    def start(i: int) -> None:
        ids, mod, pos, vis = reqs[i]
        got[i].append(dec.prefill(slot_of[i], ids, mod, pos, vis))

    start(0)
    for step in range(steps + 2):
        if step == 2:
            start(1)
            start(2)
        active = [i for i in range(3) if got[i] and len(got[i]) <= steps]
        if not active:
            break
        logits = dec.step([slot_of[i] for i in active], [int(got[i][-1].argmax()) for i in active])
        for row, i in enumerate(active):
            got[i].append(logits[row])
    for i in range(3):
        assert len(got[i]) == steps + 1
        for a, b in zip(alone[i], got[i], strict=True):
            if backend == "kernels":
                assert torch.equal(a, b), f"request {i}: batched logits differ from alone"
            else:  # dense BLAS may block m rows differently from one
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_modality_is_per_row(qdir: Path) -> None:
    """The same ids decoded as text in one row and as image in another give different logits: each row takes
    its own adapter (a single modality for the whole batch would make them equal)."""
    eng = Engine.load(qdir, backend="auto")
    dec = BatchDecoder(eng, 2)
    ids = eng.tokenizer.encode("Instruction: same\nResponse:")
    dec.prefill(0, ids, TEXT)
    dec.prefill(1, ids, IMAGE)
    logits = dec.step([0, 1], [5, 5])
    assert not torch.allclose(logits[0], logits[1])
    dec.prefill(0, ids, IMAGE)
    assert torch.equal(dec.step([0], [5])[0], logits[1]) or eng.backend == "torch"


def test_greedy_tokens_equal_engine_generate(qdir: Path) -> None:
    """The batch path produces the tokens the engine's own loop (native decode step) produces."""
    from lavin_edge.runtime.sampling import GenerationConfig

    eng = Engine.load(qdir, backend="auto")
    ref = Engine.load(qdir, backend="auto")
    dec = BatchDecoder(eng, 3)
    reqs = _requests(eng)
    for ids, mod, pos, vis in reqs:
        ref.reset(mod)
        want = ref.generate(ids, GenerationConfig(max_new_tokens=10), pos, vis, stop_ids=set()).ids
        got = _alone(dec, (ids, mod, pos, vis), 9)
        assert [int(x.argmax()) for x in got] == want


def test_step_errors(qdir: Path) -> None:
    eng = Engine.load(qdir, backend="auto")
    dec = BatchDecoder(eng, 2)
    with pytest.raises(ValueError, match="prefill it first"):
        dec.step([0], [1])
    dec.prefill(0, [1, 2, 3])
    with pytest.raises(ValueError, match="distinct"):
        dec.step([0, 0], [1, 2])
    with pytest.raises(ValueError):
        BatchDecoder(eng, 0)


def test_demo_examples_same_tokens_alone_and_batched() -> None:
    """On the demo (when built): the README's example questions about examples/*.png plus a text question, 16
    greedy tokens each, the same logits alone and as one batch of five (mixed modality)."""
    from lavin_edge.data.image import load_image
    from lavin_edge.demo.build import demo_model_dir
    from lavin_edge.demo.paths import DemoModelMissing
    from lavin_edge.prompt import conversation_ids

    try:
        qdir = demo_model_dir()
    except DemoModelMissing as e:
        pytest.skip(str(e))
    eng = Engine.load(qdir, max_context=256)
    tok = eng.tokenizer
    reqs = []
    for img, q in [("easyvqa-red-triangle.png", "What shape is in the image?"),
                   ("easyvqa-brown-circle.png", "What colour is the shape?"),
                   ("easyvqa-black-rectangle.png", "Is there a red shape?"),
                   ("easyvqa-yellow-rectangle.png", "Is there not a yellow shape?")]:
        path = Path(__file__).resolve().parents[1] / "examples" / img
        ids, pos = conversation_ids(tok, [], q, eng.n_visual)
        reqs.append((ids, IMAGE, pos, eng.encode_image(load_image(path, eng.cfg.vision.image_size))))
    reqs.append((conversation_ids(tok, [], "What is a triangle?")[0], TEXT, -1, None))
    steps = 15
    dec = BatchDecoder(eng, len(reqs))
    alone = [_alone(dec, r, steps) for r in reqs]
    got = [[dec.prefill(s, *r)] for s, r in enumerate(reqs)]
    for _ in range(steps):
        logits = dec.step(list(range(len(reqs))), [int(g[-1].argmax()) for g in got])
        for s, g in enumerate(got):
            g.append(logits[s])
    for a, g in zip(alone, got, strict=True):
        assert [int(x.argmax()) for x in a] == [int(x.argmax()) for x in g]
        assert all(torch.equal(x, y) for x, y in zip(a, g, strict=True)) or eng.backend == "torch"


def test_native_step_matches_reference_step(qdir: Path) -> None:
    """The native batched step (``DecodeStack.step_rows``) and prefill against the per-op ``step_reference``
    and the engine's PyTorch prefill on the same mixed batch: close (both quantize activations before each W4
    GEMM, so a last-bit difference upstream, e.g. the attention's summation order against SDPA's, may move one
    activation across a rounding step: test_fused_decode has the bound's reasoning) and the same greedy
    tokens."""
    from lavin_edge import kernels

    if kernels.extension() is None:
        pytest.skip("lavin_edge._C not built")
    eng = Engine.load(qdir, backend="kernels")
    native, ref = BatchDecoder(eng, 3), BatchDecoder(eng, 3)
    assert native.native is not None and native.native_prefill is not None
    ref.native = ref.native_prefill = None
    reqs = _requests(eng)
    slots = [2, 0, 1]
    first = [native.prefill(s, *r) for s, r in zip(slots, reqs, strict=True)]
    first_ref = [ref.prefill(s, *r) for s, r in zip(slots, reqs, strict=True)]
    for a, b in zip(first, first_ref, strict=True):  # the native prefill against the engine's PyTorch one
        assert ((a - b).norm() / b.norm()).item() < 2e-2
        assert a.argmax() == b.argmax()
    g = torch.Generator().manual_seed(7)
    got, want = [], []
    tokens = [int(x.argmax()) for x in first]
    for _ in range(8):
        got.append(native.step(slots, tokens))
        want.append(ref.step(slots, tokens))
        tokens = torch.randint(0, eng.embed.shape[0], (3,), generator=g).tolist()
    got_t, want_t = torch.stack(got), torch.stack(want)
    assert ((got_t - want_t).norm() / want_t.norm()).item() < 2e-2
    assert (got_t.argmax(-1) == want_t.argmax(-1)).float().mean().item() >= 0.9


def test_native_batch_rows_equal_single_sequence_decode(qdir: Path) -> None:
    """A batch row's logits are bitwise those of the engine's own single-sequence native step (``chat``'s path),
    head and re-scoring included, with the other rows of other lengths and modalities in the batch."""
    from lavin_edge import kernels

    if kernels.extension() is None:
        pytest.skip("lavin_edge._C not built")
    eng = Engine.load(qdir, backend="kernels")
    single = Engine.load(qdir, backend="kernels")
    assert single.native_decode is not None and single.native_decode.head is None
    dec = BatchDecoder(eng, 3)
    reqs = _requests(eng)
    steps = 6
    want = []
    for ids, mod, pos, vis in reqs:
        single.reset(mod)
        out = [single.forward(single.embed_prompt(ids, pos, vis))]
        for _ in range(steps):
            out.append(single.forward(single.embed[torch.tensor([int(out[-1].argmax())])].float()))
        want.append(out)
    got = [[dec.prefill(s, *r)] for s, r in enumerate(reqs)]
    for _ in range(steps):
        logits = dec.step([0, 1, 2], [int(g[-1].argmax()) for g in got])
        for s in range(3):
            got[s].append(logits[s])
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(w[0], g[0])  # prefill: the same code on a slot view
        assert all(torch.equal(a, b) for a, b in zip(w[1:], g[1:], strict=True))


def test_native_step_rows_checks_its_rows(qdir: Path) -> None:
    """The native multi-row step re-checks what BatchDecoder already checks (distinct slots in range, positions
    inside the cache, rows <= slots); the torch backend has no native step."""
    from lavin_edge import kernels

    assert BatchDecoder(Engine.load(qdir, backend="torch"), 2).native is None
    if kernels.extension() is None:
        pytest.skip("lavin_edge._C not built")
    eng = Engine.load(qdir, backend="kernels")
    dec = BatchDecoder(eng, 2)
    assert dec.native is not None
    stack = dec.native.stack
    x, out = torch.zeros(3, eng.dim), torch.zeros(3, eng.embed.shape[0])

    def call(slots: list[int], pos: list[int], mods: list[int]) -> None:
        s, p = torch.tensor(slots, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)
        m = torch.tensor(mods, dtype=torch.int32)
        stack.step_rows(x.data_ptr(), len(slots), s.data_ptr(), p.data_ptr(), m.data_ptr(), out.data_ptr())

    with pytest.raises(ValueError, match="distinct"):
        call([1, 1], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="rows must be"):
        call([0, 1, 0], [0, 0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="slot outside"):
        call([2], [0], [0])
    with pytest.raises(ValueError, match="outside the cache"):
        call([0], [-1], [0])
    call([1, 0], [0, 3], [1, 0])
