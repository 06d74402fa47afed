"""`lavin-edge quantize`: GPTQ 4-bit of a merged model's LLM linears, calibrated through the adapted model."""

from __future__ import annotations

import sys

import click


@click.command(name="quantize")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--bits", default="4", show_default=True, type=click.Choice(["4"]), help="Weight bits.")
@click.option("--group-size", default="auto", show_default=True, type=click.Choice(["auto", "32", "64", "128", "-1"]),
              help="Input rows per scale/zero group (-1: one group per output channel). auto: the largest of "
              "128, 64, 32 that divides every linear's input width (64 for the demo's SmolLM2, 576 wide); printed.")
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
@click.option("--calib-recipe", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibrate on the [[data]] tables of this training recipe (your training data: its text-only "
              "records for the text share, its image records for the rest) instead of docstrings and easy-vqa.")
@click.option("--modalities", default="text,image", show_default=True,
              help="Modalities the model serves; calibration must cover each.")
@click.option("--eval-texts", default=40, show_default=True, type=int,
              help="Held-out paragraphs for perplexity fp vs 4-bit (0: skip).")
@click.option("--eval-vqa", default=0, show_default=True, type=int,
              help="Held-out easy-vqa test questions for accuracy fp vs 4-bit (0: skip).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it holds an earlier merged or quantized model (the old one stays in place until "
                   "the new one is complete); a directory of anything else is refused, never deleted.")
def command(model_dir: str, out: str, bits: str, group_size: str, sym: bool, desc_act: bool, static_groups: bool,
            damp: float, mse: float, asym_calib: float, block_size: int, calib_samples: int, calib_len: int,
            text_fraction: float, calib_text: str | None, calib_recipe: str | None, modalities: str,
            eval_texts: int, eval_vqa: int, seed: int, overwrite: bool) -> None:
    """Quantize MODEL_DIR (a merged model) into OUT with GPTQ, then print quality fp vs 4-bit.

    OUT is written all or nothing: an interrupted run leaves the previous OUT (or none), and the next run into
    OUT removes the temporary directory it left."""
    from lavin_edge.quantize.run import QuantizeOptions, quantize_dir, read_calib_recipe

    try:
        opts = QuantizeOptions(
            bits=int(bits), group_size=None if group_size == "auto" else int(group_size), sym=sym,
            desc_act=desc_act, static_groups=static_groups, damp=damp, mse=mse, asym_calib=asym_calib,
            block_size=block_size, calib_samples=calib_samples, calib_len=calib_len, text_fraction=text_fraction,
            calib_text=calib_text, calib_data=read_calib_recipe(calib_recipe) if calib_recipe else None,
            modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()), eval_texts=eval_texts,
            eval_vqa=eval_vqa, seed=seed)
        quantize_dir(model_dir, out, opts, overwrite=overwrite, echo=click.echo)
    except (ValueError, FileNotFoundError) as e:  # ModelDirError, RecipeError, CalibrationError, bad settings
        click.echo(f"error: {e}", err=True)  # one line, exit 2: bad input, not a crash
        sys.exit(2)
