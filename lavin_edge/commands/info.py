"""`lavin-edge info`: the model's structure and parameter counts, built on the meta device."""

from __future__ import annotations

import json

import click

from lavin_edge.config import LLM_PRESETS, VISION_PRESETS, preset


@click.command(name="info")
@click.option("--llm", "llm", default="llama-7b", show_default=True, type=click.Choice(sorted(LLM_PRESETS)),
              help="LLM preset.")
@click.option("--vision", "vision", default="vit-l-14", show_default=True,
              type=click.Choice(sorted(VISION_PRESETS)), help="Vision tower preset.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def command(llm: str, vision: str, as_json: bool) -> None:
    """Count the parameters of LaVIN(LLM preset, vision preset) without allocating weights."""
    from lavin_edge.model.lavin import build_lavin

    cfg = preset(llm, vision)
    counts = build_lavin(cfg, "meta").count_parameters()
    info = {"llm": llm, "vision": vision, **counts, "config": cfg.to_dict(), "extension": _extension_info()}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"LaVIN  llm={llm}  vision={vision}")
    for key in ("trainable_params", "total_params", "llm_adapters", "vision_adapters", "visual_proj",
                "modality_embedding"):
        click.echo(f"  {key:<20} {counts[key]:>15,}")
    ext = info["extension"]
    click.echo(f"  {'kernel backend':<20} {ext['backend']}")
    if ext.get("extension"):
        click.echo(f"  {'backends built':<20} {', '.join(ext['built_backends'])}")
        click.echo(f"  {'backends usable':<20} {', '.join(ext['backends'])}")
        click.echo(f"  {'threads':<20} {_threads_line(ext)}")
        click.echo(f"  {'cuda compiled':<20} {ext['cuda_compiled']}")
    else:
        click.echo(f"  {'extension':<20} not built ({ext.get('error')})")


def _threads_line(ext: dict) -> str:
    """How the native kernels run in parallel: OpenMP's default team, or one thread in a build without OpenMP."""
    if ext["openmp"]:
        return f"OpenMP, {ext['omp_max_threads']} by default"
    return "1 (built without OpenMP: install libomp / libgomp and rebuild for multi-threaded kernels)"


def _extension_info() -> dict:
    """The kernel backend chat will use and what the extension reports about this CPU."""
    from lavin_edge import kernels

    return {"backend": kernels.backend(), **kernels.cpu_features()}
