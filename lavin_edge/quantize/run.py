"""The ``quantize`` step as a library function: merged dir -> quantized dir (GPTQ 4-bit), quality fp vs 4-bit.

``lavin-edge quantize`` and the demo build both call :func:`quantize_dir`; it checks every argument and the
output before any model loads, calibrates on text and easy-vqa images through the adapted model, quantizes,
measures quality in memory, and only then writes the directory (all or nothing, ``lavin_edge.modeldir``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lavin_edge.io.outdir import OutputDirError, check_output
from lavin_edge.modeldir import ModelDirError

MODALITIES = ("text", "image")


@dataclass
class QuantizeOptions:
    """Everything ``quantize_dir`` takes besides the paths (the CLI options, same defaults)."""

    bits: int = 4
    group_size: int | None = None  # None: the largest of 128/64/32 dividing every input width
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp: float = 0.05
    mse: float = 0.0
    asym_calib: float = 0.25
    block_size: int = 128
    calib_samples: int = 64
    calib_len: int = 128
    text_fraction: float = 0.25
    calib_text: str | Path | None = None
    # [[data]] tables as in a training recipe (``--calib-recipe``): calibrate on that data, its text-only records
    # for the text share and its image records for the rest, instead of docstrings and easy-vqa questions.
    calib_data: list[dict[str, Any]] | None = None
    modalities: tuple[str, ...] = MODALITIES
    eval_texts: int = 40
    eval_vqa: int = 0
    seed: int = 0

    def check(self) -> None:
        """Bad settings as ValueError, before anything loads."""
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"--modalities takes text and/or image, got {','.join(self.modalities)!r}")
        if self.calib_data is not None and self.calib_text is not None:
            raise ValueError("--calib-recipe and --calib-text both name the text calibration: give one")
        if not 0 <= self.text_fraction <= 1:
            raise ValueError(f"--text-fraction must lie in [0, 1], got {self.text_fraction}")
        for name in ("calib_samples", "calib_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_texts", "eval_vqa"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 (skip) or more, got {getattr(self, name)}")


def quantize_dir(model_dir: str | Path, out: str | Path, opts: QuantizeOptions | None = None,
                 overwrite: bool = False, echo: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Quantize the merged directory ``model_dir`` into ``out``; returns (``out``, the report as written).

    Refused before any work (ModelDirError / ValueError): ``out`` is, contains or lies inside ``model_dir``;
    ``out`` exists and ``overwrite`` is off; a setting or the model's shapes do not fit."""
    from lavin_edge.data.prose import stdlib_paragraphs
    from lavin_edge.merge import load_merged
    from lavin_edge.modeldir import load_tokenizer_of
    from lavin_edge.quantize.files import save_quantized
    from lavin_edge.quantize.pipeline import GPTQConfig, auto_group_size, quantize_model
    from lavin_edge.quantize.quality import compare

    opts = opts or QuantizeOptions()
    opts.check()
    try:
        check_output(out, overwrite=overwrite, inputs=(model_dir,), what="quantize output")
    except OutputDirError as e:
        raise ModelDirError(str(e)) from None
    torch.manual_seed(opts.seed)
    model, mcfg = load_merged(model_dir)
    group_size = opts.group_size
    if group_size is None:
        group_size = auto_group_size(model)
        echo(f"group size {group_size} (the largest of 128/64/32 dividing every input width; --group-size to choose)")
    qcfg = GPTQConfig(bits=opts.bits, group_size=group_size, sym=opts.sym, desc_act=opts.desc_act,
                      static_groups=opts.static_groups, damp_percent=opts.damp, block_size=opts.block_size,
                      mse=opts.mse, asym_calib=opts.asym_calib)
    qcfg.validate(model)  # shapes and settings: fail before loading any calibration data
    if mcfg.get("tokenizer") is None:
        raise ModelDirError(f"{model_dir}: config.json records no tokenizer")
    tok = load_tokenizer_of(model_dir, mcfg)

    samples = calibration_samples(opts, tok, model.n_visual, model.cfg.vision.image_size)
    echo(f"calibration: {len(samples)} sequences ({sum(s.image is None for s in samples)} text, "
         f"{sum(s.image is not None for s in samples)} image), {sum(len(s.input_ids) for s in samples)} tokens")
    fp = copy.deepcopy(model) if (opts.eval_texts or opts.eval_vqa) else None
    packed, report = quantize_model(model, samples, qcfg, opts.modalities)
    better = sum(r.gptq_error < r.rtn_error for r in report.linears)
    echo(f"quantized {len(report.linears)} linears in {report.seconds:.1f} s")
    echo(f"  GPTQ output error below RTN's on {better}/{len(report.linears)} linears; "
         f"sum GPTQ {sum(r.gptq_error for r in report.linears):.4g} vs RTN "
         f"{sum(r.rtn_error for r in report.linears):.4g}")
    rep = report.to_dict()
    if fp is not None:
        records = []
        if opts.eval_vqa:
            from lavin_edge.data.easyvqa import load_easy_vqa
            from lavin_edge.data.records import Problems

            records = load_easy_vqa("test", Problems(), "open", limit=opts.eval_vqa, seed=opts.seed)
        quality = compare(fp, model, tok, stdlib_paragraphs("heldout")[:opts.eval_texts], records)
        for k, v in quality.items():
            echo(f"  {k:<16} {v:.4f}")
        rep["quality"] = quality
    mcfg["_dir"] = str(Path(model_dir).resolve())
    path = save_quantized(model, packed, mcfg, qcfg, out, tok, rep, overwrite=overwrite)
    echo(f"  -> {path}")
    return path, rep


def read_calib_recipe(path: str | Path) -> list[dict[str, Any]]:
    """The [[data]] tables of a training recipe, checked as ``lavin-edge train`` checks them (RecipeError)."""
    from lavin_edge.training.recipe import Locator, RecipeError, check_recipe, read_toml

    d, text = read_toml(path)
    if "data" not in d:
        raise RecipeError(f"{path}: no [[data]] tables to calibrate on")
    # text_loss comes along: the tables' own rules depend on it (a "prose" table needs "kl").
    check_recipe({"data": d["data"], "text_loss": d.get("text_loss", "ce")},
                 {"data": "list[dict[str, Any]]", "text_loss": "str"}, Locator(path, text))
    return list(d["data"])


def calibration_samples(opts: QuantizeOptions, tok: Any, n_visual: int, image_size: int) -> list[Any]:
    """``opts.calib_samples`` sequences, ``text_fraction`` of them text-only: from ``opts.calib_data`` (a recipe's
    [[data]] tables, sampled with ``seed``), else docstring prose (or ``calib_text``) and easy-vqa questions."""
    import random

    from lavin_edge.data.easyvqa import load_easy_vqa
    from lavin_edge.data.prose import stdlib_paragraphs
    from lavin_edge.data.records import Problems
    from lavin_edge.data.sources import load_source
    from lavin_edge.quantize.quality import packed_text_samples, record_samples

    mods = opts.modalities
    n_text = round(opts.calib_samples * opts.text_fraction) if "text" in mods else 0
    n_img = opts.calib_samples - n_text if "image" in mods else 0
    if opts.calib_data is not None:
        records = [r for spec in opts.calib_data for r in load_source(spec, Problems())]
        rng = random.Random(opts.seed)
        texts = [r for r in records if r.image is None]
        images = [r for r in records if r.image is not None]
        if len(texts) < n_text or len(images) < n_img:
            raise ValueError(f"--calib-recipe data holds {len(texts)} text-only and {len(images)} image records; "
                             f"calibration needs {n_text} and {n_img}")
        picked = rng.sample(texts, n_text) + rng.sample(images, n_img)
        return record_samples(picked, tok, n_visual, image_size, opts.calib_len)
    texts = (Path(opts.calib_text).read_text().split("\n\n") if opts.calib_text
             else stdlib_paragraphs("calibration"))
    texts = [t.strip() for t in texts if t.strip()]
    samples = packed_text_samples(tok, texts, n_text, opts.calib_len) if n_text else []
    if n_img:
        # The demo's training data, through the vision tower and the folded adapters.
        recs = load_easy_vqa("train", Problems(), "open", limit=n_img, seed=opts.seed)
        samples += record_samples(recs, tok, n_visual, image_size, opts.calib_len)
    return samples
