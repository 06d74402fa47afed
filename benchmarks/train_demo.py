"""Train the offline demo (train/demo.toml: SmolLM2-135M + EfficientNet-Lite0 on easy-vqa) and report
steps, wall time, samples/s and held-out accuracy on easy-vqa test questions. Not a CI test: ~25 min on
2 CPU cores. The adapters go to runs/demo/ (gitignored); the numbers to benchmarks/train_demo.json.

    python benchmarks/train_demo.py [--recipe train/demo.toml] [--out runs/demo] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lavin_edge.train import load_recipe, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="train/demo.toml")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report", default="benchmarks/train_demo.json")
    ap.add_argument("--resume", action="store_true", help="Continue bit-exactly from the checkpoint in --out.")
    ap.add_argument("--overwrite", action="store_true", help="Delete the run in --out and start over.")
    args = ap.parse_args()
    cfg = load_recipe(args.recipe, {"out_dir": args.out, "threads": args.threads})
    t0 = time.perf_counter()
    res = train(cfg, resume=args.resume, overwrite=args.overwrite)
    assert res is not None
    total = time.perf_counter() - t0
    ev = res.eval or {}
    report = {
        "recipe": args.recipe, "out_dir": str(res.out_dir), "steps": res.steps, "skipped_steps": res.skipped_steps,
        "global_batch": cfg.batch_size * cfg.accum_steps, "samples": res.steps * cfg.batch_size * cfg.accum_steps,
        "train_wall_s": round(res.wall_s, 1), "samples_per_s": round(res.samples_per_s, 3),
        "total_wall_s_incl_load_and_eval": round(total, 1),
        "first_loss": res.losses[0] if res.losses else None, "last_loss": res.losses[-1] if res.losses else None,
        "eval": {k: ev.get(k) for k in ("method", "n", "accuracy", "majority_baseline",
                                        "per_kind_majority_baseline", "categories", "unparsable", "seconds")},
        "adapter_bytes": (Path(res.out_dir) / "adapters.safetensors").stat().st_size,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()},
    }
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
