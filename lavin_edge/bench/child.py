"""Benchmark children: ``python -m MODULE ARGS`` on the lavin_edge package this process imported.

``python -m`` puts the working directory first on ``sys.path``, so run from a source checkout (whose tree holds
no built extension) the child would import the checkout instead of the installed package, and time PyTorch
fallbacks. The child here puts this package's root first instead."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the imported lavin_edge
_BOOT = ("import runpy, sys; root, mod = sys.argv[1], sys.argv[2]; sys.argv = [mod, *sys.argv[3:]]; "
         "sys.path.insert(0, root); runpy.run_module(mod, run_name='__main__', alter_sys=True)")


def module_command(module: str, *args: str, flags: tuple[str, ...] = ()) -> list[str]:
    """The argv of ``python [flags] -m module args`` run on this process's lavin_edge (see the module
    docstring); ``flags``: interpreter options such as ``-X importtime``."""
    return [sys.executable, *flags, "-c", _BOOT, ROOT, module, *args]


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): each benchmark row runs in a child of its own, so it is the row's."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
