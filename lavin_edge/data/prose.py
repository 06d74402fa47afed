"""Prose that ships offline: paragraphs of the docstrings of Python's standard library (English prose about
software, the same on every CPython 3.11).

Its modules are split in two fixed, disjoint halves. ``calibration`` is read by GPTQ's calibration and by
the ``[[data]] type = "prose"`` training source (``text_loss = "kl"``: the text route learns to keep the
frozen base's predictions on it); ``heldout`` only ever measures perplexity, so no figure is taken on text
that was trained or calibrated on."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

_CALIBRATION_MODULES = ("argparse", "logging", "subprocess", "threading", "pickle", "decimal", "zipfile",
                        "tarfile", "unittest", "doctest", "difflib", "inspect", "functools", "dataclasses",
                        "enum", "csv", "socket", "ssl", "random", "pathlib", "shutil", "codecs", "optparse",
                        "configparser", "asyncio", "multiprocessing", "weakref", "string", "re", "datetime")
_HELDOUT_MODULES = ("collections", "itertools", "typing", "io", "os", "sys", "json", "hashlib", "email.message",
                    "http.client", "urllib.request", "mailbox", "pdb", "ast", "tokenize", "traceback", "signal",
                    "gzip", "lzma", "calendar", "heapq", "textwrap", "statistics", "queue", "sqlite3")


def stdlib_paragraphs(split: str, min_chars: int = 200) -> list[str]:
    """Prose paragraphs (>= ``min_chars``, >= 90% letters and spaces, no doctest) from the docstrings of the
    ``split`` ("calibration" or "heldout") module set, in a fixed order."""
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', not {split!r}")
    mods = _CALIBRATION_MODULES if split == "calibration" else _HELDOUT_MODULES
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few stdlib modules warn on import (deprecations)
        for name in mods:
            mod = importlib.import_module(name)
            objs = [mod] + [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
            for o in objs:
                if o is not mod and (getattr(o, "__module__", None) != name
                                     or not (inspect.isclass(o) or inspect.isfunction(o))):
                    continue
                for p in re.split(r"\n\s*\n", inspect.getdoc(o) or ""):
                    p = " ".join(p.split())
                    letters = sum(c.isalpha() or c == " " for c in p)
                    if len(p) >= min_chars and ">>>" not in p and letters >= 0.9 * len(p) and p not in out:
                        out.append(p)
    return out
