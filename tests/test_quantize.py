"""The GPTQ pipeline on a tiny merged LaVIN: layer-by-layer quantization, the quantized directory, its
reload, quality measurement, the CLI, and the refusals of bad input (before any work)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_engine import trained_like
from test_gptq import reference_unpack

from lavin_edge.cli import main
from lavin_edge.io.tokenizer import ByteTokenizer
from lavin_edge.merge import merge_lavin, save_merged
from lavin_edge.quantize.files import load_quantized_as_fp, save_quantized
from lavin_edge.quantize.pipeline import LINEAR_NAMES, CalibrationError, CalibSample, GPTQConfig, quantize_model
from lavin_edge.quantize.quality import answer_accuracy, perplexity, record_samples, text_samples

pytestmark = pytest.mark.usefixtures("one_thread")


def _easy_vqa(split: str, n: int):
    from lavin_edge.data.easyvqa import load_easy_vqa
    from lavin_edge.data.records import Problems

    return load_easy_vqa(split, Problems(), "open", limit=n, seed=0)


def _calibration(model, n_text: int = 6, n_img: int = 6) -> list[CalibSample]:
    tok = ByteTokenizer()
    texts = ["The quick brown fox jumps over the lazy dog while the cat sleeps.",
             "Quantization maps each weight to one of sixteen levels per group.",
             "A routed adapter adds a small low-rank update to the attention input."] * 2
    out = text_samples(tok, texts[:n_text], 96)
    out += record_samples(_easy_vqa("train", n_img), tok, model.n_visual, model.cfg.vision.image_size, 96)
    return out


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    merged, table = merge_lavin(trained_like(7))
    fp = copy.deepcopy(merged)
    root = tmp_path_factory.mktemp("q")
    save_merged(merged, root / "merged", "bytes", {"test": True}, table)
    qcfg = GPTQConfig(group_size=32, sym=True, desc_act=True, asym_calib=0.0)  # plain GPTQ
    samples = _calibration(merged)
    packed, report = quantize_model(merged, samples, qcfg, progress=False)
    mcfg = json.loads((root / "merged" / "config.json").read_text())
    out = save_quantized(merged, packed, mcfg, qcfg, root / "quant", "bytes", report)
    return fp, merged, packed, report, out, samples


def test_gptq_beats_rtn_on_every_linear(quantized) -> None:
    _, _, _, report, _, _ = quantized
    assert len(report.linears) == 2 * len(LINEAR_NAMES)
    for r in report.linears:
        assert r.gptq_error < r.rtn_error, r


def test_quantized_dir_layout_and_reload(quantized) -> None:
    fp, qmodel, packed, _, out, samples = quantized
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["desc_act"] and qc["sym"]
    assert qc["checkpoint_format"] == "gptq"
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    from safetensors.numpy import load_file as load_np

    raw = load_np(str(out / "model.safetensors"))
    assert "layers.0.attention.wq.weight" not in raw and "layers.0.adapter.up.weight" in raw
    assert raw["layers.1.feed_forward.w2.qweight"].dtype == np.int32
    assert raw["layers.1.feed_forward.w2.qweight"].shape == (128 // 8, 64)
    assert raw["layers.1.feed_forward.w2.scales"].dtype == np.float16
    loaded, _ = load_quantized_as_fp(out)
    # The independent numpy reader gives the same weights as our loader.
    for i in range(2):
        for name in LINEAR_NAMES:
            p = f"layers.{i}.{name}"
            ref = reference_unpack(raw[f"{p}.qweight"], raw[f"{p}.qzeros"], raw[f"{p}.scales"],
                                   raw[f"{p}.g_idx"].astype(np.int64), v1=True)
            mod = loaded.llm.layers[i]
            for part in name.split("."):
                mod = getattr(mod, part)
            assert np.array_equal(mod.weight.detach().numpy(), ref), p
    # The reloaded model computes what the in-memory quantized model computed.
    s = samples[-1]
    ids, pos = torch.tensor([s.input_ids]), torch.tensor([s.image_pos])
    with torch.no_grad():
        a = qmodel.llm.forward_embeds(qmodel.embed(ids, pos, s.image[None]), (pos >= 0).long())
        b = loaded.llm.forward_embeds(loaded.embed(ids, pos, s.image[None]), (pos >= 0).long())
        c = fp.llm.forward_embeds(fp.embed(ids, pos, s.image[None]), (pos >= 0).long())
    assert (a - b).abs().max() < 1e-5
    assert (a - c).abs().max() > 1e-3  # quantization really changed the weights


def test_quality_code_paths(quantized) -> None:
    fp, qmodel, _, _, _, _ = quantized
    tok = ByteTokenizer()
    texts = ["Held-out text: the model has never calibrated on this sentence about tea and biscuits."]
    p_fp, p_q = perplexity(fp, tok, texts), perplexity(qmodel, tok, texts)
    assert np.isfinite(p_fp) and np.isfinite(p_q) and p_fp != p_q
    # Accuracy against the fp model's own answers: fp scores 1 by construction, 4-bit scores its agreement.
    recs = _easy_vqa("test", 6)
    acc, answers = answer_accuracy(fp, tok, recs, 64, max_new_tokens=4)
    for r, a in zip(recs, answers, strict=True):
        r.answer, r.meta = a, {}  # judged as a whole answer, not as easy-vqa's gold
    assert answer_accuracy(fp, tok, recs, 64, max_new_tokens=4)[0] == 1.0
    acc_q, answers_q = answer_accuracy(qmodel, tok, recs, 64, max_new_tokens=4)
    agree = sum(a.strip().lower().rstrip(".") == b.strip().lower().rstrip(".")
                for a, b in zip(answers, answers_q, strict=True))
    assert acc_q == agree / len(recs)


def test_asymmetric_calibration_tracks_the_fp_model(quantized) -> None:
    """GPTQ aimed at the fp model's outputs (asym_calib) ends closer to the fp model than plain GPTQ on the
    same calibration sequences, measured on the logits (the default step, 0.25)."""
    fp, plain, _, _, _, samples = quantized
    asym = copy.deepcopy(fp)
    _, report = quantize_model(asym, samples, GPTQConfig(group_size=32, sym=True, desc_act=True),
                               progress=False)
    assert report.config["asym_calib"] == 0.25 and len(report.linears) == len(LINEAR_NAMES) * len(fp.llm.layers)

    @torch.no_grad()
    def logits(m):  # noqa: ANN001, ANN202
        out = []
        for s in samples:
            ids = torch.tensor([s.input_ids])
            pos = torch.tensor([s.image_pos])
            img = None if s.image is None else s.image[None]
            h = m.embed(ids, pos, img)
            out.append(m.llm.forward_embeds(h, (pos >= 0).long()))
        return torch.cat([o.flatten() for o in out])

    ref = logits(fp)
    e_plain = float((logits(plain) - ref).pow(2).mean())
    e_asym = float((logits(asym) - ref).pow(2).mean())
    assert e_asym < e_plain, (e_asym, e_plain)
    with pytest.raises(ValueError, match="asym_calib"):
        GPTQConfig(asym_calib=1.5).validate(fp)


def test_bad_inputs_fail_before_work(tmp_path) -> None:
    merged, _ = merge_lavin(trained_like(2))
    samples = _calibration(merged, 2, 2)
    with pytest.raises(ValueError, match="not divisible by group size 128"):
        quantize_model(merged, samples, GPTQConfig(group_size=128), progress=False)
    with pytest.raises(ValueError, match="unsupported group size 48"):
        quantize_model(merged, samples, GPTQConfig(group_size=48), progress=False)
    with pytest.raises(ValueError, match="gptq_v2"):
        quantize_model(merged, samples, GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq"),
                       progress=False)
    text_only = [s for s in samples if s.image is None]
    with pytest.raises(CalibrationError, match="no image samples"):
        quantize_model(merged, text_only, GPTQConfig(group_size=32), progress=False)
    wrong = [CalibSample(samples[-1].input_ids, samples[-1].image_pos, torch.zeros(3, 224, 224))]
    with pytest.raises(CalibrationError, match="image shape"):
        quantize_model(merged, wrong + text_only, GPTQConfig(group_size=32), progress=False)
    # Nothing was touched by the refused runs.
    fresh, _ = merge_lavin(trained_like(2))
    assert torch.equal(merged.llm.layers[0].attention.wq.weight, fresh.llm.layers[0].attention.wq.weight)


def test_cli_merge_refusal_and_quantize(tmp_path, quantized) -> None:
    runner = CliRunner()
    merged, table = merge_lavin(trained_like(4))
    save_merged(merged, tmp_path / "m", "bytes", {}, table)
    # Not a merged model: a trained-adapter directory.
    bad = tmp_path / "adapters"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "adapters.safetensors").write_bytes(b"")
    res = runner.invoke(main, ["quantize", str(bad), str(tmp_path / "x")])
    assert res.exit_code != 0 and "not a merged model" in res.output
    # Already quantized.
    res = runner.invoke(main, ["quantize", str(quantized[4]), str(tmp_path / "x")])
    assert res.exit_code != 0 and "already quantized" in res.output
    # 64-wide tiny model, group 128: refused before calibration, one line, exit 2.
    res = runner.invoke(main, ["quantize", str(tmp_path / "m"), str(tmp_path / "x"), "--group-size", "128"])
    assert res.exit_code == 2 and "not divisible by group size 128" in res.output
    assert not (tmp_path / "x").exists()
    # The default group size: the largest of 128/64/32 dividing every input width (64 here), said.
    res = runner.invoke(main, ["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--asym", "--calib-samples",
                               "6", "--calib-len", "64", "--eval-texts", "3"])
    assert res.exit_code == 0, res.output
    assert "group size 64" in res.output
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["group_size"] == 64
    # An existing output is refused without --overwrite (exit 2, one line) and replaced with it.
    res = runner.invoke(main, ["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--group-size", "32"])
    assert res.exit_code == 2 and "already exists" in res.output and "--overwrite" in res.output
    res = runner.invoke(main, ["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--group-size", "32",
                               "--asym", "--calib-samples", "6", "--calib-len", "64", "--eval-texts", "3",
                               "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "ppl_rise" in res.output
    qc = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert qc["sym"] is False and qc["checkpoint_format"] == "gptq_v2"
    rep = json.loads((tmp_path / "q" / "quantize_report.json").read_text())
    assert rep["quality"]["ppl_fp"] > 0 and len(rep["linears"]) == 14
    loaded, _ = load_quantized_as_fp(tmp_path / "q")
    assert loaded.llm.layers[0].attention.wq.weight.shape == (64, 64)


def test_kernels_read_our_checkpoint(quantized) -> None:
    """The kernel engineer's reference reader and the W4 kernels consume our packed tensors as we do
    (sym v1 with act-order here; asym v2 from a fresh GPTQ run)."""
    kernels = pytest.importorskip("lavin_edge.kernels", reason="lavin_edge.kernels not present")
    from test_gptq import _layer

    from lavin_edge.kernels.gptq_format import GPTQTensors, dequantize_packed, pack_linear
    from lavin_edge.quantize.gptq import gptq_quantize

    _, _, packed, _, _, _ = quantized
    w_asym, H = _layer(n=64, k=128, seed=3)
    asym = pack_linear(gptq_quantize(w_asym, H, 4, 32, False, desc_act=True), 4, "gptq_v2")
    cases = [({s: packed[f"layers.1.feed_forward.w2.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")},
              "gptq"), (asym, "gptq_v2")]
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    for t, fmt in cases:
        ours = dequantize_packed(t, 4, fmt)
        theirs = GPTQTensors.from_dict(t, fmt, 32).dequantize()
        assert torch.equal(ours, theirs), fmt
        prepared = kernels.prepare_w4(GPTQTensors.from_dict(t, fmt, 32))
        y = prepared.matmul(x)
        ref = x @ ours.T
        # The native path quantizes activations to int8 per block (llama.cpp's design): loose tolerance.
        assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3, fmt


def test_calibration_from_a_recipes_data(tmp_path) -> None:  # noqa: ANN001
    """--calib-recipe: text-only records fill the text share, image records (conversations with their earlier
    turns) the rest; too few records or a bad table is a clear error."""
    from lavin_edge.quantize.run import QuantizeOptions, calibration_samples, read_calib_recipe
    from lavin_edge.training.recipe import RecipeError

    recipe = tmp_path / "r.toml"
    recipe.write_text('[[data]]\ntype = "self-distill"\nsplit = "train"\nlimit = 4\n\n'
                      '[[data]]\ntype = "easy-vqa-chat"\nlimit = 6\nmin_turns = 2\nmax_turns = 2\n')
    data = read_calib_recipe(recipe)
    opts = QuantizeOptions(calib_samples=8, calib_len=512, text_fraction=0.25, calib_data=data)
    samples = calibration_samples(opts, ByteTokenizer(), 6, 32)
    assert len(samples) == 8 and sum(s.image is None for s in samples) == 2
    # A 2-turn conversation holds both questions: longer than the single-turn prompt alone.
    assert all(len(s.input_ids) > 60 for s in samples if s.image is not None)
    with pytest.raises(ValueError, match="needs 4 and 12"):
        calibration_samples(QuantizeOptions(calib_samples=16, calib_data=data), ByteTokenizer(), 6, 32)
    # The demo's own recipe (prose tables, text_loss = "kl"), as the demo build and BUILD_HINT use it.
    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo-chat.toml"
    assert {t["type"] for t in read_calib_recipe(demo)} >= {"prose", "easy-vqa-chat"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[data]]\ntype = "easy-vqa"\nlimt = 3\n')
    with pytest.raises(RecipeError, match="bad.toml:3"):
        read_calib_recipe(bad)
    res = CliRunner().invoke(main, ["quantize", str(tmp_path), str(tmp_path / "q"), "--calib-recipe", str(bad)])
    assert res.exit_code == 2 and "limt" in res.output
