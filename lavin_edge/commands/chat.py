"""`lavin-edge chat`: not built yet."""

import sys

import click


@click.command(name="chat", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def command() -> None:
    """Not implemented yet."""
    click.echo("lavin-edge chat: not implemented yet", err=True)
    sys.exit(2)
