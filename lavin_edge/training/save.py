"""Saving a run's checkpoint: every file staged under a temporary name, then replaced between the run dir's
in-progress and complete markers (``lavin_edge.training.rundir``), so an interrupted save leaves the previous
checkpoint complete."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lavin_edge.training import checkpoint as ckpt
from lavin_edge.training import rundir
from lavin_edge.training.distributed import gather_objects
from lavin_edge.training.state import Run


def _write_step(what: str) -> None:
    """Called before each write of a save: the seam of the kill-at-every-write-step test."""


def save_checkpoint(run: Run, rng: dict[str, Any], final: bool = False) -> None:
    """Write a checkpoint of ``run`` (rank 0; every rank sends its RNG state): each new file under a temporary
    name first, so the previous checkpoint stays complete until the marker says otherwise."""
    rngs = gather_objects(rng, run.info)
    if not run.info.is_main:
        return
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    _write_step("clean")
    rundir.remove_stale_temps(out)
    staged: list[tuple[Path, Path]] = []
    try:
        _write_step("stage adapters")
        staged.append(ckpt.stage_adapters(run.model.trainable_state_dict(), out, {"step": str(run.step)}))
        _write_step("stage config")
        staged.append(ckpt.stage_json({**run.meta, "step": run.step}, out / ckpt.CONFIG))
        _write_step("stage trainer_state")
        staged.append(ckpt.stage_trainer_state({
            "step": run.step, "optimizer": run.optimizer.state_dict(), "scheduler": run.sched.state_dict(),
            "rng": rngs, "skipped_steps": run.skipped, "losses": run.losses, "world_size": run.info.world_size,
            "global_batch": run.global_batch}, out))
        _write_step("stage log")
        staged.append(rundir.stage_log(out, run.pending_log))
        if final:
            from lavin_edge.training.plot import plot_loss

            _write_step("stage plot")
            staged.append((plot_loss(list(range(1, len(run.losses) + 1)), run.losses, out / ".loss.tmp.png"),
                           out / "loss.png"))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    _write_step("unmark")
    rundir.begin_save(out)
    for tmp, dest in staged:
        _write_step(f"replace {dest.name}")
        os.replace(tmp, dest)
    run.pending_log.clear()
    (out / "eval.json").unlink(missing_ok=True)  # an evaluation of an earlier step
    _write_step("marker")
    rundir.end_save(out, run.step, finished=run.step >= run.end_step)
