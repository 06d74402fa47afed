"""EfficientNet-Lite0's shape: the numbers both implementations of the tower read (the PyTorch one,
``lavin_edge.model.efficientnet``, and the NumPy one, ``lavin_edge.runtime.numpy_vision``). No PyTorch here."""

from __future__ import annotations

# (expand ratio, kernel, stride, out channels, repeats) per stage, EfficientNet-Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# The TF reference trains with BN epsilon 1e-3 (PyTorch's default 1e-5 changes the outputs).
BN_EPS = 1e-3
# Stages (0-based) whose last block's pooled output becomes a visual token: stages 3..7 in 1-based terms.
TOKEN_STAGES = (2, 3, 4, 5, 6)
