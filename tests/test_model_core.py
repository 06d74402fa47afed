"""Correctness of the model core: adapter identity at init, the position-0 routing rule, KV cache."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lavin_edge.cli import main
from lavin_edge.config import preset
from lavin_edge.model.adapter import RoutedAdapter, dense_up, grouped_up
from lavin_edge.model.lavin import IGNORE_INDEX, build_lavin, collate, encode_example
from lavin_edge.model.llama import KVCache, attention_mask


def _randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh adapters are the identity; give them real values so tests see their effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_adapter_is_identity_at_init() -> None:
    torch.manual_seed(0)
    ad = RoutedAdapter(32, hidden=8, groups=2, temperature=10.0).eval()
    x = torch.randn(3, 5, 32)
    assert torch.equal(ad(x), x)
    assert torch.equal(ad(x, x[:, :1]), x)


def test_grouped_up_projection_reads_its_own_hidden_block() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(16, 4), torch.randn(16)
    z = torch.randn(7, 8)
    out = grouped_up(z, w, b, 2)
    # Output half k reads hidden channels 4k..4k+3 only.
    expect = torch.cat([z[:, :4] @ w[:8].T, z[:, 4:] @ w[8:].T], dim=1) + b
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(out, z @ dense_up(w, 2).T + b)


def test_adapter_fold_matches_routed_forward() -> None:
    torch.manual_seed(0)
    ad = RoutedAdapter(32, temperature=5.0).eval()
    _randomise_adapters(torch.nn.ModuleDict({"adapter": ad}))
    x, route = torch.randn(2, 6, 32), torch.randn(2, 1, 32)
    y = ad(x, route)
    for b in range(2):
        u_w, u_b = ad.folded(ad.routing_weights(route[b, 0]))
        folded = x[b] + (ad.down(x[b]) @ u_w.T + u_b)
        torch.testing.assert_close(y[b], folded, atol=1e-5, rtol=1e-5)


def test_attention_mask_isolates_the_modality_token() -> None:
    m = attention_mask(4, 0, isolate_first=True)
    allowed = m == 0
    assert allowed[0].tolist() == [True, False, False, False]
    assert not allowed[1:, 0].any()
    assert allowed[3, 1:].all()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = build_lavin(preset("tiny", "tiny")).eval()
    _randomise_adapters(model)
    return model


def test_llm_routing_at_position_0_ignores_the_rest_of_the_sequence(tiny_model, byte_tok) -> None:
    seen: list[torch.Tensor] = []
    hooks = [layer.adapter.router.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
             for layer in tiny_model.llm.layers]
    for prompt in ("short", "a much longer and entirely different prompt text"):
        ex = encode_example(byte_tok, prompt, "x", False, tiny_model.n_visual)
        tiny_model(collate([ex], [None], byte_tok.pad_id))
    for h in hooks:
        h.remove()
    n = len(tiny_model.llm.layers)
    assert len(seen) == 2 * n
    for a, b in zip(seen[:n], seen[n:], strict=True):
        assert torch.equal(a, b)


def test_modality_token_changes_the_routing(tiny_model, byte_tok) -> None:
    ex_t = encode_example(byte_tok, "q", "a", False, tiny_model.n_visual)
    ex_i = encode_example(byte_tok, "q", "a", True, tiny_model.n_visual)
    logits = tiny_model(collate([ex_t, ex_i], [None, torch.randn(3, 64, 64)], byte_tok.pad_id))
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    w = [layer.adapter.routing_weights(tiny_model.modality_embedding.weight) for layer in tiny_model.llm.layers]
    assert not torch.allclose(w[0][0], w[0][1])


def test_kv_cache_decoding_equals_full_forward(tiny_model, byte_tok) -> None:
    llm = tiny_model.llm
    tokens = torch.randint(0, 256, (2, 12))
    full = llm(tokens)
    cache = KVCache.allocate(llm.cfg, 2, 16, torch.float32)
    parts = [llm(tokens[:, :5], cache=cache, start=0)]
    for t in range(5, 12):
        parts.append(llm(tokens[:, t:t + 1], cache=cache, start=cache.length))
    stepped = torch.cat(parts, dim=1)
    assert (stepped - full).abs().max().item() < 1e-4


def test_labels_cover_answer_and_eos_only(byte_tok) -> None:
    ex = encode_example(byte_tok, "What colour?", "red", True, 6)
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert labelled == byte_tok.encode("red") + [byte_tok.eos_id]
    assert ex.input_ids[0] == byte_tok.bos_id
    assert ex.input_ids[ex.image_pos:ex.image_pos + 6] == [byte_tok.pad_id] * 6
    assert byte_tok.decode(ex.input_ids[1:ex.image_pos]) == "Image: "
    text = encode_example(byte_tok, "hi", "yo", False, 6)
    assert text.image_pos == -1 and byte_tok.decode(text.input_ids[1:11]) == "Image: N/A"
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        encode_example(byte_tok, "x" * 100, "y", False, 6, max_len=50)


def test_only_adapters_projection_and_modality_embedding_train(tiny_model) -> None:
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == set(tiny_model.trainable_state_dict())
    assert all(".adapter." in n or n.startswith(("visual_proj.", "modality_embedding.")) for n in trainable)
    assert any(n.startswith("vision.") for n in trainable) and any(n.startswith("llm.") for n in trainable)


@pytest.mark.parametrize(("llm", "expected"), [("llama-7b", 3781296), ("llama-13b", 5390080)])
def test_info_prints_the_paper_parameter_counts(llm: str, expected: int) -> None:
    result = CliRunner().invoke(main, ["info", "--llm", llm, "--vision", "vit-l-14", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["trainable_params"] == expected
    assert info["total_params"] > 6_700_000_000


def test_llama_7b_breakdown() -> None:
    counts = build_lavin(preset("llama-7b", "vit-l-14"), "meta").count_parameters()
    assert counts["llm_adapters"] == 2621760
    assert counts["vision_adapters"] == 491760
    assert counts["visual_proj"] == 659584
    assert counts["modality_embedding"] == 8192


def test_no_position_attends_to_the_modality_token(byte_tok) -> None:
    """With identity adapters the modality token can only matter through attention, which the mask forbids."""
    torch.manual_seed(0)
    model = build_lavin(preset("tiny", "tiny")).eval()
    ex = encode_example(byte_tok, "some prompt", "answer", False, model.n_visual)
    batch = collate([ex], [None], byte_tok.pad_id)
    before = model(batch)
    with torch.no_grad():
        model.modality_embedding.weight.mul_(-3.0).add_(1.0)
    assert torch.equal(model(batch), before)
    model.llm.isolate_first = False  # the plain causal mask lets the token leak in
    assert not torch.allclose(model(batch), before)


def test_adapter_rank_is_checked_where_the_config_is_built() -> None:
    """A rank the kernels cannot serve is refused when the recipe's AdapterConfig is built, not at chat time."""
    from lavin_edge.config import MAX_ADAPTER_RANK, AdapterConfig

    AdapterConfig(hidden=MAX_ADAPTER_RANK)
    for hidden, groups in ((2 * MAX_ADAPTER_RANK, 2), (7, 2), (0, 2)):
        with pytest.raises(ValueError, match="adapter_hidden"):
            AdapterConfig(hidden=hidden, groups=groups)
    with pytest.raises(ValueError, match="temperature"):
        AdapterConfig(temperature=0.0)


def test_adapter_rank_limit_is_the_kernels_limit() -> None:
    """The Python limit and the kernels' (csrc/adapter_limits.h) are one number."""
    from lavin_edge.config import MAX_ADAPTER_RANK
    from lavin_edge.kernels.dispatch import extension

    c = extension()
    if c is None:
        pytest.skip("the extension is not built")
    assert c.MAX_ADAPTER_RANK == MAX_ADAPTER_RANK
