"""The EfficientNet-Lite0 tower, its routed adapters and the visual projection on NumPy arrays: the vision half
of the engine that runs without PyTorch (``lavin_edge.runtime.numpy_engine``).

The reference is the PyTorch tower (``lavin_edge.model.efficientnet``, whose docstring has the architecture);
tests/test_numpy_engine.py holds the two together. What differs is only how the arithmetic is laid out:

- activations are channels-first [C, H, W] of one image;
- BatchNorm (inference statistics) is folded into a per-channel scale and shift at load;
- a 1x1 convolution is a matrix product over the flattened positions; the depthwise kxk convolution sums k x k
  strided views of the padded map, each times its per-channel weight; the 3x3 stem gathers its 27 inputs per
  output position (``sliding_window_view``) and multiplies once;
- padding is TensorFlow's "SAME" (the odd extra pixel at the bottom/right), as in the reference;
- each block's routed adapter runs on the extension's per-token kernel (``vit_adapter``), the same call the
  PyTorch tower makes through ``lavin_edge.runtime.vision``, over the block input's positions as tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lavin_edge.config import AdapterConfig, VisionConfig
from lavin_edge.model.efficientnet_lite0 import BN_EPS, LITE0_STAGES, TOKEN_STAGES


def _same_pad(x: np.ndarray, k: int, s: int) -> np.ndarray:
    _, ih, iw = x.shape
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    if not (ph or pw):
        return x
    return np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))


def _bn(sd: Mapping[str, np.ndarray], p: str) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm ``p`` as y = x * scale + shift per channel."""
    scale = sd[p + ".weight"] / np.sqrt(sd[p + ".running_var"] + BN_EPS)
    return scale.astype(np.float32), (sd[p + ".bias"] - sd[p + ".running_mean"] * scale).astype(np.float32)


@dataclass
class _Block:
    expand: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # weight [mid, cin], bn scale, bn shift
    depthwise: tuple[np.ndarray, np.ndarray, np.ndarray]  # weight [mid, k, k], bn scale, bn shift
    project: tuple[np.ndarray, np.ndarray, np.ndarray]  # weight [cout, mid], bn scale, bn shift
    kernel: int
    stride: int
    skip: bool
    adapter: tuple[np.ndarray, ...] | None  # A, a, R, rb, B, b, Dw, d (fp32, contiguous)


class NumpyVision:
    """``tokens(image)``: a preprocessed image [3, S, S] fp32 -> the visual token embeddings [6, llm dim]."""

    def __init__(self, vision: VisionConfig, adapter: AdapterConfig, sd: Mapping[str, np.ndarray],
                 ext: Any, isa: str, threads: int) -> None:
        if vision.kind != "efficientnet" or vision.variant not in ("lite0", ""):
            raise ValueError(f"the NumPy tower is EfficientNet-Lite0 only, not {vision.kind} {vision.variant}")
        f32 = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items() if v.dtype != np.int64}
        self.ext, self.isa, self.threads = ext, isa, threads
        self.temperature, self.scale = float(adapter.temperature), float(adapter.scale)
        v = {k.removeprefix("vision."): t for k, t in f32.items() if k.startswith("vision.")}
        self.stem = (v["_conv_stem.weight"].reshape(v["_conv_stem.weight"].shape[0], -1), *_bn(v, "_bn0"))
        self.blocks: list[_Block] = []
        self.token_blocks: list[int] = []
        cin = self.stem[0].shape[0]
        for s, (expand, k, stride, cout, repeats) in enumerate(LITE0_STAGES):
            for r in range(repeats):
                p = f"_blocks.{len(self.blocks)}."
                exp = None
                if expand != 1:
                    exp = (v[p + "_expand_conv.weight"][:, :, 0, 0].copy(), *_bn(v, p + "_bn0"))
                dw = (v[p + "_depthwise_conv.weight"][:, 0].copy(), *_bn(v, p + "_bn1"))
                proj = (v[p + "_project_conv.weight"][:, :, 0, 0].copy(), *_bn(v, p + "_bn2"))
                ad = None
                if p + "adapter.down.weight" in v:
                    ad = tuple(np.ascontiguousarray(v[p + "adapter." + n]) for n in (
                        "down.weight", "down.bias", "router.weight", "router.bias", "up_b.weight", "up_b.bias",
                        "up_d.weight", "up_d.bias"))
                st = stride if r == 0 else 1
                self.blocks.append(_Block(exp, dw, proj, k, st, st == 1 and cin == cout, ad))
                cin = cout
            if s in TOKEN_STAGES:
                self.token_blocks.append(len(self.blocks) - 1)
        self.head = (v["_conv_head.weight"][:, :, 0, 0].copy(), *_bn(v, "_bn1"))
        n_tokens = len(TOKEN_STAGES) + 1
        self.proj_in = [(f32[f"visual_proj.inp.{i}.weight"], f32[f"visual_proj.inp.{i}.bias"])
                        for i in range(n_tokens)]
        self.proj_out = (f32["visual_proj.out.weight"], f32["visual_proj.out.bias"])

    def _adapter(self, x: np.ndarray, w: tuple[np.ndarray, ...]) -> np.ndarray:
        """The block's routed adapter on every position of x [C, H, W] (channels-last tokens)."""
        c, h, wd = x.shape
        tokens = np.ascontiguousarray(x.reshape(c, h * wd).T)
        out = np.empty_like(tokens)
        self.ext.vit_adapter(self.isa, tokens.ctypes.data, out.ctypes.data, h * wd, c, w[0].shape[0],
                             *(t.ctypes.data for t in w), self.temperature, self.scale, self.threads)
        return np.ascontiguousarray(out.T).reshape(c, h, wd)

    @staticmethod
    def _pointwise(x: np.ndarray, w: tuple[np.ndarray, np.ndarray, np.ndarray], relu6: bool) -> np.ndarray:
        c, h, wd = x.shape
        y = (w[0] @ x.reshape(c, h * wd)).reshape(-1, h, wd)
        y = y * w[1][:, None, None] + w[2][:, None, None]
        return np.clip(y, 0.0, 6.0) if relu6 else y

    @staticmethod
    def _depthwise(x: np.ndarray, w: tuple[np.ndarray, np.ndarray, np.ndarray], k: int, s: int) -> np.ndarray:
        c, ih, iw = x.shape
        oh, ow = math.ceil(ih / s), math.ceil(iw / s)
        xp = _same_pad(x, k, s)
        y = np.zeros((c, oh, ow), dtype=np.float32)
        for a in range(k):
            for b in range(k):
                y += xp[:, a:a + s * (oh - 1) + 1:s, b:b + s * (ow - 1) + 1:s] * w[0][:, a, b, None, None]
        return np.clip(y * w[1][:, None, None] + w[2][:, None, None], 0.0, 6.0)

    def _stem(self, x: np.ndarray) -> np.ndarray:
        w, scale, shift = self.stem
        k, s = 3, 2
        oh, ow = math.ceil(x.shape[1] / s), math.ceil(x.shape[2] / s)
        win = np.lib.stride_tricks.sliding_window_view(_same_pad(x, k, s), (k, k), axis=(1, 2))[:, ::s, ::s]
        cols = win[:, :oh, :ow].transpose(1, 2, 0, 3, 4).reshape(oh * ow, -1)  # [positions, c*k*k]
        y = (cols @ w.T).T.reshape(-1, oh, ow)
        return np.clip(y * scale[:, None, None] + shift[:, None, None], 0.0, 6.0)

    def tokens(self, image: np.ndarray) -> np.ndarray:
        x = self._stem(np.asarray(image, dtype=np.float32))
        pooled: list[np.ndarray] = []
        for i, blk in enumerate(self.blocks):
            if blk.adapter is not None:
                x = self._adapter(x, blk.adapter)
            h = self._pointwise(x, blk.expand, True) if blk.expand is not None else x
            h = self._depthwise(h, blk.depthwise, blk.kernel, blk.stride)
            h = self._pointwise(h, blk.project, False)
            x = h + x if blk.skip else h
            if i in self.token_blocks:
                pooled.append(x.max(axis=(1, 2)))
        pooled.append(self._pointwise(x, self.head, True).mean(axis=(1, 2)))
        hidden = np.stack([w @ t + b for (w, b), t in zip(self.proj_in, pooled, strict=True)])
        hidden = hidden / (1.0 + np.exp(-hidden))  # SiLU
        return (hidden @ self.proj_out[0].T + self.proj_out[1]).astype(np.float32)
