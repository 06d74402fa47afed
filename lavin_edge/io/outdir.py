"""Output directories that appear whole or not at all.

Every command that writes a directory (``train``'s run dir, ``merge``, ``quantize``, the demo build) goes
through here, so that an interrupted run (Ctrl-C, kill -9, a full disk) leaves either the previous complete
output or none, never a mix of new tensors and an old ``config.json`` that a later command accepts:

- :func:`check_output` refuses, before any model loads, an output that exists (unless ``overwrite``, which
  replaces only an earlier output of the same kind, recognised by its completeness marker, or an empty
  directory: never a directory of the user's own files) and an output that is, contains or lies inside one of
  the inputs; it also removes what killed runs left beside the output (:func:`remove_stale_siblings`);
- :func:`atomic_dir` hands out a temporary sibling ``.NAME.tmp-PID-HOST-*`` to write into; on success it writes
  the completeness marker last, then renames the sibling into place (the old output, if any, is renamed aside
  to ``.NAME.old-PID-HOST-*`` first and removed after); on any error the sibling is removed and the old output
  is untouched;
- :func:`require_complete` refuses a directory without the marker, or whose files no longer have the sizes
  the marker recorded (a truncated or half-replaced file).

A rename within one directory is atomic on POSIX file systems; between the two renames of a replacement the
output is briefly absent, which a reader sees as "no output", never as a mixed one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["COMPLETE_MARKER", "MODEL_FORMAT", "RUN_FORMAT", "OutputDirError", "StaleOutputRemoved", "atomic_dir",
           "check_output", "describe", "is_complete", "marker_format", "remove_stale_siblings", "require_complete",
           "write_marker"]

COMPLETE_MARKER = "lavin-edge-complete.json"
MODEL_FORMAT = "lavin-edge-merged"  # the marker of a merged or quantized model dir (lavin_edge.modeldir.FORMAT)
RUN_FORMAT = "lavin-edge-run"  # the marker of a training run dir (lavin_edge.training.rundir)
# What each marker format is, for messages about a directory that holds one.
KINDS = {MODEL_FORMAT: "a lavin-edge model (the output of merge or quantize)",
         RUN_FORMAT: "a lavin-edge training run (the output of train)"}
# A temporary sibling made by a run of an older release (no process id in its name) is taken as abandoned
# once nothing in it has changed for this long: a live run writes into it without pause.
LEGACY_STALE_S = 3600.0


class StaleOutputRemoved(UserWarning):
    """A temporary sibling left by a killed run was removed (or a replaced output restored)."""


class OutputDirError(ValueError):
    """An output directory that cannot be written as asked, or an input directory that was never finished."""


def _same_or_nested(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def marker_format(root: str | Path) -> str | None:
    """The ``format`` its completeness marker records (None: no marker, or one without a format)."""
    try:
        fmt = json.loads((Path(root) / COMPLETE_MARKER).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) else None


def describe(root: str | Path) -> str:
    """What a non-empty directory holds, in words, by its marker."""
    root = Path(root)
    fmt = marker_format(root)
    if fmt is not None:
        return KINDS.get(fmt, f"a lavin-edge output of format {fmt!r}")
    if (root / COMPLETE_MARKER).exists():
        return "a lavin-edge output with an unreadable marker"
    try:
        cfg_format = json.loads((root / "config.json").read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        cfg_format = ""
    if str(cfg_format).startswith("lavin-edge"):
        return f"an incomplete or older lavin-edge output (no {COMPLETE_MARKER}; delete it yourself if it can go)"
    return "files that lavin-edge did not write"


def check_output(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                 what: str = "output", replaces: str = MODEL_FORMAT) -> Path:
    """Validate ``out`` before any work starts; returns it as a Path. Also removes the temporary siblings that
    killed runs into ``out`` left (:func:`remove_stale_siblings`).

    Refused: ``out`` is (or contains, or lies inside) one of ``inputs``; ``out`` exists and is a file; ``out``
    is a non-empty directory, unless ``overwrite`` and its completeness marker says it is an earlier output of
    the kind ``replaces`` names (a marker format): ``--overwrite`` never deletes anything else."""
    out = Path(out)
    for src in inputs:
        if src is not None and Path(src).exists() and _same_or_nested(out, Path(src)):
            raise OutputDirError(f"{what} {out} is the input {src} or overlaps it: writing it would destroy the "
                                 "input; choose another output directory")
    remove_stale_siblings(out)
    if out.exists():
        if not out.is_dir():
            raise OutputDirError(f"{what} {out} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputDirError(f"{what} {out} already exists; pass --overwrite to replace it (the old one is "
                                     "kept until the new one is complete)")
            if marker_format(out) != replaces:
                raise OutputDirError(f"{what} {out} holds {describe(out)}; --overwrite replaces only an earlier "
                                     f"{KINDS.get(replaces, replaces).removeprefix('a ')} or an empty directory: "
                                     "choose another output directory (nothing was deleted)")
    return out


# ----------------------------------------------------------------------------------------- temporary siblings

def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _sibling_prefix(out: Path, kind: str) -> str:
    """``.NAME.tmp-PID-HOST-`` (or ``.old-``): the process that owns a sibling, read back by
    :func:`remove_stale_siblings`."""
    return f".{out.name}.{kind}-{os.getpid()}-{_host_tag()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _newest_mtime(root: Path) -> float:
    times = [root.lstat().st_mtime]
    with contextlib.suppress(OSError):
        times += [p.lstat().st_mtime for p in root.rglob("*")]
    return max(times)


def _owner_gone(sibling: Path, pid: str | None, host: str | None) -> bool:
    """Whether the run that made ``sibling`` can no longer be writing it."""
    if pid is None:  # an older release's name: abandoned once untouched for LEGACY_STALE_S
        return time.time() - _newest_mtime(sibling) > LEGACY_STALE_S
    if host != _host_tag():
        return False  # another machine's run (a shared file system): its process table is not ours to read
    return int(pid) != os.getpid() and not _alive(int(pid))


def remove_stale_siblings(out: str | Path) -> list[str]:
    """Remove the ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings of ``out`` whose run is gone (its process id is
    dead on this machine; a sibling named by an older release, untouched for an hour); a live run's are never
    touched. A killed replacement can leave the previous output renamed aside and ``out`` absent: that one is
    renamed back into place. Each action is one :class:`StaleOutputRemoved` warning; returns their texts."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(?:(\d+)-([0-9a-f]{{8}})-)?[^/]+")
    stale = []
    for p in sorted(parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and _owner_gone(p, m.group(2), m.group(3)):
            stale.append((m.group(1), p))
    done = []
    for kind, p in sorted(stale, key=lambda kp: kp[0] != "old"):  # a replaced output first: it may go back
        if kind == "old" and not out.exists() and (p / COMPLETE_MARKER).is_file():
            os.rename(p, out)
            done.append(f"restored {out} from {p.name}, which an interrupted run had renamed aside")
            continue
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p}, left by an interrupted run into {out}")
    for msg in done:
        warnings.warn(msg, StaleOutputRemoved, stacklevel=2)
    return done


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
def atomic_dir(out: str | Path, *, overwrite: bool = False, marker: dict[str, object] | None = None,
               replaces: str = MODEL_FORMAT) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to write into; publish it as ``out`` when the block ends
    without an error (marker written last, then renamed into place), remove it otherwise.

    ``overwrite`` allows replacing an existing ``out`` of the kind ``replaces`` (see :func:`check_output`,
    which is called again here; call it earlier too, before loading models, to fail fast). The marker records
    ``format`` = ``replaces`` unless ``marker`` names one."""
    out = Path(out)
    check_output(out, overwrite=overwrite, replaces=replaces)
    out.parent.mkdir(parents=True, exist_ok=True)
    marker = {"format": replaces, **(marker or {})}
    tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "tmp"), dir=out.parent))
    try:
        yield tmp
        write_marker(tmp, **marker)
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "old"), dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
