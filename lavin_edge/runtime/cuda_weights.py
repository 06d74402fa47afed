"""A model's weights on one device for the CUDA engine (``lavin_edge.runtime.cuda_engine``), loaded once.

4-bit GPTQ linears are repacked at load (``lavin_edge.kernels.cuda.prepare_w4_cuda``); fp linears (a merged
fp model) are kept as fp16 matrices. Linears sharing an input (q|k|v, gate|up) are one ``DeviceLinear``: one
4-bit weight when their packings concatenate exactly (same g_idx), else parts whose outputs the kernel adds into
column slices of one zeroed output. Norms (+ folded adapters) are ``CudaNormAdapter``s; a bare RMSNorm is one
with a zero rank-1 adapter (exactly the norm). The head is the fp table as fp16, its top candidates re-scored
in fp32 (``DeviceHead``). The vision tower runs in fp16 with its routed adapters on the kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lavin_edge.config import LavinConfig
from lavin_edge.kernels.cuda import (
    CudaNormAdapter,
    CudaW4,
    dequantize_w4,
    norm_adapter,
    prepare_norm_adapter_cuda,
    prepare_w4_cuda,
    w4_linear,
)
from lavin_edge.kernels.gptq_format import GPTQTensors
from lavin_edge.modeldir import HEAD_RESCORE_TOP, LINEAR_NAMES, ModelDirError, take_linear

Part = CudaW4 | torch.Tensor  # a prepared 4-bit weight, or an fp16 [n, k] matrix


class DeviceLinear:
    """y = x W^T for fp16 rows x [m, K] on the device; ``parts`` side by side along the outputs.

    ``__call__`` is the decode path (the W4 GEMV kernel; with ``out`` the product is ADDED into it, e.g. the
    fp32 residual); ``prefill`` dequantizes the 4-bit parts into ``scratch`` (fp16, at least n_out x K) and
    runs one ``torch.matmul``, the path for many rows."""

    def __init__(self, parts: list[Part], n_out: list[int], n_in: int) -> None:
        self.parts = parts
        self.n_in = n_in
        self.n_out = sum(n_out)
        self.bounds = [(sum(n_out[:i]), sum(n_out[:i + 1])) for i in range(len(parts))]
        self.nbytes = sum(_nbytes(p) for p in parts)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.parts) == 1 and out is None:
            return _apply(self.parts[0], x, None)
        if out is None:
            out = x.new_zeros(x.shape[0], self.n_out)
        for p, (a, b) in zip(self.parts, self.bounds, strict=True):
            _apply(p, x, out if len(self.parts) == 1 else out[:, a:b])
        return out

    def prefill(self, x: torch.Tensor, scratch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.parts) == 1 and isinstance(self.parts[0], torch.Tensor):
            w = self.parts[0]
        else:
            w = scratch[:self.n_out * self.n_in].view(self.n_out, self.n_in)
            for p, (a, b) in zip(self.parts, self.bounds, strict=True):
                if isinstance(p, torch.Tensor):
                    w[a:b].copy_(p)
                else:
                    dequantize_w4(p, out=w[a:b])
        y = torch.matmul(x, w.t())
        if out is None:
            return y
        return out.add_(y)


def _apply(p: Part, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        y = F.linear(x, p)
        return y if out is None else out.add_(y)
    return w4_linear(x, p, out)


def _nbytes(p: Part) -> int:
    if isinstance(p, torch.Tensor):
        return p.numel() * p.element_size()
    return int(getattr(p, "nbytes", 0))


def device_linear(parts: list[torch.Tensor | GPTQTensors], device: torch.device) -> DeviceLinear:
    """One ``DeviceLinear`` for linears sharing their input, weights moved to ``device``."""
    n_in = _shape(parts[0])[1]
    if all(isinstance(p, GPTQTensors) for p in parts) and len(parts) > 1:
        cat = GPTQTensors.concat(parts)  # type: ignore[arg-type]
        if cat is not None:
            parts = [cat]
    elif all(isinstance(p, torch.Tensor) for p in parts) and len(parts) > 1:
        parts = [torch.cat(parts, 0)]  # type: ignore[arg-type]
    n_out = [_shape(p)[0] for p in parts]
    prepared: list[Part] = [prepare_w4_cuda(p, device) if isinstance(p, GPTQTensors)
                            else p.to(device, torch.float16).contiguous() for p in parts]
    return DeviceLinear(prepared, n_out, n_in)


def _shape(p: torch.Tensor | GPTQTensors) -> tuple[int, int]:
    if isinstance(p, GPTQTensors):
        return p.shape
    return tuple(p.shape)  # type: ignore[return-value]


class DeviceHead:
    """logits = n W^T for the fp head W [V, D] held in fp16: the fp16 product for every row, then the ``top``
    largest recomputed in fp32 from the same fp16 rows (the fp16 output rounding, about 1e-2 at a logit of 20,
    would otherwise decide near-ties), as the CPU engine's ``RescoredHead``. Fixed shapes: graph-capturable."""

    def __init__(self, weight: torch.Tensor, device: torch.device, top: int = HEAD_RESCORE_TOP) -> None:
        self.weight = weight.to(device, torch.float16).contiguous()
        self.top = min(top, self.weight.shape[0])
        self.nbytes = self.weight.numel() * 2

    def __call__(self, n: torch.Tensor) -> torch.Tensor:
        y = F.linear(n, self.weight).float()
        idx = y.topk(self.top, dim=-1).indices  # [m, top]
        exact = torch.bmm(self.weight[idx].float(), n.float()[:, :, None])[:, :, 0]
        return y.scatter_(-1, idx, exact)


@dataclass
class DeviceLayer:
    attn_in: CudaNormAdapter
    wqkv: DeviceLinear
    wo: DeviceLinear
    ffn_norm: CudaNormAdapter
    w13: DeviceLinear
    w2: DeviceLinear


@dataclass
class DeviceWeights:
    embed: torch.Tensor  # [V, D] in its stored dtype, on the device (rows are cast to fp32 on lookup)
    norm: CudaNormAdapter
    head: DeviceHead | DeviceLinear
    layers: list[DeviceLayer] = field(default_factory=list)
    vision: torch.nn.Module | None = None  # fp16 tower on the device
    visual_proj: torch.nn.Module | None = None

    def linears(self) -> list[DeviceLinear]:
        return [op for lyr in self.layers for op in (lyr.wqkv, lyr.wo, lyr.w13, lyr.w2)]

    def scratch_numel(self) -> int:
        """fp16 elements the prefill's dequantization scratch must hold (the largest fused linear)."""
        ops = self.linears() + ([self.head] if isinstance(self.head, DeviceLinear) else [])
        return max(op.n_out * op.n_in for op in ops)


def norm(sd: Mapping[str, torch.Tensor], g: str, eps: float, device: torch.device,
         ad: dict[str, torch.Tensor] | None = None) -> CudaNormAdapter:
    """RMSNorm * g + folded adapter (``ad``: down/up weights and biases), or a bare RMSNorm (``ad`` None)."""
    if ad is None:
        return prepare_norm_adapter_cuda(sd[g], None, None, None, None, eps, device)
    return prepare_norm_adapter_cuda(sd[g], ad["down.weight"], ad["down.bias"], ad["up.weight"], ad["up.bias"],
                                     eps, device)


def load_device_weights(cfg: LavinConfig, sd: Mapping[str, torch.Tensor], quant: dict[str, Any] | None,
                        device: torch.device) -> DeviceWeights:
    """The model's tensors (merged naming, ``llm.`` prefix optional) on ``device``."""
    llm = cfg.llm
    quant = quant or {"checkpoint_format": "gptq", "group_size": 128}
    if any(k.startswith("llm.") for k in sd):
        sd = {k.removeprefix("llm."): v for k, v in sd.items()}
    eps = llm.norm_eps
    try:
        embed = sd["tok_embeddings.weight"].to(device).contiguous()
        out = sd.get("output.weight") if not llm.tie_embeddings else None
        if "output.qweight" in sd:
            head: DeviceHead | DeviceLinear = device_linear([take_linear(sd, "output", quant)], device)
        else:
            head = DeviceHead(sd["tok_embeddings.weight"] if out is None else out, device)
        layers = []
        for i in range(llm.n_layers):
            p = f"layers.{i}."
            ad = {k: sd[p + "adapter." + k] for k in ("down.weight", "down.bias", "up.weight", "up.bias")}
            if ad["up.weight"].dim() != 3 or ad["up.weight"].shape[0] != 2:
                raise ModelDirError(f"{p}adapter.up.weight has shape {tuple(ad['up.weight'].shape)}, expected "
                                    "[2, D, r] (routing folded per modality): not a merged model")
            lin = {n: take_linear(sd, p + n, quant) for n in LINEAR_NAMES}
            layers.append(DeviceLayer(
                attn_in=norm(sd, p + "attention_norm.weight", eps, device, ad),
                wqkv=device_linear([lin["attention.wq"], lin["attention.wk"], lin["attention.wv"]], device),
                wo=device_linear([lin["attention.wo"]], device),
                ffn_norm=norm(sd, p + "ffn_norm.weight", eps, device),
                w13=device_linear([lin["feed_forward.w1"], lin["feed_forward.w3"]], device),
                w2=device_linear([lin["feed_forward.w2"]], device)))
        final = norm(sd, "norm.weight", eps, device)
    except KeyError as e:
        raise ModelDirError(f"tensor {e} missing from the model") from e
    vision, proj = device_vision(cfg, sd, device)
    return DeviceWeights(embed, final, head, layers, vision, proj)


def device_vision(cfg: LavinConfig, sd: Mapping[str, torch.Tensor], device: torch.device
                  ) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """The vision tower and projection as the CPU engine loads them (``runtime.loader``), then in fp16 on
    ``device``; the routed adapters keep fp32 weights and run on the kernel (fp16 activations on CUDA)."""
    from lavin_edge.model.adapter import RoutedAdapter
    from lavin_edge.runtime.backends import ReferenceBackend
    from lavin_edge.runtime.loader import vision_modules
    from lavin_edge.runtime.vision import route_adapters_through_kernel

    tower, proj = vision_modules(cfg, sd, ReferenceBackend())
    if tower is None or proj is None:
        return None, None
    from lavin_edge.kernels.dispatch import extension

    if extension() is not None:
        tower = route_adapters_through_kernel(tower)
    tower = tower.to(device).half()
    for m in tower.modules():
        if isinstance(m, RoutedAdapter):
            m.float()  # the kernel's weights are fp32; its activations fp16 on CUDA
    return tower, proj.to(device).half()


def apply_norm(w: CudaNormAdapter, x: torch.Tensor, row_modality: torch.Tensor) -> torch.Tensor:
    """fp16 normed rows of the fp32 residual ``x`` (``row_modality`` int32, one entry per row)."""
    return norm_adapter(x, w, row_modality)
