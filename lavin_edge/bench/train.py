"""``lavin-edge bench train``: train a recipe (by default the offline demo, recipes/demo.toml: SmolLM2-135M +
EfficientNet-Lite0 on easy-vqa) and report steps, wall time, samples/s, the losses and the held-out accuracy
on easy-vqa test questions. Not a CI test: ~25 min on 2 CPU cores. The adapters go to the recipe's out_dir
(or --out); the report is printed and, with --report, written as JSON.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lavin_edge.training.config import load_recipe
from lavin_edge.training.loop import train

DEFAULT_RECIPE = "recipes/demo.toml"


def run_train_bench(recipe: str = DEFAULT_RECIPE, out: str | None = None, threads: int | None = None,
                    resume: bool = False, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``recipe`` (its log lines to ``log``) and return what the run measured."""
    cfg = load_recipe(recipe, {"out_dir": out, "threads": threads})
    t0 = time.perf_counter()
    res = train(cfg, resume=resume, overwrite=overwrite, echo=log)
    if res is None:  # a non-zero rank of a distributed run reports nothing
        return {}
    total = time.perf_counter() - t0
    ev = res.eval or {}
    return {
        "recipe": recipe, "out_dir": str(res.out_dir), "steps": res.steps, "skipped_steps": res.skipped_steps,
        "global_batch": cfg.batch_size * cfg.accum_steps, "samples": res.steps * cfg.batch_size * cfg.accum_steps,
        "train_wall_s": round(res.wall_s, 1), "samples_per_s": round(res.samples_per_s, 3),
        "total_wall_s_incl_load_and_eval": round(total, 1),
        "first_loss": res.losses[0] if res.losses else None, "last_loss": res.losses[-1] if res.losses else None,
        "eval": {k: ev.get(k) for k in ("method", "n", "accuracy", "majority_baseline",
                                        "per_kind_majority_baseline", "categories", "unparsable", "seconds")},
        "adapter_bytes": (Path(res.out_dir) / "adapters.safetensors").stat().st_size,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()},
    }
