"""The calibration passes of the GPTQ driver (``quantize.pipeline``): the inputs of LLM layer 0, one layer run on
every sample in ``CALIB_DTYPE`` (fp64: the reproducible build, docs/reproducibility.md), the hooks that feed a
linear's inputs to its Hessian, and the replay of linears whose weights are final so that later passes of the
same layer skip their flops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lavin_edge.model.llama import attention_mask, rope_tables
from lavin_edge.model.merged import MergedLaVIN
from lavin_edge.quantize.gptq import HessianAccumulator


@dataclass
class CalibSample:
    """One calibration sequence as the model reads it: ids, where the image goes (-1: none), the image."""

    input_ids: list[int]
    image_pos: int = -1
    image: torch.Tensor | None = None

    @property
    def modality(self) -> str:
        return "image" if self.image_pos >= 0 else "text"


def get_linear(module: nn.Module, dotted: str) -> nn.Linear:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


@torch.no_grad()
def layer_inputs(model: MergedLaVIN, samples: list[CalibSample]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Embeddings (with projected visual tokens) entering LLM layer 0, one [1, T, D] per sample."""
    out = []
    dtype = model.llm.tok_embeddings.weight.dtype
    for s in samples:
        ids = torch.tensor([s.input_ids])
        pos = torch.tensor([s.image_pos])
        img = None if s.image is None else s.image[None].to(dtype)
        out.append((model.embed(ids, pos, img), (pos >= 0).long()))
    return out


class StopLayer(Exception):
    """Raised by a Hessian hook once it has its input: the rest of the layer need not run."""


CALIB_DTYPE = torch.float64


def _rope(model: MergedLaVIN, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the first ``t`` cache slots, as ``rope_slice`` gives them but in ``dtype`` (fp64: not rounded
    to fp32 on the way)."""
    cfg, a = model.llm.cfg, model.llm.position_offset
    cos, sin = rope_tables(cfg.head_dim, a + t, cfg.rope_theta, dtype=dtype)
    return cos[a:a + t], sin[a:a + t]


@torch.no_grad()
def run_layer(model: MergedLaVIN, i: int, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Layer ``i`` of ``model`` on each input; a hook raising StopLayer ends one early."""
    layer = model.llm.layers[i]
    outs = []
    for h, modality in inputs:
        t = h.shape[1]
        cos, sin = _rope(model, t, h.dtype)
        try:
            outs.append(layer(h, modality, cos, sin, attention_mask(t, 0, False, h.device), None, i, 0))
        except StopLayer:
            pass
    return outs


def hessian_hook(acc: HessianAccumulator, stop: bool, fp_inputs: list[torch.Tensor] | None = None):  # noqa: ANN202
    """Feeds a Linear's input to ``acc``; with ``fp_inputs``, paired with the fp model's input of the same sample
    (consumed in order)."""
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        acc.add_batch(args[0], fp_inputs.pop(0) if fp_inputs is not None else None)
        if stop:
            raise StopLayer
    return hook


def capture_hook(store: list[torch.Tensor]):  # noqa: ANN202 - a torch hook
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        store.append(args[0].detach().clone())
    return hook


class _Replay(nn.Module):
    """Stands in for a linear whose weights are final: returns, in order, the outputs it gave on the same inputs
    in an earlier pass (the very values it would compute again), so later passes skip its flops."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs, self.next = outputs, 0

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        self.next += 1
        return self.outputs[self.next - 1]


def run_layer_replaying(model: MergedLaVIN, i: int, inputs: list[tuple[torch.Tensor, torch.Tensor]],
                         cached: dict[str, list[torch.Tensor]], capture: tuple[str, ...]) -> list[torch.Tensor]:
    """``run_layer`` with the linears in ``cached`` replayed, and the outputs of those in ``capture`` (final
    from now on) recorded into ``cached`` for the next pass."""
    layer = model.llm.layers[i]
    saved = {name: get_linear(layer, name) for name in cached}
    handles = []
    for name in capture:
        store = cached.setdefault(name, [])
        handles.append(get_linear(layer, name).register_forward_hook(lambda _m, _a, out, st=store: st.append(out)))
    try:
        for name, outs in ((n, cached[n]) for n in saved):
            parent, _, attr = name.rpartition(".")
            setattr(get_linear(layer, parent), attr, _Replay(outs))
        return run_layer(model, i, inputs)
    finally:
        for hnd in handles:
            hnd.remove()
        for name, lin in saved.items():
            parent, _, attr = name.rpartition(".")
            setattr(get_linear(layer, parent), attr, lin)
