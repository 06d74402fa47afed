"""Output directories that appear whole or not at all.

Every command that writes a directory (``train``'s run dir, ``merge``, ``quantize``, the demo build) goes
through here, so that an interrupted run (Ctrl-C, kill -9, a full disk) leaves either the previous complete
output or none, never a mix of new tensors and an old ``config.json`` that a later command accepts:

- :func:`check_output` refuses, before any model loads, an output that exists (unless ``overwrite``) and an
  output that is, contains or lies inside one of the inputs;
- :func:`atomic_dir` hands out a temporary sibling ``.NAME.tmp-*`` to write into; on success it writes the
  completeness marker last, then renames the sibling into place (the old output, if any, is renamed aside
  first and removed after); on any error the sibling is removed and the old output is untouched;
- :func:`require_complete` refuses a directory without the marker, or whose files no longer have the sizes
  the marker recorded (a truncated or half-replaced file).

A rename within one directory is atomic on POSIX file systems; between the two renames of a replacement the
output is briefly absent, which a reader sees as "no output", never as a mixed one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["COMPLETE_MARKER", "OutputDirError", "atomic_dir", "check_output", "is_complete", "require_complete",
           "write_marker"]

COMPLETE_MARKER = "lavin-edge-complete.json"


class OutputDirError(ValueError):
    """An output directory that cannot be written as asked, or an input directory that was never finished."""


def _same_or_nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_output(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                 what: str = "output") -> Path:
    """Validate ``out`` before any work starts; returns it as a Path.

    Refused: ``out`` is (or contains, or lies inside) one of ``inputs``; ``out`` exists and is not an empty
    directory, unless ``overwrite``; ``out`` exists and is a file."""
    out = Path(out)
    for src in inputs:
        if src is not None and Path(src).exists() and _same_or_nested(out, Path(src)):
            raise OutputDirError(f"{what} {out} is the input {src} or overlaps it: writing it would destroy the "
                                 "input; choose another output directory")
    if out.exists():
        if not out.is_dir():
            raise OutputDirError(f"{what} {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise OutputDirError(f"{what} {out} already exists; pass --overwrite to replace it (the old one is "
                                 "kept until the new one is complete)")
    return out


def _fsync_tree(root: Path) -> None:
    """Flush the files' data before the rename that publishes them (best effort: not every FS supports it)."""
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_marker(root: str | Path, **info: object) -> Path:
    """Write the completeness marker of ``root``: every file's size, so that a later truncation shows.
    Call it last, after every other file of the directory is written."""
    root = Path(root)
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER}
    marker = root / COMPLETE_MARKER
    tmp = marker.with_name(marker.name + ".part")
    tmp.write_text(json.dumps({"complete": True, **info, "files": files}, indent=1) + "\n")
    os.replace(tmp, marker)
    return marker


def is_complete(root: str | Path) -> bool:
    try:
        require_complete(root)
    except OutputDirError:
        return False
    return True


def require_complete(root: str | Path, what: str = "directory") -> dict[str, object]:
    """The marker's content, or OutputDirError naming what is wrong (missing marker, a file missing or of
    another size than when the directory was completed)."""
    root = Path(root)
    marker = root / COMPLETE_MARKER
    if not marker.is_file():
        raise OutputDirError(f"{what} {root} is incomplete: it has no {COMPLETE_MARKER} (the command that wrote "
                             "it was interrupted, or it was written by an older lavin-edge); write it again")
    try:
        info = json.loads(marker.read_text())
        files = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputDirError(f"{marker}: unreadable completeness marker ({e}); write {root} again") from e
    for name, size in files.items():
        p = root / name
        if not p.is_file():
            raise OutputDirError(f"{what} {root} is damaged: {name} is missing; write it again")
        if p.stat().st_size != size:
            raise OutputDirError(f"{what} {root} is damaged: {name} has {p.stat().st_size} bytes, {size} when it "
                                 "was written; write it again")
    return info


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False, marker: dict[str, object] | None = None
               ) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to write into; publish it as ``out`` when the block ends
    without an error (marker written last, then renamed into place), remove it otherwise.

    ``overwrite`` allows replacing an existing ``out``; without it an existing non-empty ``out`` is refused
    (call :func:`check_output` earlier, before loading models, to fail fast)."""
    out = Path(out)
    check_output(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        write_marker(tmp, **(marker or {}))
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
