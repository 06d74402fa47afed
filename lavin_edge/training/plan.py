"""What each step reads: the recipe's data as one dataset, and ``StepPlan``, the dataset indices of every
(rank, optimizer step, micro-step), a function of (seed, epoch, step) only so a resume continues bit-exactly."""

from __future__ import annotations

import math
from typing import Any

from torch.utils.data import DistributedSampler

from lavin_edge.data import LavinDataset, Problems, load_source
from lavin_edge.training.config import TrainConfig
from lavin_edge.training.distributed import DistInfo


def build_dataset(cfg: TrainConfig, tok: Any, n_visual: int, image_size: int, problems: Problems
                  ) -> LavinDataset:
    if not cfg.data:
        raise ValueError("the recipe has no [[data]] sources")
    records = []
    for spec in cfg.data:
        records += load_source(spec, problems)
    ds = LavinDataset(records, tok, n_visual, image_size, cfg.max_seq_len, problems)
    if len(ds) == 0:
        raise ValueError("no usable training samples (see the bad records above)")
    return ds


class StepPlan:
    """Which dataset indices each (rank, optimizer step, micro-step) reads: DistributedSampler order per
    epoch (seeded), whole steps only. One rank with batch 2b reads exactly the union of what two ranks
    with batch b read (DistributedSampler interleaves ranks)."""

    def __init__(self, n: int, cfg: TrainConfig, info: DistInfo) -> None:
        self.n, self.cfg, self.info = n, cfg, info
        self.per_step = cfg.batch_size * cfg.accum_steps
        per_rank = n // info.world_size  # drop_last: every rank the same length
        self.steps_per_epoch = per_rank // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} samples are fewer than one step ({self.per_step} x {info.world_size} ranks)")
        self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self._epoch = -1
        self._order: list[int] = []

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            sampler = DistributedSampler(range(self.n), num_replicas=self.info.world_size, rank=self.info.rank,
                                         shuffle=True, seed=self.cfg.seed, drop_last=True)
            sampler.set_epoch(epoch)
            self._order, self._epoch = list(sampler), epoch
        start = pos * self.per_step
        b = self.cfg.batch_size
        return [self._order[start + m * b:start + (m + 1) * b] for m in range(self.cfg.accum_steps)]
