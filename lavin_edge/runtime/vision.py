"""The vision tower's routed adapters on the extension's per-token routed kernel.

Each ``RoutedAdapter`` of a loaded (frozen, eval-mode) tower is replaced in its parent by a
``KernelRoutedAdapter`` that holds it and runs the same maths through
``lavin_edge.kernels.vit_routed_adapter``: the tower's own modules stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from lavin_edge.kernels import vit_routed_adapter
from lavin_edge.model.adapter import RoutedAdapter


class KernelRoutedAdapter(nn.Module):
    """A per-token ``RoutedAdapter`` through the native kernel (inference only). Called with ``route_x`` (not
    per-token routing) it runs the adapter's own PyTorch forward."""

    def __init__(self, adapter: RoutedAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, x: torch.Tensor, route_x: torch.Tensor | None = None) -> torch.Tensor:
        a = self.adapter
        if route_x is not None:
            return a(x, route_x)
        shape = x.shape
        # The kernel takes fp32 rows on the CPU and fp16 rows on CUDA (the CUDA engine's fp16 tower).
        dtype = torch.float16 if x.is_cuda else torch.float32
        y = vit_routed_adapter(
            x.reshape(-1, shape[-1]).to(dtype).contiguous(), a.down.weight, a.down.bias, a.router.weight,
            a.router.bias, a.up_b.weight, a.up_b.bias, a.up_d.weight, a.up_d.bias, float(a.temperature),
            float(a.scale))
        return y.view(shape).to(x.dtype)


def route_adapters_through_kernel(tower: nn.Module) -> nn.Module:
    """``tower`` with every ``RoutedAdapter`` child wrapped in a ``KernelRoutedAdapter`` (in place)."""
    for parent in list(tower.modules()):
        if isinstance(parent, KernelRoutedAdapter):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, RoutedAdapter):
                setattr(parent, name, KernelRoutedAdapter(child))
    return tower
