"""The serving runtime: a merged or quantized LaVIN model dir -> prefill + decode, one sequence or a batch.

- ``ops``: what a linear and a norm are at run time (dense, 4-bit, concatenated, summed; norm + adapter);
- ``backends``: where ops run (``ReferenceBackend``: plain PyTorch; ``CpuBackend``: the extension);
- ``loader``: model dir -> tensors -> a backend's ops (the only module that reads model dirs);
- ``engine``: the runtime LLaMA, ``Engine``: prefill and the per-op decode step (the reference);
- ``native_decode``: the decode step, and a prompt's prefill, in one native call over the same prepared ops (one
  sequence, or the rows of a batch);
- ``batch``: ``BatchDecoder``, continuous batching over per-slot KV caches (``lavin_edge.serve`` drives it);
- ``sampling``: ``GenerationConfig`` and the ``Sampler`` (temperature, top-k/p, min-p, penalties, stop strings);
  ``text_stream``: token ids -> text pieces as they complete, stop strings held back;
- ``generate``: the generation loop, sampling, stats; ``vision``: the tower's adapters on the kernel;
- ``compare``: top-1 agreement of two engines; ``layer``: the reference layer step; ``sequence``: what a
  one-sequence engine remembers (cached length, ids, route), shared by ``Engine`` and ``CudaEngine``;
- ``numpy_engine`` and ``numpy_vision``: a quantized model on the extension and NumPy alone, without importing
  PyTorch (the one-shot ``chat``'s cold start), tested against ``Engine``.
- ``cuda_engine`` (+ ``cuda_weights``, ``cuda_state``, ``cuda_generate``, ``device_sampling``, ``cuda_batch``):
  the CUDA engine, its decode step replayed from CUDA graphs, tested on CPU tensors against ``Engine``
  (docs/cuda.md); ``device``: ``--device auto|cpu|cuda`` resolved.

The names below are imported on first use (PEP 562): importing ``lavin_edge.runtime.numpy_engine`` must not
import PyTorch through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"GenerationResult": "generate", "GenerationStats": "generate", "ContextError": "engine",
            "Engine": "engine", "ModelDirError": "engine"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
