"""How the process ends after a command: a command that leaves nothing to finish asks the entry point
(``lavin_edge.cli``) to skip the interpreter's teardown. Lives below the entry point so commands need not import
it."""

from __future__ import annotations

_skip_teardown = False


def skip_teardown_at_exit() -> None:
    """For a command that leaves nothing to finish (every file it wrote is closed and in place): when the
    process's entry point returns, it ends with ``os._exit`` once stdout and stderr are flushed, without the
    interpreter's teardown of torch's modules, which is a large share of a one-shot chat's process time.
    Only the real entry point does this (``main()`` called with no args); in-process callers such as click's
    test runner return as usual."""
    global _skip_teardown
    _skip_teardown = True


def teardown_skipped() -> bool:
    """Whether a command asked for :func:`skip_teardown_at_exit` in this process."""
    return _skip_teardown
