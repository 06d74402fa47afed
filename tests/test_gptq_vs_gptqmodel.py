"""Our GPTQ against the maintained library's (gptqmodel 7.6.0) on the same layer and the same inputs.

gptqmodel pins numpy 2.2.6, so it lives in its own venv rather than the project's environment
(docs/quantization.md):

    python -m venv /tmp/gptqenv --system-site-packages
    /tmp/gptqenv/bin/pip install --no-deps gptqmodel==7.6.0
    /tmp/gptqenv/bin/pip install -c <(echo torch==2.13.0+cpu) accelerate datasets defuser device-smi dill \\
        jinja2 logbar packaging pypcre threadpoolctl tokenicer transformers torchao numpy==2.2.6
    GPTQMODEL_CPU_WORKERS=2 TORCHDYNAMO_DISABLE=1 /tmp/gptqenv/bin/python -m pytest -q tests/test_gptq_vs_gptqmodel.py

Elsewhere the test skips, naming the reason.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Library pitfalls on a 2-core CPU box: its worker pool fails unless told to use 2 workers, and it would
# run torch.compile for nothing here.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

gptqmodel = pytest.importorskip("gptqmodel", reason="gptqmodel is not installed in this environment "
                                "(it pins numpy 2.2.6; see this file's docstring for its venv)")

from gptqmodel.quantization.config import QuantizeConfig  # noqa: E402
from gptqmodel.quantization.gptq import GPTQ  # noqa: E402

from lavin_edge.quantize.gptq import HessianAccumulator, gptq_quantize  # noqa: E402


def _activations(model_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A real layer of ours: the tiny merged model's wq weight [64, 64] and the inputs it sees (the folded
    adapter's output) on a few text and image sequences -- plus a wider synthetic layer."""
    from lavin_edge.config import preset
    from lavin_edge.merge import merge_lavin
    from lavin_edge.model.lavin import build_lavin

    torch.manual_seed(model_seed)
    model = build_lavin(preset("tiny", "tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_trainable_name(name):
                p.normal_(0, 0.3)
    merged, _ = merge_lavin(model)
    seen: list[torch.Tensor] = []
    lin = merged.llm.layers[1].attention.wq
    hnd = lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in range(8):
            ids = torch.randint(0, 256, (1, 48), generator=g)
            pos = torch.tensor([3 if m % 2 else -1])
            img = torch.randn(1, 3, 64, 64, generator=g) if m % 2 else None
            merged.llm.forward_embeds(merged.embed(ids, pos, img), (pos >= 0).long())
    hnd.remove()
    return lin.weight.detach().clone(), torch.cat(seen)


def _library(w: torch.Tensor, x: torch.Tensor, gs: int, sym: bool, desc_act: bool, static: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """gptqmodel's GPTQ driven by hand: add_batch per chunk, then quantize -> (q ints, scales, zeros, g_idx)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    qcfg = QuantizeConfig(bits=4, group_size=gs, sym=sym, desc_act=desc_act, static_groups=static,
                          damp_percent=0.05, damp_auto_increment=0.01, act_group_aware=False)
    gq = GPTQ(lin, qcfg)
    gq.quantizer.configure(perchannel=True)
    for chunk in x.split(256):
        gq.add_batch(chunk[None], None)
    w_hat, scale, zero, g_idx, *_ = gq.quantize(blocksize=128)
    scale, zero = scale.T.contiguous(), zero.T.contiguous()  # -> [G, N] like ours
    g = g_idx.long()
    q = torch.round(w_hat.float() / scale[g].T + zero[g].T).to(torch.int32)
    return q, scale, zero, g_idx.to(torch.int32)


def _ours(w: torch.Tensor, x: torch.Tensor, gs: int, sym: bool, desc_act: bool, static: bool):
    acc = HessianAccumulator(w.shape[1])
    for chunk in x.split(256):
        acc.add_batch(chunk)
    return gptq_quantize(w, acc.H, 4, gs, sym, desc_act, static, 0.05, 0.01, 128)


@pytest.mark.parametrize("gs,sym,desc_act,static", [
    (32, True, False, False), (32, False, True, False), (-1, True, False, False), (32, True, True, True)])
def test_same_ints_as_gptqmodel_on_our_layer(gs: int, sym: bool, desc_act: bool, static: bool) -> None:
    w, x = _activations()
    q, scale, zero, g_idx = _library(w, x, gs, sym, desc_act, static)
    r = _ours(w, x, gs, sym, desc_act, static)
    assert torch.equal(r.g_idx, g_idx)
    assert torch.allclose(r.scales, scale, rtol=1e-6, atol=0) and torch.equal(r.zeros, zero)
    # Identical integer codes, up to a rare tie flipped by fp32 summation order.
    assert (r.q != q).float().mean() <= 1e-3, f"{int((r.q != q).sum())} codes differ"


@pytest.mark.parametrize("gs,sym,desc_act", [(64, True, False), (128, False, True)])
def test_same_ints_as_gptqmodel_on_a_wide_layer(gs: int, sym: bool, desc_act: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 96, 576  # SmolLM2's width: group 64 spans blocks of 128 (the stale-grid bookkeeping case)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(2048, k, generator=g) @ (torch.eye(k) + torch.randn(k, k, generator=g) / 24)
    if gs == 128:
        w, x = w[:, :512], x[:, :512]
    q, scale, zero, g_idx = _library(w, x, gs, sym, desc_act, False)
    r = _ours(w, x, gs, sym, desc_act, False)
    assert torch.equal(r.g_idx, g_idx) and torch.equal(r.zeros, zero)
    assert torch.allclose(r.scales, scale, rtol=1e-6, atol=0)
    assert (r.q != q).float().mean() <= 1e-3, f"{int((r.q != q).sum())} codes differ"
