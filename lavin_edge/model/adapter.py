"""The routed adapter (MM-Adapter) of LaVIN and the visual projection.

y = x + s * (w0 * (B z + b) + w1 * (D z + d)),  z = dropout(A x + a),  w = softmax(R x_route / t)

B and D are grouped projections (2 groups): output half k reads hidden channels (r/2)k .. (r/2)k + r/2 - 1.
They start at zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grouped_up(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped projection r -> D: ``weight`` is [D, r/groups]; output block k reads hidden block k."""
    d, rg = weight.shape
    zg = z.reshape(*z.shape[:-1], groups, rg)
    out = torch.einsum("...gr,gor->...go", zg, weight.view(groups, d // groups, rg))
    return out.reshape(*z.shape[:-1], d) + bias


def dense_up(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped weight [D, r/groups] as the equivalent dense [D, r] (block-diagonal) matrix."""
    d, rg = weight.shape
    dense = weight.new_zeros(d, rg * groups)
    blk = d // groups
    for g in range(groups):
        dense[g * blk:(g + 1) * blk, g * rg:(g + 1) * rg] = weight[g * blk:(g + 1) * blk]
    return dense


class GroupedUp(nn.Module):
    """A grouped r -> D projection (a 1x1 grouped conv in the reference): weight [D, r/groups], bias [D]."""

    def __init__(self, hidden: int, dim: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(dim, hidden // groups))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return grouped_up(z, self.weight, self.bias, self.groups)

    def dense_weight(self) -> torch.Tensor:
        return dense_up(self.weight, self.groups)


class RoutedAdapter(nn.Module):
    """Shared down-projection, two grouped "expert" up-projections, and a router with temperature."""

    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, temperature: float = 10.0,
                 dropout: float = 0.1, scale: float = 1.0) -> None:
        super().__init__()
        if hidden % groups or dim % groups:
            raise ValueError(f"adapter dim {dim} and hidden {hidden} must be divisible by groups {groups}")
        self.dim, self.hidden, self.groups = dim, hidden, groups
        self.temperature, self.scale = temperature, scale
        self.down = nn.Linear(dim, hidden)
        self.up_b = GroupedUp(hidden, dim, groups)
        self.up_d = GroupedUp(hidden, dim, groups)
        self.router = nn.Linear(dim, 2)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.down.weight.is_meta:
            return
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for p in (self.up_b.weight, self.up_b.bias, self.up_d.weight, self.up_d.bias):
            nn.init.zeros_(p)
        nn.init.xavier_uniform_(self.router.weight)
        nn.init.zeros_(self.router.bias)

    def routing_weights(self, route_x: torch.Tensor) -> torch.Tensor:
        """softmax(R x / t) over the two experts, in fp32 (fp64 for fp64 inputs: ``merge`` folds in fp64)."""
        r = self.router(route_x)
        return torch.softmax((r if r.dtype == torch.float64 else r.float()) / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor, route_x: torch.Tensor | None = None) -> torch.Tensor:
        """``route_x`` defaults to ``x`` (per-token routing, the ViT). For the LLM pass the normed state of
        position 0 as [B, 1, D] so one weight pair applies to the whole sequence."""
        w = self.routing_weights(x if route_x is None else route_x).to(x.dtype)
        z = self.dropout(self.down(x))
        return x + self.scale * (w[..., 0:1] * self.up_b(z) + w[..., 1:2] * self.up_d(z))

    def folded(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The up-projection with fixed routing weights (w0, w1) folded in: dense U [D, r], bias u [D].
        Used by ``merge``: y = x + U (A x + a) + u equals ``forward`` whenever the routing is ``weights``."""
        w0, w1 = weights[0], weights[1]
        u_w = self.up_b.dense_weight() * w0 + self.up_d.dense_weight() * w1
        u_b = self.up_b.bias * w0 + self.up_d.bias * w1
        return self.scale * u_w, self.scale * u_b


class ModalityUp(nn.Module):
    """One up-projection per modality: weight [2, D, r], bias [2, D] (index 0 text, 1 image)."""

    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, dim, hidden))
        self.bias = nn.Parameter(torch.zeros(2, dim))

    def forward(self, z: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """z [B, T, r], modality [B] long -> [B, T, D]."""
        u = self.weight[modality].to(z.dtype)
        return torch.einsum("btr,bdr->btd", z, u) + self.bias[modality].to(z.dtype)[:, None]


class FoldedAdapter(nn.Module):
    """y = x + U_m (A x + a) + u_m: the LLM's routed adapter after ``merge``, with the (constant) routing of
    modality m folded into one up-projection per modality (``RoutedAdapter.folded``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = ModalityUp(hidden, dim)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x), modality)


class VisualProjection(nn.Module):
    """Visual tokens -> LLM embeddings: Linear(token_dim -> 128) -> SiLU -> Linear(128 -> D), xavier init.

    With equal token widths (the ViT) the first Linear is shared, as in LaVIN. A CNN tower's tokens come
    from stages of different widths, so each token index then gets its own first Linear."""

    def __init__(self, token_dims: list[int], out_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.token_dims = list(token_dims)
        self.shared = len(set(token_dims)) == 1
        widths = token_dims[:1] if self.shared else token_dims
        self.inp = nn.ModuleList(nn.Linear(w, hidden) for w in widths)
        self.out = nn.Linear(hidden, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in [*self.inp, self.out]:
            if lin.weight.is_meta:
                return
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """``tokens``: one [B, token_dims[i]] tensor per visual token -> [B, n_tokens, D]."""
        if self.shared:
            h = self.inp[0](torch.stack(tokens, dim=1))
        else:
            h = torch.stack([lin(t) for lin, t in zip(self.inp, tokens, strict=True)], dim=1)
        return self.out(F.silu(h))
