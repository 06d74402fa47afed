"""Kernels that make chat fast, with backend dispatch. One module per job:

- :mod:`~lavin_edge.kernels.dispatch`: which backend runs (``backend()``, ``available_backends()``,
  ``cpu_features()``, the optional ``lavin_edge._C`` extension) and the tensor checks;
- :mod:`~lavin_edge.kernels.w4`: 4-bit GPTQ linears (the weight layouts are documented there);
- :mod:`~lavin_edge.kernels.adapters`: the LLM's fused RMSNorm + adapter and the ViT's routed adapter;
- :mod:`~lavin_edge.kernels.decode`: the one-call decode step over prepared weights;
- :mod:`~lavin_edge.kernels.reference`: the plain-PyTorch reference of every kernel (fallback and
  test oracle; ``tests/test_kernels.py`` checks every backend against it);
- :mod:`~lavin_edge.kernels.gptq_format`: the GPTQ checkpoint layout.

Public API
----------
``prepare_w4(t: GPTQTensors, *, backend=None)``
    One-time repack of a GPTQ linear (``gptq_format.GPTQTensors``: its tensors, group size and format) into
    the native kernels' layout; returns a :class:`PreparedW4`.
    ``.matmul(x)`` computes ``x @ W^T`` for x [..., K] (fp32 on CPU, fp16 on CUDA) without ever
    materialising W; ``.native`` is the descriptor the one-call decode step takes.
``prepare_norm_adapter(g, A, a, U, u, eps)``
    A checked LLM norm + folded adapter (:class:`PreparedNormAdapter`) with its descriptor.
``GPTQTensors.dequantize()``
    Dense fp32 W [N, K] (reference; also the fallback).
``rmsnorm_adapter(x, g, A, a, U, u, modality, eps)``, ``vit_routed_adapter(x, A, a, R, rb, B, b, Dw, d, t, s)``
    The adapter kernels, checked per call.
``cpu_features()``, ``backend()``, ``available_backends()``
    What the dispatcher found (used by ``lavin-edge info``).

Accuracy of the CPU W4 path: x is quantized in blocks of 32 (one fp32 scale each) to 15-bit
integers (``$LAVIN_EDGE_W4_ACT=int16``, the default; csrc/kernels.h) or to int8 as llama.cpp's
Q8_0 (``int8``), the product is then exact in integers. The relative error this adds to y is
~1e-5 (int8: ~1e-3) relative to ||y|| typically; ``reference.quantize_activations_reference``
reproduces it exactly for tests.

Errors: wrong dtype -> TypeError; wrong device, non-contiguous input, mismatched shapes,
K not a multiple of 8 or of the group size, g_idx out of range -> ValueError.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562): ``dispatch`` and ``tiling`` load without PyTorch, for the engine that runs
# without it (lavin_edge.runtime.numpy_engine); the rest imports PyTorch when first touched.
_EXPORTS = {
    "PreparedNormAdapter": "adapters", "prepare_norm_adapter": "adapters", "rmsnorm_adapter": "adapters",
    "vit_routed_adapter": "adapters", "CPU_BACKENDS": "dispatch", "MAX_RANK": "dispatch",
    "available_backends": "dispatch", "backend": "dispatch", "cpu_features": "dispatch", "extension": "dispatch",
    "extension_error": "dispatch", "GPTQTensors": "gptq_format", "PreparedW4": "w4", "gptq_matmul_scalar": "w4",
    "prepare_w4": "w4", "repack_tiled_reference": "w4",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
