"""`lavin-edge quantize`: GPTQ 4-bit of a merged model's LLM linears, calibrated through the adapted model."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(name="quantize")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--bits", default=4, show_default=True, type=click.Choice(["4"]), help="Weight bits.")
@click.option("--group-size", default=128, show_default=True, type=click.Choice(["32", "64", "128", "-1"]),
              help="Input rows per scale/zero group (-1: one group per output channel).")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric (zero 8) or asymmetric grid.")
@click.option("--desc-act", is_flag=True, help="Act-order: quantize inputs by decreasing activation energy.")
@click.option("--static-groups", is_flag=True, help="With --desc-act, fix group grids before any update.")
@click.option("--damp", default=0.05, show_default=True, type=float, help="Dampening, fraction of mean diag(H).")
@click.option("--mse", default=0.0, show_default=True, type=float,
              help="Clipping search per group minimising sum |err|^MSE (2.4 in the GPTQ paper's code; 0: off).")
@click.option("--asym-calib", default=0.25, show_default=True, type=float,
              help="Aim each linear at the full-precision model's output rather than the partly quantized one's "
              "(GPTQv2's asymmetric calibration), step in [0, 1]; 0: plain GPTQ. Costs a second forward pass.")
@click.option("--block-size", default=128, show_default=True, type=int, help="GPTQ lazy-update block size.")
@click.option("--calib-samples", default=64, show_default=True, type=int, help="Calibration sequences.")
@click.option("--calib-len", default=128, show_default=True, type=int, help="Tokens per calibration sequence.")
@click.option("--text-fraction", default=0.25, show_default=True, type=float,
              help="Share of text-only calibration sequences (the rest carry an image; on the easy-vqa demo 0.25 "
              "kept accuracy where 0.5 lost 10 points, docs/quantization.md).")
@click.option("--calib-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text-modality calibration paragraphs (blank-line separated). Default: stdlib docstrings.")
@click.option("--modalities", default="text,image", show_default=True,
              help="Modalities the model serves; calibration must cover each.")
@click.option("--eval-texts", default=40, show_default=True, type=int,
              help="Held-out paragraphs for perplexity fp vs 4-bit (0: skip).")
@click.option("--eval-vqa", default=0, show_default=True, type=int,
              help="Held-out easy-vqa test questions for accuracy fp vs 4-bit (0: skip).")
@click.option("--seed", default=0, show_default=True, type=int)
def command(model_dir: str, out: str, bits: str, group_size: str, sym: bool, desc_act: bool, static_groups: bool,
            damp: float, mse: float, asym_calib: float, block_size: int, calib_samples: int, calib_len: int,
            text_fraction: float, calib_text: str | None, modalities: str, eval_texts: int, eval_vqa: int,
            seed: int) -> None:
    """Quantize MODEL_DIR (a merged model) into OUT with GPTQ, then print quality fp vs 4-bit."""
    import copy

    import torch

    from lavin_edge.io.tokenizer import load_tokenizer
    from lavin_edge.merge import ModelDirError, load_merged, tokenizer_path
    from lavin_edge.quantize.pipeline import CalibrationError, GPTQConfig, quantize_model, save_quantized
    from lavin_edge.quantize.quality import compare, packed_text_samples, record_samples, stdlib_paragraphs

    torch.manual_seed(seed)
    qcfg = GPTQConfig(bits=int(bits), group_size=int(group_size), sym=sym, desc_act=desc_act,
                      static_groups=static_groups, damp_percent=damp, block_size=block_size, mse=mse,
                      asym_calib=asym_calib)
    mods = tuple(m.strip() for m in modalities.split(",") if m.strip())
    try:
        if any(m not in ("text", "image") for m in mods):
            raise ValueError(f"--modalities takes text and/or image, got {modalities!r}")
        if not 0 <= text_fraction <= 1:
            raise ValueError(f"--text-fraction must lie in [0, 1], got {text_fraction}")
        model, mcfg = load_merged(model_dir)
        qcfg.validate(model)  # shapes and settings: fail before loading any calibration data
        tok_path = tokenizer_path(model_dir, mcfg)
        if tok_path is None:
            raise ModelDirError(f"{model_dir}: config.json records no tokenizer")
        tok = load_tokenizer(tok_path)
    except (ModelDirError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None

    n_text = round(calib_samples * text_fraction) if "text" in mods else 0
    n_img = calib_samples - n_text if "image" in mods else 0
    texts = (Path(calib_text).read_text().split("\n\n") if calib_text else stdlib_paragraphs("calibration"))
    texts = [t.strip() for t in texts if t.strip()]
    samples = packed_text_samples(tok, texts, n_text, calib_len) if n_text else []
    if n_img:
        from lavin_edge.data.sources import Problems, load_easy_vqa

        # The demo's training data, through the vision tower and the folded adapters.
        recs = load_easy_vqa("train", Problems(), "open", limit=n_img, seed=seed)
        samples += record_samples(recs, tok, model.n_visual, model.cfg.vision.image_size, calib_len)
    click.echo(f"calibration: {len(samples)} sequences ({sum(s.image is None for s in samples)} text, "
               f"{sum(s.image is not None for s in samples)} image), {sum(len(s.input_ids) for s in samples)} tokens")
    fp = copy.deepcopy(model) if (eval_texts or eval_vqa) else None
    try:
        packed, report = quantize_model(model, samples, qcfg, mods)
    except (CalibrationError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    mcfg["_dir"] = str(Path(model_dir).resolve())
    path = save_quantized(model, packed, mcfg, qcfg, out, tok_path, report)
    better = sum(r.gptq_error < r.rtn_error for r in report.linears)
    click.echo(f"quantized {len(report.linears)} linears in {report.seconds:.1f} s -> {path}")
    click.echo(f"  GPTQ output error below RTN's on {better}/{len(report.linears)} linears; "
               f"sum GPTQ {sum(r.gptq_error for r in report.linears):.4g} vs RTN "
               f"{sum(r.rtn_error for r in report.linears):.4g}")
    if fp is not None:
        records = []
        if eval_vqa:
            from lavin_edge.data.sources import Problems, load_easy_vqa

            records = load_easy_vqa("test", Problems(), "open", limit=eval_vqa, seed=seed)
        quality = compare(fp, model, tok, stdlib_paragraphs("heldout")[:eval_texts], records)
        for k, v in quality.items():
            click.echo(f"  {k:<16} {v:.4f}")
        rep = json.loads((path / "quantize_report.json").read_text())
        rep["quality"] = quality
        (path / "quantize_report.json").write_text(json.dumps(rep, indent=2) + "\n")
