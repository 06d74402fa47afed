"""The ``lavin-edge`` command line. Each subcommand lives in ``lavin_edge.commands.<name>`` and is
imported only when it runs, so ``lavin-edge --help`` stays fast.

One error convention for every command (docs/cli.md, "Errors and outputs"):

- bad input or usage (a wrong option, a missing or unusable file, a recipe or model dir that cannot be
  used): one line ``error: ...`` on stderr, exit code 2;
- anything else (a bug, an environment failure): one line ``error: internal error ...`` with a hint to rerun
  with ``--debug``, exit code 1;
- Ctrl-C: one line, exit code 130 (also at the empty prompt of the chat REPL);
- warnings (a library's, or a notice such as a stale temporary directory removed): one line ``warning: ...``;
- the Python traceback only with ``--debug`` or ``LAVIN_EDGE_DEBUG=1`` (the exit codes stay the same).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tomllib
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import click

from lavin_edge.commands.process import teardown_skipped

# NumPy's OpenBLAS threads spin after each call and take the cores from the extension's OpenMP team that runs
# next (the NumPy vision tower beside the native adapters ran 3x slower); the package's heavy work runs in the
# extension or PyTorch, so NumPy's few products run on one thread. Read when NumPy first loads, so set here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# name -> one-line help; order follows the data flow.
SUBCOMMANDS = {
    "train": "Train the routed adapters on a frozen base (one process, or torchrun for many).",
    "merge": "Fold trained adapters and routers into one deployable model directory.",
    "quantize": "GPTQ 4-bit quantization of the merged model's LLM linears.",
    "chat": "Chat about an image (interactive, or one answer with --prompt).",
    "serve": "Serve a model over HTTP: OpenAI-compatible chat completions, batched, with a web page.",
    "eval": "Accuracy on a ScienceQA-format split, per category.",
    "bench": "Benchmarks: kernels and chat throughput.",
    "info": "Model structure and parameter counts (built on the meta device: no weights needed).",
}

EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_ENV = "LAVIN_EDGE_DEBUG"

# OSErrors about a path the user named: bad input. Other OSErrors (a full disk, an I/O error) are not.
_USER_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def _raised_in_project(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is lavin-edge code (a deliberate ``raise`` with a
    message about the input), not a library it called."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("lavin_edge")


def is_bad_input(e: BaseException) -> bool:
    """Bad input, by exception: click's usage errors and ``ClickException``s (a command's own one-line
    message), a user path that is missing or unusable, the project's ``ValueError`` subclasses
    (ModelDirError, CheckpointError, OutputDirError, ContextError, ImageError, DataError, RecipeError, ...),
    any ``ValueError`` raised by lavin-edge code itself, and unparsable JSON/TOML files."""
    if isinstance(e, (click.ClickException, *_USER_PATH_ERRORS)):
        return True
    if isinstance(e, ValueError):
        parse_error = isinstance(e, (json.JSONDecodeError, tomllib.TOMLDecodeError))
        return type(e).__module__.startswith("lavin_edge") or parse_error or _raised_in_project(e)
    return False


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _debug_requested(args: Sequence[str]) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    for tok in args:  # global options come before the subcommand
        if tok == "--debug":
            return True
        if not tok.startswith("-"):
            return False
    return False


def report_error(e: BaseException, debug: bool) -> int:
    """Print ``e`` per the convention above; returns the exit code."""
    if isinstance(e, BrokenPipeError):
        # The reader went away (`lavin-edge chat ... | head -1`): nothing to report, and nothing more to write.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python's final flush of stdout must not fail again
        return EXIT_INTERNAL
    if debug and not isinstance(e, click.UsageError):
        traceback.print_exception(e, file=sys.stderr)
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, click.Abort) and isinstance(e.__context__,
                                                                                     KeyboardInterrupt)):
        click.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    if isinstance(e, click.Abort):
        click.echo("error: aborted", err=True)
        return EXIT_INTERNAL
    if isinstance(e, click.UsageError):
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
        return EXIT_BAD_INPUT
    if isinstance(e, click.ClickException):
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        # A command's own ClickException is a message about its input unless it chose another code.
        return EXIT_BAD_INPUT if e.exit_code == 1 else e.exit_code
    if is_bad_input(e):
        click.echo(f"error: {_one_line(str(e))}", err=True)
        return EXIT_BAD_INPUT
    hint = "" if debug else f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
    click.echo(f"error: internal error: {type(e).__name__}: {_one_line(str(e))}{hint}", err=True)
    return EXIT_INTERNAL


def _warning_line(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """Python's warnings as one line on stderr, never on stdout, without the source line Python adds."""
    click.echo(f"warning: {_one_line(str(message))}", err=True)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module = importlib.import_module(f"lavin_edge.commands.{name}")
        cmd: click.Command = module.command
        cmd.short_help = SUBCOMMANDS[name]
        return cmd

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        """Click's standalone handling, replaced by :func:`report_error` (one line, exit codes 2/1/130)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        warnings.showwarning = _warning_line
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 - the one place where every error is reported
            sys.exit(report_error(e, _debug_requested(argv)))
        code = rv if isinstance(rv, int) else 0
        if args is None and teardown_skipped():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lavin-edge")
@click.option("--debug", is_flag=True, help=f"Print the Python traceback of an error (also: {DEBUG_ENV}=1); "
              "by default an error is one line on stderr (exit 2: bad input, 1: internal error, 130: Ctrl-C).")
def main(debug: bool) -> None:
    """lavin-edge: LaVIN vision-language assistants, trained cheap and served fast.

    Pipeline: base checkpoints -> train (adapters) -> merge -> quantize -> chat / eval / bench.
    """


if __name__ == "__main__":
    # `python -m lavin_edge.cli` runs this file as __main__, a second copy of the module: run the imported
    # copy's main, so that one set of module state (the LazyGroup, report_error) serves the run.
    from lavin_edge import cli

    cli.main()
