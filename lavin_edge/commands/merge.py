"""`lavin-edge merge`: trained adapters + base -> one deployable model directory (routers folded)."""

from __future__ import annotations

import sys

import click


@click.command(name="merge")
@click.argument("adapters", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--llm", "llm", default=None, help="Base LLM (GGUF file, HF or Meta dir); default: the one the "
              "adapters were trained on, as recorded in their config.json.")
@click.option("--vision", "vision", default=None, help="Base vision tower (e.g. efficientnet-lite0, a CLIP .pt); "
              "default: as recorded.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it holds an earlier merged or quantized model (the old one stays in place until "
                   "the new one is complete); a directory of anything else is refused, never deleted.")
def command(adapters: str, out: str, llm: str | None, vision: str | None, overwrite: bool) -> None:
    """Fold the LLM routers of ADAPTERS (the output of `lavin-edge train`) into OUT.

    Each LLM layer's two experts become one up-projection per modality (the routing of position 0 depends
    only on the modality); the modality token leaves the runtime and its KV cache. The vision tower keeps
    its per-token routing. OUT is written all or nothing: an interrupted run leaves the previous OUT (or none),
    and the next run into OUT removes the temporary directory it left. Progress goes to stderr."""
    from lavin_edge.merge import merge_dir

    try:
        path = merge_dir(adapters, out, llm, vision, overwrite=overwrite, progress=True)
    except (ValueError, FileNotFoundError) as e:  # ModelDirError, a base that does not load
        click.echo(f"error: {e}", err=True)  # one line, exit 2: bad input, not a crash
        sys.exit(2)
    import json

    cfg = json.loads((path / "config.json").read_text())
    table = cfg["routing_table"]
    click.echo(f"merged -> {path}")
    click.echo(f"  routing (expert 0 weight) text: {[round(r[0][0], 3) for r in table]}")
    click.echo(f"  routing (expert 0 weight) image: {[round(r[1][0], 3) for r in table]}")
