"""``train``'s run directory: refused when it already holds something (unless ``--resume`` or ``--overwrite``),
and saved so that a kill at any moment leaves either a complete checkpoint or one that is refused.

A save first writes every new file under a temporary name (the previous checkpoint stays complete meanwhile),
then removes the completeness marker of ``lavin_edge.io.outdir`` (:func:`begin_save`), renames the new files
into place and writes the marker again, last (:func:`end_save`). A run dir without the marker is refused by
``train --resume``, ``merge`` and ``eval``; one with it holds adapters, config and trainer state of one and
the same step. A kill during the renames (a few system calls) leaves a refused dir; anywhere else, the
previous or the new checkpoint. ``train_log.jsonl`` is part of the saved state: rewritten at each save with
the steps up to the checkpoint, so a resumed run does not log the lost steps twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lavin_edge.io.outdir import (
    COMPLETE_MARKER,
    RUN_FORMAT,
    OutputDirError,
    describe,
    marker_format,
    require_complete,
    write_marker,
)
from lavin_edge.training import checkpoint as ckpt

__all__ = ["RESUMABLE_KEYS", "begin_save", "check_run_dir", "clear_run_dir", "end_save", "remove_stale_temps",
           "stage_log"]

LOG = "train_log.jsonl"
# Every file a run dir holds; a dir of these alone (and a save's hidden temporaries) is a run killed mid-save.
RUN_FILES = frozenset({ckpt.ADAPTERS, ckpt.CONFIG, ckpt.TRAINER_STATE, LOG, "eval.json", "loss.png", COMPLETE_MARKER})

# Settings a resumed run may change: they do not alter what the saved optimizer, schedule and data order mean.
RESUMABLE_KEYS = frozenset({"max_steps", "save_every", "log_every", "progress", "threads", "num_workers", "eval",
                            "out_dir", "device", "strict_data"})
# The flag that sets a recipe key, for messages (default: --key-with-dashes).
FLAGS = {"out_dir": "--out", "progress": "--no-progress", "eval": "--no-eval",
         "strict_data": "--strict-data/--skip-bad-data"}


def flag_of(key: str) -> str:
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def _normal(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples -> lists, as config.json holds them


def _saved_step(out: Path) -> int | None:
    try:
        return int(ckpt.load_artifact_config(out)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holds_a_run(out: Path) -> bool:
    """A run dir: complete (its marker says so) or killed mid-save (no marker, only the files a run writes)."""
    if (out / COMPLETE_MARKER).exists():
        return marker_format(out) == RUN_FORMAT
    return all(p.is_file() and (p.name in RUN_FILES or p.name.startswith(".")) for p in out.iterdir())


def check_run_dir(out: str | Path, recipe: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Refuse, before anything loads: ``--resume`` with ``--overwrite``; a dir that holds something other than
    a run (a model, the user's files: even ``--overwrite`` deletes only a run); a fresh run onto a dir that
    holds a run (unless ``overwrite``); ``--resume`` of a dir without a complete checkpoint, of a finished run,
    or with settings that differ from the saved run's (their old values cannot be honoured: the saved optimizer
    and schedule carry them)."""
    out = Path(out)
    if resume and overwrite:
        raise OutputDirError("--resume continues the run in the run dir and --overwrite deletes it: choose one")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"run dir {out} exists and is not a directory; choose another --out")
    busy = out.is_dir() and any(out.iterdir())
    if busy and not holds_a_run(out):
        raise OutputDirError(f"run dir {out} is not a training run: it holds {describe(out)}; choose another "
                             "--out (--overwrite replaces only an earlier run; nothing was deleted)")
    if not resume:
        if not busy or overwrite:
            return
        try:
            require_complete(out, what="run dir")
        except OutputDirError:
            raise OutputDirError(f"run dir {out} exists and does not hold a complete run (no {COMPLETE_MARKER}: "
                                 "interrupted, or not a run dir); pass --overwrite to delete it and start over, or "
                                 "choose another --out") from None
        raise OutputDirError(f"run dir {out} already holds a run (saved at step {_saved_step(out)}); continue it "
                             "with --resume, pass --overwrite to delete it and start over, or choose another --out")
    if not busy:
        raise OutputDirError(f"--resume: run dir {out} holds no run to resume; start one without --resume")
    try:
        require_complete(out, what="run dir")
    except OutputDirError as e:
        raise OutputDirError(f"--resume: {e} (pass --overwrite instead of --resume to start over)") from None
    saved = ckpt.load_artifact_config(out)
    old = _normal(saved.get("recipe", {}))
    new = _normal(recipe)
    diff = [k for k in sorted(set(old) | set(new)) if k not in RESUMABLE_KEYS and old.get(k) != new.get(k)]
    if diff:
        changeable = ", ".join(sorted(RESUMABLE_KEYS - {"out_dir"}))
        parts = [f"{k} {json.dumps(new.get(k))} (the run: {json.dumps(old.get(k))}; {flag_of(k)})" for k in diff]
        raise OutputDirError(f"--resume continues the run in {out} with its own settings, and these differ from "
                             f"it: {'; '.join(parts)}. Drop them to continue, or start a new run (--overwrite or "
                             f"another --out). A resumed run may change only: {changeable}")
    state = ckpt.load_trainer_state(out)
    total = int(state["scheduler"]["total"])
    end = total if recipe.get("max_steps") is None else min(total, int(recipe["max_steps"]))
    if int(state["step"]) >= end:
        more = (f"raise --max-steps (up to {total}) to train further, " if state["step"] < total
                else "its schedule is complete; ")
        raise OutputDirError(f"--resume: the run in {out} is finished (step {state['step']} of {end}); {more}"
                             "or pass --overwrite to start over")


def clear_run_dir(out: str | Path) -> None:
    """``--overwrite``: the marker goes first, so that a kill while deleting never leaves a dir that is
    accepted."""
    out = Path(out)
    if not out.is_dir():
        return
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove_stale_temps(out: str | Path) -> None:
    """Temporary files a killed save left behind (``.NAME.*.tmp``); the marker does not list them, so removing
    them keeps a complete dir complete."""
    out = Path(out)
    if out.is_dir():
        for p in out.iterdir():
            if p.is_file() and p.name.startswith(".") and ".tmp" in p.name:
                p.unlink(missing_ok=True)


def stage_log(out: str | Path, new_lines: list[str]) -> tuple[Path, Path]:
    """(staged temporary file, final path) of ``train_log.jsonl``: its saved lines plus ``new_lines``."""
    path = Path(out) / LOG
    old = path.read_bytes() if path.is_file() else b""
    return ckpt.stage(path, lambda p: Path(p).write_bytes(old + "".join(new_lines).encode())), path


def begin_save(out: str | Path) -> None:
    """From here until :func:`end_save` the run dir is incomplete (refused by resume, merge and eval)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / COMPLETE_MARKER).unlink(missing_ok=True)


def end_save(out: str | Path, step: int, finished: bool) -> None:
    write_marker(out, format=RUN_FORMAT, step=step, finished=finished)
