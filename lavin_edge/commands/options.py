"""Options shared by several subcommands (not a subcommand itself)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

# lavin_edge.kernels.reference's ACT_ENV and ACT_OPTION_VALUES, repeated so that parsing a command line does not
# import torch (tests/test_activations_option.py checks they agree).
ACT_ENV = "LAVIN_EDGE_W4_ACT"
ACT_OPTION_VALUES = {"15bit": "int16", "int8": "int8"}

ACTIVATIONS_HELP = (
    "Activation format of the CPU 4-bit kernels, for every model this command loads: 15bit (the default: "
    "blocks of 32 kept as 15-bit integers, the engine's next tokens agree with the exact 4-bit model) or int8 "
    "(earlier releases' blocks of 32: decode a few % and prompt prefill ~1.6x faster, but ~4% of next tokens "
    f"differ from the exact model on the demo; docs/benchmarks/accuracy.md). Sets ${ACT_ENV} "
    "(int16 / int8), which is the default when the option is not given."
)


def _set_activations(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Applied while the command line is parsed, before the command's body loads a model: the kernels read
    # the variable when a model's native decode step is built and at every per-op product.
    if value is not None:
        os.environ[ACT_ENV] = ACT_OPTION_VALUES[value]


def activations_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--activations {15bit,int8}``; the command itself never sees a value."""
    return click.option("--activations", type=click.Choice(list(ACT_OPTION_VALUES)), default=None,
                        expose_value=False, callback=_set_activations, help=ACTIVATIONS_HELP)(f)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or `taskset` may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def bounded_threads(value: int | None, name: str = "--threads") -> int | None:
    """``value`` lowered to :func:`available_cores`, with one warning line when it was more: more threads than
    cores only slow the kernels' OpenMP teams down (100000 crashed them)."""
    cores = available_cores()
    if value is not None and value > cores:
        click.echo(f"warning: {name} {value} is more than the {cores} cores this process may use: using {cores}",
                   err=True)
        return cores
    return value


THREADS_RULE = "more than the cores this process may use is lowered to that number, with a warning"


def threads_option(help: str = "CPU threads (default: all cores)", default: int | None = None
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--threads N`` (N >= 1), bounded by the cores (:func:`bounded_threads`); every command that takes
    ``--threads`` declares it through here, so the rule is one."""
    return click.option("--threads", type=click.IntRange(1), default=default, show_default=default is not None,
                        callback=lambda ctx, param, value: bounded_threads(value),
                        help=f"{help.rstrip('.')}; {THREADS_RULE}.")


DEVICE_HELP = (
    "Where the model runs: cpu (the CPU kernels), cuda (the CUDA engine: needs a GPU and the extension built with "
    "CUDA, else one error line and exit 2), auto (cuda when both are present, else cpu). docs/cuda.md."
)


def _resolve_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # Resolved while the command line is parsed: the command sees "cpu" or "cuda". Imports PyTorch only where
    # the extension has CUDA kernels and a GPU device node exists (lavin_edge.runtime.device).
    from lavin_edge.runtime.device import resolve_device

    return resolve_device(value)


def device_option(f: Callable[..., Any] | None = None, *, default: str = "auto", help: str = DEVICE_HELP) -> Any:
    """``--device {auto,cpu,cuda}``; the command receives ``device`` as "cpu" or "cuda". ``@device_option``, or
    ``@device_option(default=..., help=...)``."""
    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=default,
                            show_default=True, callback=_resolve_device, help=help)(fn)

    return add if f is None else add(f)
