"""`lavin-edge bench`: not built yet."""

import sys

import click


@click.command(name="bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def command() -> None:
    """Not implemented yet."""
    click.echo("lavin-edge bench: not implemented yet", err=True)
    sys.exit(2)
