"""A training run's settings: ``TrainConfig`` (every recipe key, its default and its check) and
``load_recipe`` (a TOML recipe plus CLI overrides -> a checked config, before anything loads)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lavin_edge.training import rundir
from lavin_edge.training.recipe import Locator, check_recipe, read_toml


@dataclass
class TrainConfig:
    """A recipe (``recipes/*.toml``); CLI flags override fields. ``batch_size`` is per rank and micro-step."""

    # base
    llm: str = "preset:tiny"
    vision: str = "preset:tiny"
    tokenizer: str | None = None
    base_seed: int = 0
    base_dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # adapters
    adapter_hidden: int = 8
    temperature: float = 10.0
    dropout: float = 0.1
    # Start from trained adapters (a `lavin-edge train` output dir or its adapters.safetensors) instead of fresh
    # ones: a second stage on new data. Shapes must match this recipe's base and adapter sizes.
    init_adapters: str | None = None
    # data: a list of source tables (see lavin_edge.data.sources.load_source)
    data: list[dict[str, Any]] = field(default_factory=list)
    max_seq_len: int = 512
    strict_data: bool = False
    # How text-only samples are scored. "ce": cross-entropy on their answer tokens, like image samples.
    # "kl": KL divergence from the frozen base's next-token distribution at every position of the sample
    # (prompt and answer), so the text route learns to stay the base LLM (what LaVIN's routing promises);
    # needed by [[data]] type = "prose".
    text_loss: str = "ce"
    # optimisation
    batch_size: int = 4
    accum_steps: int = 1
    epochs: float = 20.0
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans `epochs`)
    warmup_epochs: float = 2.0
    base_lr: float = 9e-3  # lr = base_lr * global_batch / 256 unless `lr` is set
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    gradient_checkpointing: bool = False
    seed: int = 0
    # run
    out_dir: str = "runs/train"
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    log_every: int = 1
    device: str | None = None  # cpu | cuda | None (cuda if available)
    threads: int | None = None  # torch intra-op threads (CPU)
    num_workers: int = 0
    progress: bool = True
    # Held-out evaluation at the end (lavin_edge.evaluate.run_eval_spec); false or None: none.
    eval: dict[str, Any] | bool | None = None

    @classmethod
    def fields(cls) -> dict[str, str]:
        """Field name -> annotation (what :func:`check_recipe` checks values against)."""
        return {f.name: str(f.type) for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], locator: Locator | None = None) -> TrainConfig:
        """Checked (names, types, ranges, files): RecipeError names the key's file and line, or its flag."""
        check_recipe(d, cls.fields(), locator)
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        check_recipe(self.to_dict(), self.fields())


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML recipe; ``overrides`` (CLI flags that were given) win over its values. Everything is
    checked here, before any model loads."""
    d, text = read_toml(path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    d.update(given)
    return TrainConfig.from_dict(d, Locator(path, text, {k: rundir.flag_of(k) for k in given}))
