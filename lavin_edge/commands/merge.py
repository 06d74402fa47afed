"""`lavin-edge merge`: not built yet."""

import sys

import click


@click.command(name="merge", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def command() -> None:
    """Not implemented yet."""
    click.echo("lavin-edge merge: not implemented yet", err=True)
    sys.exit(2)
