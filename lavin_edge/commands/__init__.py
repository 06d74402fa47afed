"""One module per CLI subcommand; each exports ``command`` (a click.Command)."""
