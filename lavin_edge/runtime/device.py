"""Which device a command runs on: ``--device auto|cpu|cuda`` resolved against this machine.

``auto`` is CUDA when a GPU is visible and the extension was built with CUDA (its W4 and adapter kernels),
else the CPU. ``cuda`` without both is bad input (``DeviceError``: one ``error:`` line, exit 2). ``auto``
imports PyTorch only when the extension has CUDA kernels and a GPU device node exists: on a CPU machine it costs
no PyTorch import (the one-shot chat's cold start).
"""

from __future__ import annotations

import glob

DEVICE_NAMES = ("auto", "cpu", "cuda")

__all__ = ["DEVICE_NAMES", "DeviceError", "cuda_unavailable_reason", "resolve_device"]


class DeviceError(ValueError):
    """``--device cuda`` on a machine that cannot run it."""


def _gpu_node_present() -> bool:
    # NVIDIA's driver nodes (desktop / datacenter), Jetson's integrated GPU, WSL2's GPU paravirtualisation.
    return any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/nvgpu*", "/dev/nvhost-*gpu*", "/dev/dxg"))


def cuda_unavailable_reason(quick: bool = False) -> str | None:
    """None when the CUDA engine can run here, else why not (one clause). ``quick``: no GPU device node is taken
    as no GPU, without importing PyTorch (``auto``); otherwise PyTorch is asked."""
    from lavin_edge.kernels.dispatch import extension, extension_error

    c = extension()
    if c is None:
        return f"the lavin_edge extension is not built ({extension_error() or 'lavin_edge._C missing'})"
    if not bool(getattr(c, "cuda_compiled", False)):
        return "the lavin_edge extension was built without CUDA (build with -DLAVIN_EDGE_CUDA=ON)"
    if quick and not _gpu_node_present():
        return "no CUDA GPU on this machine"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    return None


def resolve_device(name: str) -> str:
    """``name`` (auto / cpu / cuda) -> "cpu" or "cuda"; DeviceError for cuda where it cannot run."""
    if name not in DEVICE_NAMES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICE_NAMES)}, got {name!r}")
    if name == "cpu":
        return "cpu"
    why = cuda_unavailable_reason(quick=name == "auto")
    if why is None:
        return "cuda"
    if name == "cuda":
        raise DeviceError(f"--device cuda: {why}")
    return "cpu"
