"""Which kernel backend runs, and the checks every wrapper applies to its tensors.

Backends, fastest first: on x86-64 ``avx512`` (VNNI) > ``avx2``; on AArch64 ``neon-i8mm`` > ``neon-dotprod`` >
``neon``; then ``scalar`` (the C++ reference, every build) > ``torch`` (pure PyTorch,
:mod:`lavin_edge.kernels.reference`), plus ``cuda`` for CUDA tensors. The extension says which it was built with
and which this CPU runs; the fastest of those is used, ``LAVIN_EDGE_KERNELS=<name>`` forces one. Without the
compiled extension everything falls back to PyTorch, with one warning.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

try:  # the compiled extension is optional: PyTorch fallback without it
    from lavin_edge import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)

_WARNED = False
_AVAILABLE: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}
# Every CPU backend name any build may have, fastest first within an architecture.
CPU_BACKENDS = ("avx512", "avx2", "neon-i8mm", "neon-dotprod", "neon", "scalar", "torch")
SMALL_WEIGHTS = 1 << 22  # weights below which a decode GEMV stays on one thread (4M: 2 MB at 4 bits)


def gemv_threads(n_out: int, n_in: int, threads: int) -> int:
    """Threads for a 4-bit GEMV (m = 1): one below SMALL_WEIGHTS, where an OpenMP fork/join costs more than the
    weight read and, on a shared machine, a barrier waiting for a descheduled thread costs milliseconds."""
    return 1 if n_out * n_in < SMALL_WEIGHTS else threads
MAX_RANK = 64  # adapter rank limit of the native adapter kernels (csrc/adapters_simd.h)


def extension() -> ModuleType | None:
    """The compiled ``lavin_edge._C`` module, or None when it is not built (see :func:`extension_error`)."""
    return _C


def extension_error() -> str | None:
    """Why the extension did not import (None when it did)."""
    return _IMPORT_ERROR


def warn_fallback() -> None:
    """Warn once per process that the slow PyTorch reference kernels run instead of the extension."""
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"lavin_edge._C is not available ({_IMPORT_ERROR}); using the slow PyTorch reference kernels. "
            "Build it with `pip install .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def cpu_features() -> dict[str, Any]:
    """CPU features the native kernels dispatch on (empty flags without the extension)."""
    if _C is None:
        return {"extension": False, "error": _IMPORT_ERROR, "best_isa": "torch"}
    feats = dict(_C.cpu_features())
    feats["extension"] = True
    feats["cuda_devices"] = int(_C.cuda_device_count())
    return feats


def available_backends() -> list[str]:
    """CPU backends usable here, fastest first (always ends with "torch")."""
    if _C is None:
        return ["torch"]
    return list(_backend_lists()[0])


def built_backends() -> list[str]:
    """CPU backends this build of the extension has, whether or not this CPU runs them (always ends with "torch")."""
    return ["torch"] if _C is None else list(_backend_lists()[1])


def _backend_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(usable here, built), each ending with "torch"; on the hot path of every checked matmul: computed once."""
    cached = _AVAILABLE.get(id(_C))
    if cached is None:
        f = _C.cpu_features()
        cached = _AVAILABLE[id(_C)] = (tuple(f["backends"]) + ("torch",), tuple(f["built_backends"]) + ("torch",))
    return cached


def backend() -> str:
    """The CPU backend in use: $LAVIN_EDGE_KERNELS if set (validated), else the fastest."""
    forced = os.environ.get("LAVIN_EDGE_KERNELS", "").strip().lower()
    avail = available_backends()
    if forced and forced != "auto":
        if forced not in built_backends():
            raise ValueError(f"LAVIN_EDGE_KERNELS={forced!r}: expected one of {built_backends()} or 'auto'")
        if forced not in avail:
            raise ValueError(f"LAVIN_EDGE_KERNELS={forced!r} is not available here (available: {avail})")
        return forced
    if avail[0] == "torch":
        warn_fallback()
    return avail[0]


def resolve_backend(backend_name: str | None) -> str:
    """``backend_name`` validated against what is available here; None: :func:`backend`."""
    if backend_name is None:
        return backend()
    if backend_name not in built_backends():
        raise ValueError(f"backend must be one of {built_backends()}, got {backend_name!r}")
    if backend_name not in available_backends():
        raise ValueError(f"backend {backend_name!r} not available here ({available_backends()})")
    return backend_name


def cuda_kernels_ok() -> bool:
    """The extension was built with CUDA and a GPU is visible."""
    import torch

    return _C is not None and bool(_C.cuda_compiled) and torch.cuda.is_available()


def check_tensor(
    name: str,
    t: Any,
    dtype: torch.dtype | tuple[torch.dtype, ...],
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``t`` as a contiguous tensor of ``dtype`` (one of), ``shape`` (None = any size) on ``device``;
    TypeError for a wrong type or dtype, ValueError for the rest."""
    import torch  # here, not at the top: backend() and extension() serve the engine without PyTorch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must be {want}, got {t.dtype}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == ts for s, ts in zip(shape, t.shape, strict=False))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return t
