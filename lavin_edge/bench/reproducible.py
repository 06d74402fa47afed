"""``lavin-edge bench reproducible``: build the same model under every CPU-kernel setting and compare the bytes.

PyTorch picks its SIMD kernels once per process from the CPU (``ATEN_CPU_CAPABILITY`` caps the level: default,
avx2, avx512), and reductions split by thread count; each setting therefore runs in its own process. Two
builds: the tiny model (built in code, seconds: the CI test) and the full demo (merge + GPTQ of the shipped
adapters through ``lavin-edge chat``, minutes each). docs/reproducibility.md says what the equal hashes mean.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

CAPABILITIES = ("default", "avx2", "avx512")
THREADS = (1, 2)
DEMO_FILES = ("merged/model.safetensors", "quantized/model.safetensors")
DEMO_PROMPT = "What is the capital of France?"


@dataclass
class Row:
    """One setting's build: what it asked for, what PyTorch used, the hashes, how long it took."""

    capability: str
    threads: int
    hashes: dict[str, str]
    used: str = ""
    seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


def setting_env(capability: str, threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one setting: the kernel level and every thread pool PyTorch reads at start."""
    env = dict(os.environ if base is None else base)
    env.update(ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _uniform(shape: tuple[int, ...], g: torch.Generator, scale: float) -> torch.Tensor:
    """Uniform in [-scale, scale) from integer draws: the same numbers under every kernel level (torch.randn's
    vectorised Box-Muller is not)."""
    return torch.randint(-2**20, 2**20, shape, generator=g).to(torch.float32) * (scale / 2**20)


def tiny_hashes(seed: int = 0) -> dict[str, str]:
    """merge + GPTQ (g32, symmetric, asymmetric calibration, the demo's path) of a tiny LaVIN whose weights
    are drawn here; sha256 of the merged tensors and of the quantized ones, as the directories would hold them."""
    from lavin_edge.config import preset
    from lavin_edge.merge import file_state_dict, merge_lavin
    from lavin_edge.model.lavin import build_lavin
    from lavin_edge.quantize.files import head_w4_tensors
    from lavin_edge.quantize.pipeline import CalibSample, GPTQConfig, quantize_model

    model = build_lavin(preset("tiny", "tiny"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_trainable_name(name):
                p.copy_(_uniform(tuple(p.shape), g, 2.0 if "router" in name else 0.5))
            elif p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + _uniform(tuple(p.shape), g, 0.125))
            else:
                p.copy_(_uniform(tuple(p.shape), g, 1.7 / p[0].numel() ** 0.5))
    merged, _ = merge_lavin(model.eval())
    out = {"merged": _digest(file_state_dict(merged))}
    vocab, n_vis, size = model.cfg.llm.vocab_size, merged.n_visual, model.cfg.vision.image_size
    samples = [CalibSample(torch.randint(3, vocab, (64,), generator=g).tolist()) for _ in range(4)]
    samples += [CalibSample(torch.randint(3, vocab, (64,), generator=g).tolist(), 2,
                            _uniform((3, size, size), g, 1.0)) for _ in range(4)]
    assert all(2 + n_vis <= len(s.input_ids) for s in samples)
    packed, _ = quantize_model(merged, samples, GPTQConfig(group_size=32, sym=True, asym_calib=0.25),
                               progress=False)
    tensors = {**file_state_dict(merged), **packed}
    tensors.update(head_w4_tensors(tensors)[0])
    out["quantized"] = _digest(tensors)
    return out


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_hashes(root: Path, names: tuple[str, ...] = DEMO_FILES) -> dict[str, str]:
    """sha256 of each of ``names`` under ``root``."""
    out = {}
    for name in names:
        h = hashlib.sha256()
        with open(root / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def _child(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-3:])} failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    return r


def tiny_row(capability: str, threads: int, seed: int = 0) -> Row:
    """``tiny_hashes`` in a child process under one setting."""
    from lavin_edge.bench.child import module_command

    t0 = time.time()
    r = _child(module_command("lavin_edge.bench.reproducible", "--tiny", str(seed)),
               setting_env(capability, threads), 600)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return Row(capability, threads, got["hashes"], got["capability"], time.time() - t0)


def demo_row(capability: str, threads: int, root: Path) -> Row:
    """The demo built from scratch in ``root`` by the one-shot ``chat`` under one setting (it builds what is
    missing, then answers ``DEMO_PROMPT``); the hashes of its two model files and the answer."""
    from lavin_edge.bench.child import module_command

    if (root / "quantized").exists() or (root / "merged").exists():
        raise FileExistsError(f"{root} already holds a demo: give an empty or new directory")
    env = setting_env(capability, threads, dict(os.environ, LAVIN_EDGE_DEMO_DIR=str(root)))
    used = _child([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"], env, 120)
    t0 = time.time()
    r = _child(module_command("lavin_edge.cli", "chat", "--threads", str(threads), "--prompt", DEMO_PROMPT),
               env, 3600)
    return Row(capability, threads, file_hashes(root), used.stdout.strip(), time.time() - t0,
               {"answer": r.stdout.strip()})


def run_matrix(row: Callable[[str, int], Row], capabilities: tuple[str, ...] = CAPABILITIES,
               threads: tuple[int, ...] = THREADS, echo: Callable[[str], None] = print) -> list[Row]:
    """``row`` under every (capability, threads) setting, one at a time, echoing each as it finishes."""
    rows = []
    for cap in capabilities:
        for t in threads:
            rows.append(row(cap, t))
            r = rows[-1]
            echo(f"{cap:>8} x{t} (PyTorch used {r.used}) {r.seconds:6.1f} s  "
                 + "  ".join(f"{Path(k).parent.name or k} {v[:16]}" for k, v in r.hashes.items())
                 + "".join(f"  {k}: {v!r}" for k, v in r.extra.items()))
    return rows


def all_equal(rows: list[Row]) -> bool:
    """Whether every setting gave the same hashes (and the same extras, e.g. the answer)."""
    return all(r.hashes == rows[0].hashes and r.extra == rows[0].extra for r in rows)


if __name__ == "__main__":  # the tiny child: python -m lavin_edge.bench.reproducible --tiny SEED
    if sys.argv[1:2] != ["--tiny"]:
        raise SystemExit("usage: python -m lavin_edge.bench.reproducible --tiny [SEED]")
    hashes = tiny_hashes(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(json.dumps({"hashes": hashes, "capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads()}))
