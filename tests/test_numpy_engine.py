"""The engine without PyTorch (lavin_edge.runtime.numpy_engine, numpy_vision; the one-shot chat's path) against
``Engine``, its reference: the same native step on the same tiled weights gives bitwise the same logits and
tokens; the NumPy tower matches the PyTorch one to float rounding; ``chat --prompt`` answers without importing
PyTorch and says what the PyTorch session says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import trained_like
from test_fused_decode import _quantized_dir

from lavin_edge.config import preset
from lavin_edge.kernels import extension
from lavin_edge.modality import IMAGE, TEXT
from lavin_edge.prompt import conversation_ids
from lavin_edge.runtime import Engine

pytestmark = pytest.mark.skipif(extension() is None, reason="lavin_edge._C not built")
ROOT = Path(__file__).resolve().parents[1]
IMAGE_FILE = ROOT / "examples" / "easyvqa-red-triangle.png"


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLM (vocab 264: the lm_head packs, so it is stored as two 4-bit passes) on EfficientNet-Lite0, random
    adapters everywhere, GPTQ with act-order (q, k, v with different permutations)."""
    cfg = preset("tiny", "efficientnet-lite0")
    cfg.llm.vocab_size = 264
    return _quantized_dir(trained_like(3, cfg=cfg), tmp_path_factory.mktemp("np_engine"), act_order=True)


def _image() -> np.ndarray:
    from lavin_edge.data.image import load_image_array

    return load_image_array(IMAGE_FILE)


def _greedy(eng: Engine, ids: list[int], image_pos: int, visual: torch.Tensor | None, n: int) -> list[int]:
    from lavin_edge.runtime.sampling import GenerationConfig

    eng.reset(IMAGE if visual is not None else TEXT)
    return eng.generate(ids, GenerationConfig(max_new_tokens=n), image_pos, visual, stop_ids=set()).ids


def test_tokens_and_logits_equal_the_engine(qdir: Path) -> None:
    from lavin_edge.runtime.numpy_engine import NumpyEngine

    ne, eng = NumpyEngine(qdir), Engine.load(qdir, backend="kernels")
    assert eng.native_decode is not None and eng.native_decode.head is None  # the engine's fully native path
    tok = ne.tokenizer
    visual = ne.encode_image(_image())
    for question, vis in (("What is here?", None), ("Which shape?", visual)):
        ids, pos = conversation_ids(tok, [], question, 0 if vis is None else vis.shape[0])
        got: list[int] = []
        reason = ne.generate(ids, pos, vis, 12, set(), lambda t, out=got: out.append(t) or True)
        assert reason == "length" and len(got) == 12
        # The engine fed the NumPy tower's visual tokens: every later number is the same native code's.
        assert got == _greedy(eng, ids, pos, None if vis is None else torch.from_numpy(vis), 12)
        stack, keep = ne._stack(len(ids))
        h = ne.embed[np.asarray(ids)].copy()
        if vis is not None:
            h[pos:pos + vis.shape[0]] = vis
        logits = np.empty(264, dtype=np.float32)
        stack.prefill(h.ctypes.data, len(ids), 0, 0, TEXT if vis is None else IMAGE, logits.ctypes.data)
        eng.reset(TEXT if vis is None else IMAGE)
        want = eng.forward(eng.embed_prompt(ids, pos, None if vis is None else torch.from_numpy(vis)))
        assert np.array_equal(logits, want.numpy())


def test_numpy_tower_matches_the_pytorch_tower(qdir: Path) -> None:
    from lavin_edge.runtime.numpy_engine import NumpyEngine

    image = _image()
    got = NumpyEngine(qdir).encode_image(image)
    want = Engine.load(qdir, backend="kernels").encode_image(torch.from_numpy(image)).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_wrong_tower_weight_is_seen(qdir: Path, tmp_path: Path) -> None:
    """The comparison above can fail: one block's depthwise kernel transposed moves the tokens far past it."""
    from lavin_edge.runtime.numpy_engine import NumpyEngine

    ne = NumpyEngine(qdir)
    good = ne.encode_image(_image())
    blk = ne.vision.blocks[3]
    blk.depthwise = (np.ascontiguousarray(blk.depthwise[0].transpose(0, 2, 1)), *blk.depthwise[1:])
    assert np.abs(ne.encode_image(_image()) - good).max() > 1e-3 * np.abs(good).max()


def test_zero_points_and_act_order_match_the_format_module() -> None:
    from lavin_edge.kernels import tiling
    from lavin_edge.kernels.gptq_format import unpack_nibbles_cols, zero_offset

    g = torch.Generator().manual_seed(0)
    qzeros = torch.randint(-2**31, 2**31 - 1, (6, 5), dtype=torch.int32, generator=g)
    qzeros[0, 0] = -1  # every nibble 0xF: a v1 zero point of 16
    for fmt in ("gptq", "gptq_v2"):
        want = unpack_nibbles_cols(qzeros, 37).to(torch.int16) + zero_offset(fmt)
        got = tiling.zero_points(qzeros.numpy(), 37, fmt)
        assert np.array_equal(got, want.numpy())
    assert tiling.zero_points(qzeros.numpy(), 37, "gptq")[0, 0] == 16
    g_idx = np.repeat(np.arange(4), 8)[np.random.default_rng(0).permutation(32)]
    ok, perm = tiling.act_order(g_idx, 4, 8)
    assert ok and (np.diff(g_idx[perm]) >= 0).all()
    assert tiling.act_order(np.repeat(np.arange(4), 8), 4, 8) == (True, None)
    assert not tiling.act_order(np.array([0] * 9 + [1] * 7), 2, 8)[0]


def test_memory_mapped_tensors_equal_the_library_reader(qdir: Path) -> None:
    from safetensors.numpy import load_file

    from lavin_edge.runtime.numpy_engine import read_safetensors

    want = load_file(str(qdir / "model.safetensors"))
    got = read_safetensors(qdir / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)


def test_what_it_does_not_serve(qdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lavin_edge.runtime.numpy_engine import NumpyEngine, Unsupported

    with pytest.raises(Unsupported, match="not a quantized"):
        NumpyEngine(qdir.parent / "fp")
    monkeypatch.setenv("LAVIN_EDGE_KERNELS", "torch")
    with pytest.raises(Unsupported, match="forced"):
        NumpyEngine(qdir)


def _chat(qdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, bool]:
    """``lavin-edge chat --model qdir ...`` in a fresh interpreter, and whether it imported PyTorch (``-X
    importtime`` lists every module a process imports on stderr, one line each)."""
    from lavin_edge.bench.child import module_command

    # The package this test imported (installed, or a checkout on the path) with its built extension.
    res = subprocess.run(module_command("lavin_edge.cli", "chat", "--model", str(qdir), *args,
                                        flags=("-X", "importtime")), capture_output=True, text=True, timeout=300)
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "lavin_edge.cli" in imported  # the listing works
    res.stderr = "\n".join(line for line in res.stderr.splitlines() if not line.startswith("import time:"))
    return res, "torch" in imported


def test_one_shot_chat_answers_without_pytorch(qdir: Path) -> None:
    """`chat --prompt` imports no PyTorch and answers what the PyTorch session answers (``--stats`` sends the
    same question through it; the answer on stdout is the same greedy text)."""
    fast, torch_imported = _chat(qdir, "--prompt", "Say something.", "--max-new-tokens", "10")
    assert fast.returncode == 0 and not torch_imported, fast.stderr
    slow, torch_imported = _chat(qdir, "--prompt", "Say something.", "--max-new-tokens", "10", "--stats")
    assert slow.returncode == 0 and torch_imported, slow.stderr
    assert fast.stdout == slow.stdout and fast.stdout.strip()
    image, torch_imported = _chat(qdir, "--image", str(IMAGE_FILE), "--prompt", "Which shape?", "--max-new-tokens",
                                  "4")
    assert image.returncode == 0 and image.stdout.strip() and not torch_imported, image.stderr
    bad, _ = _chat(qdir, "--image", str(ROOT / "README.md"), "--prompt", "Which shape?")
    assert bad.returncode == 2 and bad.stderr.startswith("error:"), bad.stderr
