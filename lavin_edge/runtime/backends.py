"""Where the runtime's ops run: one set of ops (``lavin_edge.runtime.ops``), one backend per device.

- ``ReferenceBackend`` ("torch"): plain PyTorch, 4-bit weights dequantized at load. It is the reference
  every fast path is tested against, and the fallback without the extension.
- ``CpuBackend`` ("kernels"): the ``lavin_edge._C`` extension on the CPU: W4 GEMV/GEMM, the fused RMSNorm +
  folded adapter, the ViT's per-token routed adapter, and the one-call decode step (``native_decode``).

A backend builds ops from a model's tensors (the loader calls it) and, optionally, a native decode step
over a built model. A CUDA backend slots in beside these two with the same methods.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from lavin_edge.kernels.gptq_format import GPTQTensors
from lavin_edge.modeldir import ModelDirError
from lavin_edge.runtime.ops import (
    ConcatLinear,
    DenseLinear,
    LinearOp,
    NormAdapter,
    SumLinear,
    W4Linear,
)

if TYPE_CHECKING:
    from lavin_edge.runtime.native_decode import NativeDecode

BACKEND_NAMES = ("auto", "kernels", "torch")

Weight = torch.Tensor | GPTQTensors


class Backend:
    """Builds the ops of one device. ``name`` is what the engine reports; ``runs_w4``: 4-bit weights stay
    4-bit (so an fp head is worth quantizing at load)."""

    name = ""
    runs_w4 = False
    isa: str | None = None  # the native kernels' instruction set, None: ops run in PyTorch
    device = torch.device("cpu")  # where the model's state (KV cache, rotary table) is allocated

    def linear(self, w: Weight) -> LinearOp:
        if isinstance(w, torch.Tensor):
            return DenseLinear(w)
        return DenseLinear(w.dequantize())

    def fused_linear(self, parts: list[Weight]) -> LinearOp:
        """One op for several linears sharing the input (q|k|v, gate|up)."""
        if all(isinstance(p, torch.Tensor) for p in parts):
            return DenseLinear(torch.cat(parts, 0))  # type: ignore[arg-type]
        if all(isinstance(p, GPTQTensors) for p in parts):
            return DenseLinear(torch.cat([p.dequantize() for p in parts], 0))  # type: ignore[union-attr]
        return ConcatLinear([self.linear(p) for p in parts])

    def sum_linear(self, parts: list[Weight]) -> LinearOp:
        return SumLinear([self.linear(p) for p in parts])

    def norm_adapter(self, g: torch.Tensor, A: torch.Tensor, a: torch.Tensor, U: torch.Tensor, u: torch.Tensor,
                     eps: float) -> NormAdapter:
        return NormAdapter(g, A, a, U, u, eps, self.isa)

    def rmsnorm(self, g: torch.Tensor, eps: float) -> NormAdapter:
        return NormAdapter.rmsnorm(g, eps, self.isa)

    def vision_tower(self, tower: torch.nn.Module) -> torch.nn.Module:
        return tower

    def native_decode(self, model: Any, kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> NativeDecode | None:
        """The decode step in one native call over ``model``'s ops, or None (the per-op loop runs). ``kv_cache``:
        a batch's [slots, n_kv, ctx, head_dim] caches (``BatchDecoder``) instead of the model's own."""
        return None


class ReferenceBackend(Backend):
    name = "torch"


class CpuBackend(Backend):
    """The extension's CPU kernels; ``isa`` from ``lavin_edge.kernels.backend()`` ("torch" there, forced by
    LAVIN_EDGE_KERNELS, keeps the 4-bit weights but runs every op through the checked PyTorch fallback)."""

    name = "kernels"
    runs_w4 = True

    def __init__(self) -> None:
        from lavin_edge import kernels

        isa = kernels.backend()
        self.isa = None if isa == "torch" else isa
        self._isa_name = isa

    def linear(self, w: Weight) -> LinearOp:
        if isinstance(w, torch.Tensor):
            return DenseLinear(w)
        return W4Linear(w, self._isa_name)

    def fused_linear(self, parts: list[Weight]) -> LinearOp:
        if all(isinstance(p, GPTQTensors) for p in parts):
            cat = GPTQTensors.concat(parts)  # type: ignore[arg-type]
            if cat is not None:
                return W4Linear(cat, self._isa_name)
            return ConcatLinear([W4Linear(p, self._isa_name) for p in parts])  # type: ignore[arg-type]
        return super().fused_linear(parts)

    def vision_tower(self, tower: torch.nn.Module) -> torch.nn.Module:
        from lavin_edge.runtime.vision import route_adapters_through_kernel

        return route_adapters_through_kernel(tower)

    def native_decode(self, model: Any, kv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> NativeDecode | None:
        if self.isa is None:
            return None
        from lavin_edge.runtime.native_decode import build_native_decode

        return build_native_decode(model, self.isa, kv_cache)


def select_backend(name: str) -> Backend:
    """The backend for ``name``: "kernels" (ModelDirError without the extension: the model cannot be served as
    asked, reported like any other load problem), "torch", or "auto" (kernels when the extension imports,
    else torch with a warning, since the checked fallback would dequantize W4 weights on every call)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be auto, kernels or torch, got {name!r}")
    if name == "torch":
        return ReferenceBackend()
    from lavin_edge import kernels

    if kernels.extension() is None:
        err = kernels.extension_error() or "lavin_edge._C not built"
        if name == "kernels":
            raise ModelDirError(f"backend 'kernels' requested but the extension is unavailable ({err})")
        warnings.warn(f"lavin_edge extension unavailable ({err}); running the slower PyTorch fallback",
                      RuntimeWarning, stacklevel=3)
        return ReferenceBackend()
    return CpuBackend()

