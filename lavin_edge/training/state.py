"""A training run between its steps (``Run``: model, optimiser, schedule, counters, log lines not yet saved)
and the RNG states a resume restores (per rank)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lavin_edge.data import LavinDataset
from lavin_edge.model.lavin import LaVIN
from lavin_edge.training.config import TrainConfig
from lavin_edge.training.distributed import DistInfo
from lavin_edge.training.plan import StepPlan
from lavin_edge.training.schedule import WarmupCosine


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """One training run between its steps: what a save writes and the loop advances."""

    cfg: TrainConfig
    info: DistInfo
    out: Path
    model: LaVIN
    ddp: nn.Module
    tok: Any
    ds: LavinDataset
    plan: StepPlan
    optimizer: torch.optim.Optimizer
    sched: WarmupCosine
    peak_lr: float
    global_batch: int
    end_step: int
    meta: dict[str, Any]
    step: int = 0
    skipped: int = 0
    losses: list[float] = field(default_factory=list)
    pending_log: list[str] = field(default_factory=list)  # train_log.jsonl lines since the last save
