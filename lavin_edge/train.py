"""The training loop: LaVIN's adapters on a frozen base (README), one process or many under
``torchrun`` (DDP; NCCL on GPU, gloo on CPU).

Design points:
- Frozen weights are cast to ``base_dtype`` (bf16 on GPU by default, fp32 on CPU); trainable tensors stay
  fp32 and the forward runs under autocast, so AdamW updates fp32 master weights.
- The loss of an optimizer step is the mean over *all* scored tokens of the step, every micro-batch on every
  rank (answer tokens; with ``text_loss = "kl"`` every position of the text-only samples): each micro-batch
  contributes sum(loss) x world / (global token count). DDP averages over
  ranks, so the update is exactly that of one process running the whole global batch (the 2-rank test).
- Data order is a function of (seed, epoch, step) only, so ``--resume`` can restart mid-epoch and
  continue bit-exactly; RNG states are saved per rank.
- Non-finite losses/gradients: the update is skipped (grads dropped), the step still counts, and the
  number of skipped steps is logged and printed.
- Every setting is checked before anything loads (``lavin_edge.training.recipe``); the run dir is refused
  when it holds a run, unless ``resume`` or ``overwrite``, and each save leaves it complete or refused
  (``lavin_edge.training.rundir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from lavin_edge.config import AdapterConfig
from lavin_edge.data import LavinDataset, Problems, collate_items, load_source
from lavin_edge.model.adapter import RoutedAdapter, VisualProjection
from lavin_edge.model.lavin import IGNORE_INDEX, Batch, LaVIN
from lavin_edge.training import checkpoint as ckpt
from lavin_edge.training import rundir
from lavin_edge.training.base import DTYPES, BaseSpec, base_configs, build_base
from lavin_edge.training.distributed import DistInfo, all_reduce_sum, setup, teardown
from lavin_edge.training.recipe import Locator, check_recipe, read_toml
from lavin_edge.training.schedule import WarmupCosine, build_optimizer, scaled_lr


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


# ---------------------------------------------------------------------------------------------- helpers

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown base_dtype {name!r}; choose from auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def cast_frozen(model: LaVIN, dtype: torch.dtype) -> None:
    """Frozen float tensors -> ``dtype``; trainable ones stay fp32 (master weights)."""
    for name, p in model.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if model.is_trainable_name(name) else dtype)
    for _, b in model.named_buffers():
        if b.is_floating_point():
            b.data = b.data.to(dtype)


def set_train_mode(model: LaVIN) -> None:
    """Only adapter dropout is stochastic; frozen modules stay in eval mode (EfficientNet's BatchNorm must
    not update its running stats). ``llm.training`` gates gradient checkpointing."""
    model.eval()
    for name, m in model.named_modules():
        if name.endswith(".adapter") or ".adapter." in name:
            m.train()
    model.llm.training = True


def init_from_adapters(model: LaVIN, path: str | Path) -> None:
    """Load trained adapters into ``model`` (fp32), refusing a file whose tensor names or shapes differ."""
    p = Path(path)
    if not (p / ckpt.ADAPTERS).is_file() and not p.is_file():
        raise FileNotFoundError(f"init_adapters: no {ckpt.ADAPTERS} at {p}")
    sd = ckpt.load_adapters(p)
    want = model.trainable_state_dict()
    if set(sd) != set(want):
        diff = sorted(set(sd) ^ set(want))
        raise ValueError(f"init_adapters {p}: tensor names differ from this recipe's model ({len(diff)}, e.g. "
                         f"{diff[:3]}): another base or adapter size?")
    bad = [k for k in want if sd[k].shape != want[k].shape]
    if bad:
        raise ValueError(f"init_adapters {p}: shapes differ from this recipe's model, e.g. {bad[0]} "
                         f"{tuple(sd[bad[0]].shape)} vs {tuple(want[bad[0]].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)


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


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over answer tokens, their count), in fp32."""
    target = labels[:, 1:].flatten()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target, ignore_index=IGNORE_INDEX,
                         reduction="sum")
    return ce, int((target != IGNORE_INDEX).sum())


def scored_positions(batch: Batch, text_kl: bool) -> torch.Tensor:
    """[B, T-1] bool: the positions whose next-token prediction is in the loss. Answer tokens; with ``text_kl``,
    every position of a text-only row up to its last answer token (right padding is never scored)."""
    mask = batch.labels[:, 1:] != IGNORE_INDEX
    text = batch.image_pos < 0
    if not text_kl or not bool(text.any()):
        return mask
    t = mask.shape[1]
    last = t - 1 - mask.flip(1).int().argmax(1)  # last answer position (rows without one score nothing)
    upto = (torch.arange(t, device=mask.device)[None] <= last[:, None]) & mask.any(1, keepdim=True)
    return torch.where(text[:, None], upto, mask)


def distill_loss_sum(logits: torch.Tensor, batch: Batch, model: LaVIN) -> tuple[torch.Tensor, int]:
    """``text_loss = "kl"``: CE on the answers of image rows plus KL(base || model) at every scored position of
    text-only rows (:func:`scored_positions`), summed in fp32, and the count of scored positions."""
    text = batch.image_pos < 0
    total, n = token_loss_sum(logits[~text], batch.labels[~text])
    if bool(text.any()):
        mask = scored_positions(batch, True)[text]
        target = F.log_softmax(model.base_logits(batch.input_ids[text])[:, :-1].float(), dim=-1)[mask]
        pred = F.log_softmax(logits[text][:, :-1].float(), dim=-1)[mask]
        total = total + F.kl_div(pred, target, reduction="sum", log_target=True)
        n += int(mask.sum())
    return total, n


def memory_estimate(counts: dict[str, int], cfg: TrainConfig, dtype: torch.dtype, llm_dim: int, n_layers: int,
                    vocab: int) -> dict[str, float]:
    """Rough peak memory in GiB: frozen weights + fp32 trainables x 4 (weights, grads, Adam m and v) +
    activations kept for backward (~16 tensors of [B, T, D] per layer, or 2 with checkpointing) + logits."""
    gib = 1024 ** 3
    elem = torch.finfo(dtype).bits // 8
    frozen = (counts["total_params"] - counts["trainable_params"]) * elem / gib
    trainable = counts["trainable_params"] * 4 * 4 / gib
    per_layer = 2 if cfg.gradient_checkpointing else 16
    tokens = cfg.batch_size * cfg.max_seq_len
    acts = tokens * llm_dim * n_layers * per_layer * max(elem, 2) / gib
    logits = tokens * vocab * 4 * 2 / gib
    return {"frozen_weights_gib": frozen, "trainable_state_gib": trainable, "activations_gib": acts,
            "logits_gib": logits, "total_gib": frozen + trainable + acts + logits}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------- data

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


# ---------------------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    skipped_steps: int
    losses: list[float]
    wall_s: float
    samples_per_s: float
    interrupted: bool = False
    bad_records: int = 0
    eval: dict[str, Any] | None = None
    model: LaVIN | None = field(default=None, repr=False)


def _micro_loss(model: nn.Module, batch: Batch, teacher: LaVIN | None = None) -> tuple[torch.Tensor, int]:
    """Forward one micro-batch (``teacher``: the model whose frozen base scores text rows, ``text_loss = "kl"``);
    a seam for tests that inject non-finite losses."""
    logits = model(batch)
    return token_loss_sum(logits, batch.labels) if teacher is None else distill_loss_sum(logits, batch, teacher)


def _write_step(what: str) -> None:
    """Called before each write of a save: the seam of the kill-at-every-write-step test."""


def train(cfg: TrainConfig, resume: bool = False, dry_run: bool = False, echo: Any = print,
          overwrite: bool = False) -> TrainResult | None:
    """Run a recipe. Returns None for ``dry_run`` (prints counts and a memory estimate, trains nothing).

    The run dir ``cfg.out_dir`` must be absent or empty, unless ``resume`` (continue its run, with the same
    settings) or ``overwrite`` (delete it once the model and data have loaded, and start over)."""
    cfg.validate()
    rundir.check_run_dir(cfg.out_dir, cfg.to_dict(), resume, overwrite)
    info = setup(cfg.device)
    log = echo if info.is_main else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, info, resume, dry_run, log, overwrite)
    finally:
        teardown(info)


def _train(cfg: TrainConfig, info: DistInfo, resume: bool, dry_run: bool, log: Any, overwrite: bool
           ) -> TrainResult | None:
    dtype = resolve_dtype(cfg.base_dtype, info.device)
    spec = BaseSpec(cfg.llm, cfg.vision, cfg.tokenizer, cfg.base_seed)
    adapter = AdapterConfig(hidden=cfg.adapter_hidden, temperature=cfg.temperature, dropout=cfg.dropout)
    problems = Problems(strict=cfg.strict_data)
    if dry_run:
        _dry_run(cfg, info, spec, adapter, problems, dtype, log)
        return None
    run = _start_run(cfg, info, spec, adapter, problems, dtype, resume, log)
    if info.is_main:
        if overwrite:
            rundir.clear_run_dir(run.out)  # the model and data loaded: the old run can go
        run.out.mkdir(parents=True, exist_ok=True)
        counts = run.ds.counts()
        log(f"trainable params {run.meta['params']['trainable_params']:,} | samples {counts['total']} "
            f"({counts.get('with_image', 0)} with image, {counts.get('text_only', 0)} text-only) | "
            f"global batch {run.global_batch} | lr {run.peak_lr:.3g} | steps {run.step}->{run.end_step} of "
            f"{run.plan.total_steps}")
    interrupted, wall, samples, step_rng = _run_steps(run, dtype, log)
    # Under torchrun, Ctrl-C reaches every worker (same process group), so all ranks get here together.
    _save(run, step_rng, final=True)
    result = TrainResult(run.out, run.step, run.skipped, run.losses, wall, samples / max(wall, 1e-9), interrupted,
                         len(problems.bad), model=run.model)
    if info.is_main:
        log(f"done: {run.step} steps, {run.skipped} skipped (non-finite), {wall:.1f} s, {result.samples_per_s:.2f} "
            f"samples/s, {len(problems.bad)} bad record(s) skipped -> {run.out}")
        if problems.bad:
            log(problems.summary())
        if isinstance(cfg.eval, dict) and not interrupted:
            result.eval = _final_eval(run.model, run.tok, cfg, dtype, run.out, run.step, log)
            result.interrupted = result.eval is None
    if interrupted and not info.is_main:
        sys.exit(130)
    return result


def _dry_run(cfg: TrainConfig, info: DistInfo, spec: BaseSpec, adapter: AdapterConfig, problems: Problems,
             dtype: torch.dtype, log: Any) -> None:
    """Counts, data and a memory estimate from a meta-device model: nothing is loaded or trained."""
    from lavin_edge.config import LavinConfig
    from lavin_edge.io.tokenizer import load_tokenizer
    from lavin_edge.model.lavin import build_lavin
    from lavin_edge.training.base import resolve_llm

    llm_cfg, vis_cfg = base_configs(spec)
    meta_model = build_lavin(LavinConfig(llm_cfg, vis_cfg, adapter), "meta")
    tok_spec = cfg.tokenizer or ("bytes" if cfg.llm.startswith("preset:") else resolve_llm(cfg.llm))
    tok = load_tokenizer(tok_spec)
    ds = build_dataset(cfg, tok, meta_model.n_visual, vis_cfg.image_size, problems)
    counts = meta_model.count_parameters()
    plan = StepPlan(len(ds), cfg, info)
    global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
    mem = memory_estimate(counts, cfg, dtype, llm_cfg.dim, llm_cfg.n_layers, llm_cfg.vocab_size)
    log(json.dumps({"parameters": counts, "data": ds.counts(), "bad_records": len(problems.bad),
                    "global_batch": global_batch, "lr": cfg.lr or scaled_lr(cfg.base_lr, global_batch),
                    "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
                    "base_dtype": str(dtype).removeprefix("torch."), "memory_estimate": mem}, indent=2))
    if problems.bad:
        log(problems.summary())


@dataclass
class _Run:
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


def _start_run(cfg: TrainConfig, info: DistInfo, spec: BaseSpec, adapter: AdapterConfig, problems: Problems,
               dtype: torch.dtype, resume: bool, log: Any) -> _Run:
    """Load the base and the data, build fresh (or initial, or resumed) adapters, optimiser and schedule."""
    out = Path(cfg.out_dir)
    model, tok, tok_spec = build_base(spec, adapter, cfg.max_seq_len)
    seed_all(cfg.seed + 1)
    # Fresh adapters from the training seed (the base seed only fixes preset base weights).
    for m in model.modules():
        if isinstance(m, (RoutedAdapter, VisualProjection)):
            m.reset_parameters()
    model.modality_embedding.reset_parameters()
    if cfg.init_adapters:
        init_from_adapters(model, cfg.init_adapters)
        log(f"adapters initialised from {cfg.init_adapters}")
    cast_frozen(model, dtype)
    model.to(info.device)
    model.llm.gradient_checkpointing = cfg.gradient_checkpointing
    ds = build_dataset(cfg, tok, model.n_visual, model.cfg.vision.image_size, problems)
    plan = StepPlan(len(ds), cfg, info)
    global_batch = cfg.batch_size * cfg.accum_steps * info.world_size
    peak_lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, global_batch)
    optimizer = build_optimizer(model, peak_lr, cfg.weight_decay, tuple(cfg.betas))  # type: ignore[arg-type]
    warmup = round(cfg.warmup_epochs * plan.steps_per_epoch)
    sched = WarmupCosine(optimizer, peak_lr, warmup, plan.total_steps, cfg.min_lr)
    end_step = plan.total_steps if cfg.max_steps is None else min(plan.total_steps, cfg.max_steps)
    meta = {"format": "lavin-edge-adapters", "lavin_config": model.cfg.to_dict(),
            "base": {**spec.to_dict(), "llm": _abs(spec.llm), "vision": _abs(spec.vision)},
            "tokenizer": _abs(tok_spec) if tok_spec else None, "recipe": cfg.to_dict(),
            "params": model.count_parameters()}
    run = _Run(cfg, info, out, model, model, tok, ds, plan, optimizer, sched, peak_lr, global_batch, end_step,
               meta)

    seed_all(cfg.seed * 1000 + info.rank)  # dropout masks: reproducible, different per rank
    if resume:
        state = ckpt.load_trainer_state(out)
        if state["world_size"] != info.world_size or state["global_batch"] != global_batch:
            raise ValueError(f"{out}: resume needs the same world size and batch "
                             f"(saved {state['world_size']} x {state['global_batch']})")
        model.load_state_dict({k: v.to(info.device) for k, v in ckpt.load_adapters(out).items()}, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        run.step, run.skipped, run.losses = state["step"], state["skipped_steps"], list(state["losses"])
        set_rng_state(state["rng"][info.rank])
        log(f"resumed from {out} at step {run.step}")

    if info.enabled:
        # find_unused_parameters: text-only batches leave the vision adapters and the projection unused.
        run.ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=True)
    set_train_mode(model)
    return run


def _run_steps(run: _Run, dtype: torch.dtype, log: Any) -> tuple[bool, float, int, dict[str, Any]]:
    """Optimizer steps until the end step or Ctrl-C/SIGTERM, saving every ``save_every``. Returns
    (interrupted, wall seconds, samples, the RNG state a resume restores)."""
    cfg, info = run.cfg, run.info
    autocast = torch.autocast(info.device.type, dtype=dtype, enabled=dtype != torch.float32)
    bar = _progress(cfg.progress and info.is_main, run.step, run.end_step)
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if _in_main_thread() else None
    t0 = time.perf_counter()
    samples = 0
    interrupted = False
    step_rng = rng_state()
    try:
        while run.step < run.end_step:
            step_rng = rng_state()  # what resume restores if this step is cut off
            loss_val, ok = _train_step(run.ddp, run.model, run.ds, run.plan.micro_batches(run.step), info,
                                       autocast, run.tok.pad_id, cfg.text_loss == "kl")
            if ok:
                run.optimizer.step()
            else:
                run.skipped += 1
            run.optimizer.zero_grad(set_to_none=True)
            lr = run.sched.lr
            run.sched.step()
            run.step += 1
            samples += run.global_batch
            run.losses.append(loss_val)
            elapsed = time.perf_counter() - t0
            sps = samples / max(elapsed, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}", skipped=run.skipped)
                bar.update(1)
            if info.is_main and (run.step % cfg.log_every == 0 or run.step == run.end_step):
                run.pending_log.append(json.dumps({
                    "step": run.step, "loss": loss_val, "lr": lr, "samples_per_s": sps, "elapsed_s": elapsed,
                    "skipped_steps": run.skipped}) + "\n")
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < run.end_step:
                _save(run, rng_state())
        step_rng = rng_state()
    except KeyboardInterrupt:
        interrupted = True
        run.optimizer.zero_grad(set_to_none=True)
        log(f"\ninterrupted: saving step {run.step} to {run.out} (continue with --resume)")
    finally:
        if bar is not None:
            bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return interrupted, time.perf_counter() - t0, samples, step_rng


def _save(run: _Run, rng: dict[str, Any], final: bool = False) -> None:
    """Write a checkpoint of ``run`` (rank 0; every rank sends its RNG state): each new file under a temporary
    name first, so the previous checkpoint stays complete until the marker says otherwise."""
    rngs = _gather(rng, run.info)
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


def _final_eval(model: LaVIN, tok: Any, cfg: TrainConfig, dtype: torch.dtype, out: Path, step: int, log: Any
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


def _train_step(ddp: nn.Module, model: LaVIN, ds: LavinDataset, micro: list[list[int]], info: DistInfo,
                autocast: Any, pad_id: int, text_kl: bool = False) -> tuple[float, bool]:
    """Forward/backward every micro-batch of one optimizer step. Returns (mean token loss, update ok)."""
    batches = [collate_items([ds[i] for i in idx], pad_id).to(info.device) for idx in micro]
    local_count = sum(int(scored_positions(b, text_kl).sum()) for b in batches)
    global_count = int(all_reduce_sum(torch.tensor([local_count], dtype=torch.float64), info).item())
    scale = info.world_size / max(global_count, 1)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for m, batch in enumerate(batches):
        last = m == len(batches) - 1
        sync = contextlib.nullcontext() if (last or not info.enabled) else ddp.no_sync()  # type: ignore[operator]
        with sync:
            with autocast:
                ce, _ = _micro_loss(ddp, batch, model if text_kl else None)
            # A non-finite loss still goes through backward (DDP needs every rank to reduce); its NaN
            # gradients then fail the check below and the whole update is dropped.
            (ce * scale).backward()
        loss_sum += ce.detach().double().cpu()
    total = float(all_reduce_sum(loss_sum.reshape(1), info).item()) / max(global_count, 1)
    ok = math.isfinite(total) and all(
        bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return total, ok


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _abs(spec: str) -> str:
    """Recorded base locations: absolute paths for files, names and presets as they are. A packaged base stays
    a name ("smollm2-135m"): its file path is per install (site-packages), and the shipped demo adapters'
    config.json must load on any machine."""
    p = Path(spec)
    return str(p.resolve()) if p.exists() else spec


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
