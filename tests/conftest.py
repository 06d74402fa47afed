"""Shared test fixtures: tiny models built in code, a byte-level tokenizer stand-in."""

from __future__ import annotations

import pytest
import torch

# Two cores on CI: more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


class BytesTokenizer:
    """256 byte ids + BOS/EOS/PAD: enough to exercise the sequence layout without any vocab file."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on 2 threads shared with other jobs stall on fork/join barriers; one thread is faster here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def byte_tok() -> BytesTokenizer:
    return BytesTokenizer()
