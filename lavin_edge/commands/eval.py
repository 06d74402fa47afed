"""`lavin-edge eval`: accuracy of trained adapters on a ScienceQA-format split (or easy-vqa), with the
per-category table (NAT/SOC/LAN, TXT/IMG/NO, G1-6/G7-12, average)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from lavin_edge.commands.options import activations_option, device_option, threads_option

EASY_VQA_NAMES = ("easy-vqa", "easy-vqa-mc")


@click.command(name="eval")
@activations_option
@device_option
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", "data", required=True,
              help="A ScienceQA root (problems.json, pid_splits.json, images/), or 'easy-vqa' / 'easy-vqa-mc'.")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(1),
              help="Evaluate the first N questions (easy-vqa: a seeded random N); N >= 1.")
@click.option("--method", type=click.Choice(["generate", "score"]), default="generate", show_default=True,
              help="generate: greedy answer, parsed with 'The answer is X' (multiple choice) or read whole (easy-vqa "
                   "open; yes/no: its last word); score: best-likelihood option right after the prompt (faster; not "
                   "for models trained with easy-vqa `explain`, which answer yes/no after an explanation).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=24, show_default=True)
@click.option("--base-dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@threads_option("torch CPU threads")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the full result (with predictions).")
@click.option("--progress/--no-progress", default=True)
def command(model_dir: str, data: str, split: str, limit: int | None, method: str, max_new_tokens: int,
            base_dtype: str, threads: int | None, json_out: str | None, progress: bool, device: str) -> None:
    """Accuracy of the trained adapters in MODEL_DIR (the run dir of `lavin-edge train`, not a merged or
    quantized model)."""
    import torch

    from lavin_edge.data.records import Problems
    from lavin_edge.data.sources import load_source
    from lavin_edge.evaluate import evaluate_records, format_table
    from lavin_edge.training.base import DTYPES, load_trained_artifact, read_run_config

    # Everything is checked before the model loads; bad input is one line, exit 2 (lavin_edge.cli).
    read_run_config(model_dir)
    if data in EASY_VQA_NAMES:
        spec = {"type": "easy-vqa", "mode": "mc" if data.endswith("-mc") else "open", "limit": limit}
        if split not in ("train", "test"):
            raise click.BadParameter(f"easy-vqa has the splits train and test, not {split!r}", param_hint="--split")
    elif Path(data, "problems.json").is_file() and Path(data, "pid_splits.json").is_file():
        spec = {"type": "scienceqa", "root": data}
    else:
        raise click.BadParameter(f"{data!r} is neither {' nor '.join(repr(n) for n in EASY_VQA_NAMES)} nor a "
                                 "ScienceQA root (a directory with problems.json, pid_splits.json and images/)",
                                 param_hint="--data")
    if json_out and not Path(json_out).resolve().parent.is_dir():
        raise click.BadParameter(f"the directory of {json_out} does not exist", param_hint="--json")
    if threads:
        torch.set_num_threads(threads)
    problems = Problems()
    records = load_source(spec, problems, split=split)
    if limit is not None:
        records = records[:limit]
    model, tok, _ = load_trained_artifact(model_dir)
    model.to(device)  # the training model in PyTorch: on the GPU with --device cuda
    dtype = DTYPES[base_dtype]
    if dtype != torch.float32:
        from lavin_edge.training.prepare import cast_frozen

        cast_frozen(model, dtype)
    cands = None
    if spec["type"] == "easy-vqa" and spec["mode"] == "open":
        import easy_vqa

        cands = list(easy_vqa.get_answers())
    result = evaluate_records(model, tok, records, method, max_new_tokens, cands, dtype, problems, progress)
    click.echo(format_table(result))
    if result["unparsable"]:
        click.echo(f"unparsable ({len(result['unparsable'])}): {', '.join(result['unparsable'][:20])}")
    if problems.bad:
        click.echo(problems.summary())
    if json_out:
        Path(json_out).write_text(json.dumps({**result, "model": str(model_dir), "data": data, "split": split},
                                             indent=2))
