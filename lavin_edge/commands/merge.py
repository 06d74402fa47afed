"""`lavin-edge merge`: trained adapters + base -> one deployable model directory (routers folded)."""

from __future__ import annotations

import click


@click.command(name="merge")
@click.argument("adapters", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--llm", "llm", default=None, help="Base LLM (GGUF file, HF or Meta dir); default: the one the "
              "adapters were trained on, as recorded in their config.json.")
@click.option("--vision", "vision", default=None, help="Base vision tower (e.g. efficientnet-lite0, a CLIP .pt); "
              "default: as recorded.")
def command(adapters: str, out: str, llm: str | None, vision: str | None) -> None:
    """Fold the LLM routers of ADAPTERS (the output of `lavin-edge train`) into OUT.

    Each LLM layer's two experts become one up-projection per modality (the routing of position 0 depends
    only on the modality); the modality token leaves the runtime and its KV cache. The vision tower keeps
    its per-token routing."""
    from lavin_edge.merge import ModelDirError, merge_dir

    try:
        path = merge_dir(adapters, out, llm, vision)
    except (ModelDirError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    import json

    cfg = json.loads((path / "config.json").read_text())
    table = cfg["routing_table"]
    click.echo(f"merged -> {path}")
    click.echo(f"  routing (expert 0 weight) text: {[round(r[0][0], 3) for r in table]}")
    click.echo(f"  routing (expert 0 weight) image: {[round(r[1][0], 3) for r in table]}")
