"""The serving engine against the training model: greedy equality on a merged fp model, logits closeness
and top-1 agreement on a quantized one, multi-turn KV reuse, and clear errors for bad model dirs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lavin_edge.chat.engine import TEXT, ContextError, Engine, ModelDirError
from lavin_edge.chat.sampling import GenerationConfig
from lavin_edge.config import preset
from lavin_edge.io.tokenizer import ByteTokenizer
from lavin_edge.merge import merge_lavin, save_merged
from lavin_edge.model.lavin import IMAGE, LaVIN, build_lavin, encode_example


def trained_like(seed: int = 0, llm: str = "tiny", vision: str = "tiny") -> LaVIN:
    """A tiny LaVIN with non-trivial adapters, projection and modality embedding (fresh adapters are the
    identity and would hide a wrong routing table)."""
    torch.manual_seed(seed)
    model = build_lavin(preset(llm, vision))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_trainable_name(name):
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 if "router" in name else 0.3))
    return model.eval()


def merged_dir(model: LaVIN, path: Path) -> Path:
    merged, table = merge_lavin(model)
    return save_merged(merged, path, None, {"test": True}, table)


@pytest.fixture(scope="module")
def tiny_model() -> LaVIN:
    return trained_like(0)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model: LaVIN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return merged_dir(tiny_model, tmp_path_factory.mktemp("merged"))


def _prompt(has_image: bool, text: str = "Instruction: What shape is it?\nResponse:") -> tuple[list[int], int]:
    ex = encode_example(ByteTokenizer(), text, None, has_image, 6)
    return ex.input_ids, ex.image_pos


@pytest.mark.parametrize("has_image", [False, True])
def test_greedy_equals_training_model(tiny_model: LaVIN, tiny_dir: Path, has_image: bool) -> None:
    eng = Engine.load(tiny_dir, backend="torch")
    ids, pos = _prompt(has_image)
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(5)) if has_image else None
    ref = tiny_model.generate_greedy(ids, pos, image, 24, set())
    eng.reset(IMAGE if has_image else TEXT)
    visual = eng.encode_image(image) if image is not None else None
    got = eng.generate(ids, GenerationConfig(max_new_tokens=24), pos, visual).ids
    assert got == ref
    assert len(got) == 24  # no stop id given to the reference: the engine must not stop early either


def test_prefill_logits_match_training_model(tiny_model: LaVIN, tiny_dir: Path) -> None:
    eng = Engine.load(tiny_dir, backend="torch")
    ids, pos = _prompt(True)
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(7))
    from lavin_edge.model.lavin import collate

    batch = collate([encode_example(ByteTokenizer(), "Instruction: What shape is it?\nResponse:", None, True, 6)],
                    [image], 258)
    with torch.no_grad():
        ref = tiny_model(batch)[0]
    eng.reset(IMAGE)
    got = eng.forward(eng.embed_prompt(ids, pos, eng.encode_image(image)), last_only=False)
    assert (got - ref).abs().max().item() < 1e-4
    # The same prompt with the text routing must differ: proves the modality table is applied.
    eng.reset(TEXT)
    other = eng.forward(eng.embed_prompt(ids, pos, eng.encode_image(image)), last_only=False)
    assert (other - ref).abs().max().item() > 1e-3


def test_multi_turn_append_equals_full_prefill(tiny_dir: Path) -> None:
    """Appending turn 2 to the cache gives the same logits as prefilling the whole history at once."""
    eng = Engine.load(tiny_dir, backend="torch")
    a, _ = _prompt(False, "Instruction: hi\nResponse:")
    b = list(b" ok\nInstruction: and then?\nResponse:")
    eng.reset(TEXT)
    eng.forward(eng.embed_prompt(a))
    step = eng.forward(eng.embed_prompt(b))
    eng.reset(TEXT)
    full = eng.forward(eng.embed_prompt(a + b))
    assert (step - full).abs().max().item() < 1e-4


def test_context_overflow_is_an_error(tiny_dir: Path) -> None:
    eng = Engine.load(tiny_dir, backend="torch", max_context=40)
    ids, _ = _prompt(False, "x" * 60)
    with pytest.raises(ContextError):
        eng.generate(ids, GenerationConfig(max_new_tokens=4))


def test_bad_model_dirs(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ModelDirError, match="not found"):
        Engine.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"format": "lavin-edge-adapters"}))
    with pytest.raises(ModelDirError, match="format"):
        Engine.load(tmp_path)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="format_version"):
        Engine.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="JSON"):
        Engine.load(tmp_path)


def test_auto_backend_warns_without_extension(tiny_dir: Path) -> None:
    from lavin_edge import kernels

    if kernels._C is not None:
        pytest.skip("extension built: auto uses it")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eng = Engine.load(tiny_dir, backend="auto")
    assert eng.backend == "torch"
    assert any("fallback" in str(x.message) for x in w)
