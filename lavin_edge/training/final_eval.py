"""The recipe's held-out evaluation after training, saved beside the run (Ctrl-C skips it; the run is saved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lavin_edge.model.lavin import LaVIN
from lavin_edge.training import checkpoint as ckpt
from lavin_edge.training import rundir
from lavin_edge.training.config import TrainConfig


def final_eval(model: LaVIN, tok: Any, cfg: TrainConfig, dtype: torch.dtype, out: Path, step: int, log: Any
                ) -> dict[str, Any] | None:
    """The recipe's held-out evaluation (progress on stderr); None when Ctrl-C stopped it (the run is saved)."""
    from lavin_edge.evaluate import run_eval_spec

    assert isinstance(cfg.eval, dict)
    log(f"evaluating on the recipe's [eval] ({cfg.eval.get('type')}, limit {cfg.eval.get('limit', 'all')}); the "
        "run is saved: Ctrl-C skips it, --no-eval or `eval = false` turns it off")
    model.eval()
    try:
        result = run_eval_spec(model, tok, cfg.eval, dtype=dtype, log=log, progress=cfg.progress)
    except KeyboardInterrupt:
        log(f"\nevaluation interrupted; the trained run in {out} is complete (evaluate it with `lavin-edge eval`)")
        return None
    ckpt.save_json(result, out / "eval.json")
    rundir.end_save(out, step, finished=True)  # the marker now lists eval.json too
    return result
