"""The ``lavin-edge`` command line. Each subcommand lives in ``lavin_edge.commands.<name>`` and is
imported only when it runs, so ``lavin-edge --help`` stays fast."""

from __future__ import annotations

import importlib

import click

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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lavin-edge")
def main() -> None:
    """lavin-edge: LaVIN vision-language assistants, trained cheap and served fast.

    Pipeline: base checkpoints -> train (adapters) -> merge -> quantize -> chat / eval / bench.
    """


if __name__ == "__main__":
    main()
