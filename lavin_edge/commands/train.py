"""`lavin-edge train`: train LaVIN's adapters on a frozen base from a TOML recipe (``recipes/*.toml``).

One process: ``lavin-edge train recipes/demo.toml``. Many GPUs/nodes: the same command under
``torchrun --nproc-per-node N -m lavin_edge.cli train ...`` (DDP; rank 0 logs and saves)."""

from __future__ import annotations

import sys

import click

from lavin_edge.commands.options import bounded_threads, threads_option

EPILOG = ("The run dir (--out) must not exist or be empty, unless --resume (continue it, with its own settings) or "
          "--overwrite (delete an earlier run in it and start over; a dir that holds anything but a run is refused, "
          "never deleted). It is complete when it holds lavin-edge-complete.json, written "
          "last at each save: a run killed mid-save keeps its previous checkpoint or is refused by --resume, merge "
          "and eval, never half-read. Every "
          "option and recipe key is checked before any model loads; bad input is one line on stderr, exit 2.")


@click.command(name="train", epilog=EPILOG)
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", help="Run dir (adapters.safetensors, config.json, trainer_state.pt, "
              "train_log.jsonl); must not hold a run unless --resume or --overwrite.")
@click.option("--llm", help="Frozen LLM: checkpoint path, .gguf, smollm2-135m, or preset:NAME.")
@click.option("--vision", help="Vision tower: efficientnet-lite0, a CLIP checkpoint, or preset:NAME.")
@click.option("--tokenizer", help="Tokenizer file (default: the LLM's own; 'bytes' for presets).")
@click.option("--init-adapters", help="Start from these trained adapters (a train output dir) instead of fresh ones.")
@click.option("--batch-size", type=click.IntRange(1), help="Per-rank micro-batch size.")
@click.option("--accum-steps", type=click.IntRange(1), help="Gradient accumulation steps per optimizer step.")
@click.option("--epochs", type=click.FloatRange(0, min_open=True))
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many optimizer steps.")
@click.option("--base-lr", type=click.FloatRange(0), help="lr = base_lr x global batch / 256.")
@click.option("--lr", type=click.FloatRange(0), help="Absolute peak lr (overrides --base-lr).")
@click.option("--warmup-epochs", type=click.FloatRange(0))
@click.option("--max-seq-len", type=click.IntRange(2))
@click.option("--seed", type=int)
@click.option("--base-dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--device", type=click.Choice(["cpu", "cuda"]))
@threads_option("torch CPU threads (default: the recipe's, bounded the same way)")
@click.option("--save-every", type=click.IntRange(0), help="Checkpoint every N optimizer steps (0: at the end).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--strict-data/--skip-bad-data", default=None, help="Fail on the first bad record, or skip and count.")
@click.option("--resume", is_flag=True, help="Continue bit-exactly from the checkpoint in the run dir (same "
              "settings; only --max-steps, --save-every, --threads, --device, progress and eval may change).")
@click.option("--overwrite", is_flag=True, help="Delete the run dir's old run (once the model and data have "
              "loaded) and start over; only a run is ever deleted.")
@click.option("--no-eval", is_flag=True, help="Skip the recipe's [eval] after training (same as `eval = false`).")
@click.option("--dry-run", is_flag=True, help="Print trainable params, data counts and a memory estimate; no training.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still go to train_log.jsonl).")
def command(recipe: str, out_dir: str | None, llm: str | None, vision: str | None, tokenizer: str | None,
            init_adapters: str | None, batch_size: int | None, accum_steps: int | None, epochs: float | None,
            max_steps: int | None,
            base_lr: float | None, lr: float | None, warmup_epochs: float | None, max_seq_len: int | None,
            seed: int | None, base_dtype: str | None, device: str | None, threads: int | None,
            save_every: int | None, gradient_checkpointing: bool | None, strict_data: bool | None, resume: bool,
            overwrite: bool, no_eval: bool, dry_run: bool, no_progress: bool) -> None:
    """Train adapters from RECIPE (a TOML file); flags override the recipe."""
    from lavin_edge.training.config import load_recipe
    from lavin_edge.training.loop import train

    overrides = {"out_dir": out_dir, "llm": llm, "vision": vision, "tokenizer": tokenizer,
                 "init_adapters": init_adapters, "batch_size": batch_size,
                 "accum_steps": accum_steps, "epochs": epochs, "max_steps": max_steps, "base_lr": base_lr, "lr": lr,
                 "warmup_epochs": warmup_epochs, "max_seq_len": max_seq_len, "seed": seed, "base_dtype": base_dtype,
                 "device": device, "threads": threads, "save_every": save_every,
                 "gradient_checkpointing": gradient_checkpointing, "strict_data": strict_data}
    if no_progress:
        overrides["progress"] = False
    if no_eval:
        overrides["eval"] = False
    # Bad settings raise RecipeError / OutputDirError / DataError (ValueErrors): one line, exit 2 (lavin_edge.cli).
    cfg = load_recipe(recipe, overrides)
    if threads is None:  # the recipe's own `threads`, bounded as the option is
        cfg.threads = bounded_threads(cfg.threads, "the recipe's threads =")
    result = train(cfg, resume=resume, dry_run=dry_run, echo=lambda *a: click.echo(*a, err=True),
                   overwrite=overwrite)
    if result is not None and result.interrupted:
        sys.exit(130)
