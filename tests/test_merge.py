"""merge: folded routers give the unmerged model's logits exactly (fp32), without the modality token."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import trained_like

from lavin_edge.merge import ModelDirError, load_merged, merge_lavin, read_config, routing_table, save_merged
from lavin_edge.model.lavin import collate, encode_example
from lavin_edge.model.llama import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(tok, model):
    n_vis = model.n_visual
    exs = [encode_example(tok, "What colour is the shape?", "red", True, n_vis),
           encode_example(tok, "Tell me a joke about cats.", "no", False, n_vis),
           encode_example(tok, "Is it a circle?", "yes", True, n_vis)]
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randn(3, 64, 64, generator=g), None, torch.randn(3, 64, 64, generator=g)]
    return collate(exs, imgs, tok.pad_id)


def test_routing_table_depends_on_modality(byte_tok) -> None:
    model = trained_like()
    table = routing_table(model)
    assert table.shape == (model.cfg.llm.n_layers, 2, 2)
    assert torch.allclose(table.sum(-1), torch.ones(table.shape[:2]))
    # Strong random routers: text and image must route differently, or the test could not see a swap.
    assert (table[:, 0] - table[:, 1]).abs().max() > 0.05


def test_merged_logits_equal_unmerged(byte_tok) -> None:
    model = trained_like()
    batch = _batch(byte_tok, model)
    merged, _ = merge_lavin(model)
    with torch.no_grad():
        ref = model(batch)
        got = merged(batch)
    assert got.shape == ref.shape
    for row in range(batch.input_ids.shape[0]):  # rows 0, 2 with an image, row 1 text only
        diff = (got[row] - ref[row]).abs().max().item()
        assert diff < 1e-4, f"row {row}: max abs diff {diff}"
    # Nothing of the router or the modality token survives in the runtime.
    names = set(merged.state_dict())
    assert not any("modality_embedding" in k for k in names)
    assert not any(k.startswith("llm.") and "router" in k for k in names)
    assert any(k.startswith("vision.") and "router" in k for k in names)  # the ViT keeps per-token routing


def test_merged_decode_cache_holds_only_real_tokens(byte_tok) -> None:
    model = trained_like(3)
    merged, _ = merge_lavin(model)
    tok = byte_tok
    for has_image in (False, True):
        ex = encode_example(tok, "Describe it.", None, has_image, model.n_visual)
        image = torch.randn(3, 64, 64) if has_image else None
        ref = model.generate_greedy(ex.input_ids, ex.image_pos, image, 8, set())
        got = merged.generate_greedy(ex.input_ids, ex.image_pos, image, 8, set())
        assert got == ref
        # A cache sized for exactly the prompt suffices: no slot for the modality token.
        ids = torch.tensor([ex.input_ids])
        pos = torch.tensor([ex.image_pos])
        h = merged.embed(ids, pos, None if image is None else image[None])
        cache = KVCache.allocate(merged.cfg.llm, 1, ids.shape[1], h.dtype)
        with torch.no_grad():
            last = merged.llm.forward_embeds(h, (pos >= 0).long(), cache, 0, last_only=True)
            full = model(collate([ex], [image], tok.pad_id))[:, -1:]
        assert cache.length == ids.shape[1]
        assert (last - full).abs().max() < 1e-4


def test_save_load_roundtrip_and_bad_dirs(tmp_path, byte_tok) -> None:
    model = trained_like(5)
    merged, table = merge_lavin(model)
    out = save_merged(merged, tmp_path / "merged", None, {"note": "test"}, table)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "lavin-edge-merged" and cfg["position_offset"] == 1
    loaded, _ = load_merged(out)
    batch = _batch(byte_tok, model)
    with torch.no_grad():
        assert torch.equal(loaded(batch), merged(batch))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("layers.0.adapter.up.weight").shape) == (2, 64, 8)
    assert "layers.1.attention.wq.weight" in keys and "vision.conv1.weight" in keys
    # An adapter directory (not merged) is refused with a hint.
    bad = tmp_path / "adapters"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(model.cfg.to_dict()))
    (bad / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(ModelDirError, match="not a merged model.*merge"):
        read_config(bad)


def test_merge_cli_on_a_train_artifact(tmp_path, byte_tok) -> None:
    """A `lavin-edge train`-style artifact (preset base rebuilt from its seed) -> `lavin-edge merge` -> a
    directory that loads on its own and gives the trained model's logits."""
    from click.testing import CliRunner

    from lavin_edge.cli import main
    from lavin_edge.config import AdapterConfig
    from lavin_edge.io.outdir import write_marker
    from lavin_edge.training.base import BaseSpec, build_base
    from lavin_edge.training.checkpoint import save_adapters, save_json

    spec = BaseSpec("preset:tiny", "preset:tiny", None, 3)
    model, _, _ = build_base(spec, AdapterConfig())
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_trainable_name(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    art = tmp_path / "run"
    save_adapters(model.trainable_state_dict(), art)
    save_json({"lavin_config": model.cfg.to_dict(), "base": spec.to_dict()}, art / "config.json")
    # Without the completeness marker (what `train` writes last) the dir is refused.
    res = CliRunner().invoke(main, ["merge", str(art), str(tmp_path / "merged")])
    assert res.exit_code == 2 and "incomplete" in res.output and not (tmp_path / "merged").exists()
    write_marker(art)
    res = CliRunner().invoke(main, ["merge", str(art), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged, cfg = load_merged(tmp_path / "merged")
    assert cfg["tokenizer"] == {"builtin": "bytes"} and cfg["source"]["base"]["seed"] == 3
    batch = _batch(byte_tok, model)
    with torch.no_grad():
        assert (merged(batch) - model.eval()(batch)).abs().max() < 1e-4
    # Merging a merged directory is refused.
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "merged"), str(tmp_path / "again")])
    assert res.exit_code != 0 and "adapters.safetensors" in res.output
