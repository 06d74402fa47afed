"""`lavin-edge eval`: not built yet."""

import sys

import click


@click.command(name="eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def command() -> None:
    """Not implemented yet."""
    click.echo("lavin-edge eval: not implemented yet", err=True)
    sys.exit(2)
