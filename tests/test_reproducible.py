"""Issue 25: merge + GPTQ give the same bytes whatever SIMD kernels PyTorch picks and however many threads it
uses. The tiny model (weights drawn in code) is built in one child process per setting, as
`lavin-edge bench reproducible --tiny` does; the full demo is `scripts/check_reproducible.sh`."""

from __future__ import annotations

import torch

from lavin_edge.bench.reproducible import CAPABILITIES, THREADS, all_equal, run_matrix, tiny_row


def test_tiny_build_is_the_same_bytes_under_every_kernel_level_and_thread_count() -> None:
    rows = run_matrix(tiny_row, echo=lambda _m: None)
    assert len(rows) == len(CAPABILITIES) * len(THREADS)
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        # The settings took effect: PyTorch really ran different kernels (else the test could not fail).
        assert len({r.used for r in rows}) >= 2, [r.used for r in rows]
    assert all_equal(rows), [(r.capability, r.threads, r.used, r.hashes) for r in rows]
