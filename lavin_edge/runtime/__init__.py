"""The serving runtime: a merged or quantized LaVIN model dir -> prefill + decode, one sequence or a batch.

- ``ops``: what a linear and a norm are at run time (dense, 4-bit, concatenated, summed; norm + adapter);
- ``backends``: where ops run (``ReferenceBackend``: plain PyTorch; ``CpuBackend``: the extension);
- ``loader``: model dir -> tensors -> a backend's ops (the only module that reads model dirs);
- ``model``: the runtime LLaMA, ``Engine``: prefill and the per-op decode step (the reference);
- ``native_decode``: the decode step in one native call over the same prepared ops (one sequence, or the rows
  of a batch);
- ``batch``: ``BatchDecoder``, continuous batching over per-slot KV caches (``lavin_edge.serve`` drives it);
- ``generate``: the generation loop, sampling, stats; ``vision``: the tower's adapters on the kernel;
- ``compare``: top-1 agreement of two engines.
"""

from __future__ import annotations

from lavin_edge.runtime.generate import GenerationResult, GenerationStats
from lavin_edge.runtime.model import ContextError, Engine, ModelDirError

__all__ = ["ContextError", "Engine", "GenerationResult", "GenerationStats", "ModelDirError"]
