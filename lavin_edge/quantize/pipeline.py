"""The layer-by-layer GPTQ driver over a merged LaVIN.

Calibration samples go through the adapted model (folded adapters active, both modalities, images through
the vision tower) to the input of LLM layer 0. Then, for each layer l in turn, the inputs of layer l are
the outputs of the already-quantized layers 0..l-1, so each layer corrects for the error upstream. Inside
a layer the linears are quantized in execution order (true sequential): {wq, wk, wv} (they share one input
and one Hessian), then wo, then {w1, w3}, then w2, each group's Hessian built from inputs that already pass
through the quantized earlier groups. Only one Hessian lives at a time.

Reproducible: the calibration forward, the Hessians and GPTQ run in fp64 (``CALIB_DTYPE``; the model is widened
exactly for the run and restored), and only discrete results leave it (4-bit codes, zero points, fp16 scales,
the dequantized weights they define). The CPU's SIMD kernels, BLAS code path and thread count change the fp64
values in their last bits only, so the output is the same bytes unless one of them lies that close to a
rounding boundary (docs/reproducibility.md).

The quantized directory it leads to is written and read by ``lavin_edge.quantize.files``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lavin_edge.kernels.gptq_format import FORMATS, dequantize_packed, pack_linear
from lavin_edge.model.merged import MergedLaVIN
from lavin_edge.quantize.calibration import (
    CALIB_DTYPE,
    CalibSample,
    capture_hook,
    get_linear,
    hessian_hook,
    layer_inputs,
    run_layer,
    run_layer_replaying,
)
from lavin_edge.quantize.gptq import (
    SUPPORTED_GROUP_SIZES,
    HessianAccumulator,
    asymmetric_target,
    check_group_size,
    gptq_quantize,
    output_error,
    output_error_vs_fp,
    rtn_quantize,
)

# Execution order inside a block; names in one group read the same input (one Hessian).
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("attention.wq", "attention.wk", "attention.wv"),
    ("attention.wo",),
    ("feed_forward.w1", "feed_forward.w3"),
    ("feed_forward.w2",),
)
LINEAR_NAMES = tuple(n for g in SEQUENTIAL_GROUPS for n in g)


class CalibrationError(ValueError):
    """Calibration data that cannot serve: empty, a missing modality, an image that does not fit."""


@dataclass
class GPTQConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.05
    damp_increment: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    # > 0: search a clipped range per group, minimising sum |error|^mse (2.4 in the GPTQ paper's code); 0: min/max.
    mse: float = 0.0
    # > 0: aim each linear at the full-precision model's output, not the partly quantized model's
    # (``asymmetric_target``; GPTQv2's asymmetric calibration), with this step size; 0: plain GPTQ.
    # 0.25 (GPTQv2's default too): on SmolLM2 g64 sym it cut the perplexity rise from +16% to +10%, where
    # 0.5 gave +10.2% and 1.0 +12.9% (docs/quantization.md).
    asym_calib: float = 0.25
    # None: "gptq" (v1) when symmetric; "gptq_v2" when asymmetric, since v1 cannot store a zero point of 0.
    checkpoint_format: str | None = None

    @property
    def format(self) -> str:
        return self.checkpoint_format or ("gptq" if self.sym else "gptq_v2")

    def validate(self, model: MergedLaVIN) -> None:
        """Every error a run could hit on shapes or settings, raised before any work."""
        if self.bits != 4:
            raise ValueError(f"only 4-bit is supported (the kernels and the int32 packing), got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"unsupported group size {self.group_size}; choose from {list(SUPPORTED_GROUP_SIZES)}")
        if self.format not in FORMATS:
            raise ValueError(f"unknown checkpoint_format {self.format!r}; choose from {FORMATS}")
        if self.format == "gptq" and not self.sym:
            raise ValueError("asymmetric quantization needs checkpoint_format gptq_v2 (v1 stores zero - 1)")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must lie in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block size must be positive, got {self.block_size}")
        if not 0 <= self.asym_calib <= 1:
            raise ValueError(f"asym_calib must lie in [0, 1], got {self.asym_calib}")
        layer = model.llm.layers[0]
        for name in LINEAR_NAMES:
            n, k = get_linear(layer, name).weight.shape
            try:
                check_group_size(k, self.group_size)
            except ValueError as e:
                raise ValueError(f"{name} [{n} x {k}]: {e}") from None
            if k % 8 or n % 8:
                raise ValueError(f"{name} [{n} x {k}]: both dims must be multiples of 8 for int32 packing")

    def quantization_config(self) -> dict[str, Any]:
        """The standard ``quantization_config`` / ``quantize_config.json`` content."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "damp_percent": self.damp_percent,
            "true_sequential": self.true_sequential,
            "mse": self.mse,
            "asym_calib": self.asym_calib,
            "checkpoint_format": self.format,
            "pack_dtype": "int32",
            "lm_head": False,
            "modules": [f"layers.*.{n}" for n in LINEAR_NAMES],
        }


def check_calibration(samples: list[CalibSample], model: MergedLaVIN,
                      modalities: tuple[str, ...] = ("text", "image")) -> None:
    """Refuse calibration data that does not match the model or misses a modality it will serve."""
    if not samples:
        raise CalibrationError("no calibration samples")
    size = model.cfg.vision.image_size
    for i, s in enumerate(samples):
        if len(s.input_ids) < 2:
            raise CalibrationError(f"sample {i}: fewer than 2 tokens")
        if len(s.input_ids) > model.llm.capacity:
            raise CalibrationError(f"sample {i}: {len(s.input_ids)} tokens exceed the context {model.llm.capacity}")
        if s.image_pos >= 0:
            if s.image is None:
                raise CalibrationError(f"sample {i}: image placeholders at {s.image_pos} but no image")
            if tuple(s.image.shape) != (3, size, size):
                raise CalibrationError(f"sample {i}: image shape {tuple(s.image.shape)}, the vision tower takes "
                                       f"(3, {size}, {size})")
            if s.image_pos + model.n_visual > len(s.input_ids):
                raise CalibrationError(f"sample {i}: {model.n_visual} visual tokens at {s.image_pos} overrun "
                                       f"the {len(s.input_ids)}-token sequence")
        elif s.image is not None:
            raise CalibrationError(f"sample {i}: an image but no placeholder position (image_pos = -1)")
    have = {s.modality for s in samples}
    for m in modalities:
        if m not in have:
            raise CalibrationError(f"calibration data has no {m} samples; the model serves {list(modalities)} "
                                   f"and GPTQ must see the activations of each (found only {sorted(have)})")


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    # Mean squared output error on the calibration inputs of this linear: against w on the same inputs, or
    # with asym_calib against the fp model's output (w on the fp model's inputs).
    gptq_error: float
    rtn_error: float  # the same for round-to-nearest of w on the same grid
    damp: float
    seconds: float


@dataclass
class QuantizeReport:
    config: dict[str, Any]
    n_samples: int
    n_tokens: int
    linears: list[LinearReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The linears whose inputs differ: q|k|v share one input, w1|w3 another.
INPUT_READERS = ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2")


@torch.no_grad()
def quantize_model(model: MergedLaVIN, samples: list[CalibSample], qcfg: GPTQConfig,
                   modalities: tuple[str, ...] = ("text", "image"), progress: bool = True
                   ) -> tuple[dict[str, torch.Tensor], QuantizeReport]:
    """GPTQ every LLM linear of ``model`` in place (its weights become the dequantized 4-bit values, as served)
    and return the packed tensors ``{layers.{i}.{name}.{qweight,qzeros,scales,g_idx}}`` and a report.

    The work runs in ``CALIB_DTYPE`` (fp64): ``model`` is widened for the run and narrowed back after, exactly
    (its other weights come from that dtype; the quantized ones are fp16 scales times 4-bit ints)."""
    dtype = model.llm.tok_embeddings.weight.dtype
    model.to(CALIB_DTYPE)
    try:
        return _quantize_layers(model, samples, qcfg, modalities, progress)
    finally:
        model.to(dtype)


def _quantize_layers(model: MergedLaVIN, samples: list[CalibSample], qcfg: GPTQConfig,
                     modalities: tuple[str, ...], progress: bool) -> tuple[dict[str, torch.Tensor], QuantizeReport]:
    """``quantize_model``'s layer-by-layer walk, on a model already in ``CALIB_DTYPE``."""
    from tqdm.auto import tqdm

    qcfg.validate(model)
    check_calibration(samples, model, modalities)
    model.eval()
    t0 = time.time()
    inputs = layer_inputs(model, samples)
    # Asymmetric calibration follows the fp model alongside: its hidden states at the current layer.
    fp_states = [h for h, _ in inputs] if qcfg.asym_calib > 0 else None
    report = QuantizeReport(qcfg.quantization_config(), len(samples), sum(len(s.input_ids) for s in samples))
    packed: dict[str, torch.Tensor] = {}
    groups = SEQUENTIAL_GROUPS if qcfg.true_sequential else (LINEAR_NAMES,)
    n_layers = len(model.llm.layers)
    bar = tqdm(range(n_layers), desc="GPTQ", unit="layer", disable=not progress)
    for i in bar:
        layer = model.llm.layers[i]
        fp_in: dict[str, list[torch.Tensor]] = {}
        if fp_states is not None:
            # One pass of the layer while it is still fp, on the fp model's states: the fp input of every
            # reader, and the fp model's states for the next layer.
            fp_in = {name: [] for name in INPUT_READERS}
            fp_handles = [get_linear(layer, n).register_forward_pre_hook(capture_hook(fp_in[n])) for n in fp_in]
            try:
                fp_states = run_layer(model, i, [(h, m) for h, (_, m) in zip(fp_states, inputs, strict=True)])
            finally:
                for hnd in fp_handles:
                    hnd.remove()
        hessians: dict[str, HessianAccumulator] = {}
        # True sequential: outputs of the linears quantized so far, on the current inputs (replayed, not rerun).
        cached: dict[str, list[torch.Tensor]] = {}
        done: tuple[str, ...] = ()
        for group in groups:
            # One accumulator per distinct input (only the group's first linear when they share one).
            readers = [group[0]] if qcfg.true_sequential else [n for n in group if n in INPUT_READERS]
            handles = []
            for name in readers:
                lin = get_linear(layer, name)
                fp_x = fp_in.pop(name, None)
                acc = HessianAccumulator(lin.in_features, cross=fp_x is not None, dtype=CALIB_DTYPE)
                hessians[name] = acc
                # True sequential reads one input per pass: stop the layer there (up to 2.5x fewer flops).
                handles.append(lin.register_forward_pre_hook(hessian_hook(acc, qcfg.true_sequential, fp_x)))
            try:
                if qcfg.true_sequential:
                    run_layer_replaying(model, i, inputs, cached, tuple(n for n in done if n not in cached))
                else:
                    run_layer(model, i, inputs)
            finally:
                for hnd in handles:
                    hnd.remove()
            done += group
            for name in group:
                source = {"attention.wk": "attention.wq", "attention.wv": "attention.wq",
                          "feed_forward.w3": "feed_forward.w1"}.get(name, name)
                tensors, rep = _quantize_linear(get_linear(layer, name), hessians[source], qcfg, f"layers.{i}.{name}")
                report.linears.append(rep)
                for suffix, t in tensors.items():
                    packed[f"layers.{i}.{name}.{suffix}"] = t
            if qcfg.true_sequential:
                hessians.clear()  # one Hessian at a time
        hessians.clear()
        outs = run_layer_replaying(model, i, inputs, cached, ()) if qcfg.true_sequential else run_layer(
            model, i, inputs)
        inputs = [(o, m) for o, (_, m) in zip(outs, inputs, strict=True)]
        last = report.linears[-len(LINEAR_NAMES):]
        bar.set_postfix(gptq=f"{sum(r.gptq_error for r in last):.3g}", rtn=f"{sum(r.rtn_error for r in last):.3g}")
    report.seconds = time.time() - t0
    return packed, report


@torch.no_grad()
def _quantize_linear(lin: nn.Linear, acc: HessianAccumulator, qcfg: GPTQConfig, name: str
                     ) -> tuple[dict[str, torch.Tensor], LinearReport]:
    """GPTQ on one linear with its input's Hessian (``acc``); its weight becomes what will be served (the packed
    codes dequantized, fp16 scales) for the passes that follow. Returns the packed tensors and the report line."""
    H, C, F = acc.H, acc.C, acc.F
    w = lin.weight.detach().to(CALIB_DTYPE)
    t1 = time.time()
    target = w if C is None else asymmetric_target(w, H, C, qcfg.asym_calib, qcfg.damp_percent)
    res = gptq_quantize(target, H, qcfg.bits, qcfg.group_size, qcfg.sym, qcfg.desc_act, qcfg.static_groups,
                        qcfg.damp_percent, qcfg.damp_increment, qcfg.block_size, qcfg.mse)
    tensors = pack_linear(res, qcfg.bits, qcfg.format)
    w_hat = dequantize_packed(tensors, qcfg.bits, qcfg.format)  # what will be served (fp16 scales)
    rtn = rtn_quantize(w, qcfg.bits, qcfg.group_size, qcfg.sym, qcfg.mse)
    rtn.scales = rtn.scales.half().float()
    if C is None or F is None:
        errors = output_error(w, w_hat, H), output_error(w, rtn.dequantize(), H)
    else:
        errors = output_error_vs_fp(w, w_hat, H, C, F), output_error_vs_fp(w, rtn.dequantize(), H, C, F)
    lin.weight.copy_(w_hat.to(lin.weight.dtype))
    return tensors, LinearReport(name, (w.shape[0], w.shape[1]), *errors, res.damp, time.time() - t1)


def auto_group_size(model: MergedLaVIN) -> int:
    """The largest of 128, 64, 32 that divides the input width of every LLM linear (-1 when none does)."""
    layer = model.llm.layers[0]
    widths = {get_linear(layer, name).weight.shape[1] for name in LINEAR_NAMES}
    return next((g for g in (128, 64, 32) if all(k % g == 0 for k in widths)), -1)


__all__ = ["CalibSample", "CalibrationError", "GPTQConfig", "QuantizeReport", "auto_group_size", "check_calibration",
           "quantize_model"]
