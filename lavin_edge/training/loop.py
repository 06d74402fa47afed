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
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lavin_edge.config import AdapterConfig
from lavin_edge.data import LavinDataset, Problems, collate_items
from lavin_edge.model.adapter import RoutedAdapter, VisualProjection
from lavin_edge.model.lavin import Batch, LaVIN
from lavin_edge.training import checkpoint as ckpt
from lavin_edge.training import rundir
from lavin_edge.training.base import BaseSpec, base_configs, build_base
from lavin_edge.training.config import TrainConfig
from lavin_edge.training.distributed import DistInfo, all_reduce_sum, setup, teardown
from lavin_edge.training.final_eval import final_eval
from lavin_edge.training.losses import distill_loss_sum, scored_positions, token_loss_sum
from lavin_edge.training.plan import StepPlan, build_dataset
from lavin_edge.training.prepare import cast_frozen, init_from_adapters, memory_estimate, resolve_dtype, set_train_mode
from lavin_edge.training.save import save_checkpoint
from lavin_edge.training.schedule import WarmupCosine, build_optimizer, scaled_lr
from lavin_edge.training.state import Run, rng_state, seed_all, set_rng_state


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


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
    save_checkpoint(run, step_rng, final=True)
    result = TrainResult(run.out, run.step, run.skipped, run.losses, wall, samples / max(wall, 1e-9), interrupted,
                         len(problems.bad), model=run.model)
    if info.is_main:
        log(f"done: {run.step} steps, {run.skipped} skipped (non-finite), {wall:.1f} s, {result.samples_per_s:.2f} "
            f"samples/s, {len(problems.bad)} bad record(s) skipped -> {run.out}")
        if problems.bad:
            log(problems.summary())
        if isinstance(cfg.eval, dict) and not interrupted:
            result.eval = final_eval(run.model, run.tok, cfg, dtype, run.out, run.step, log)
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


def _start_run(cfg: TrainConfig, info: DistInfo, spec: BaseSpec, adapter: AdapterConfig, problems: Problems,
               dtype: torch.dtype, resume: bool, log: Any) -> Run:
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
    run = Run(cfg, info, out, model, model, tok, ds, plan, optimizer, sched, peak_lr, global_batch, end_step,
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


def _run_steps(run: Run, dtype: torch.dtype, log: Any) -> tuple[bool, float, int, dict[str, Any]]:
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
                save_checkpoint(run, rng_state())
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
