"""`lavin-edge serve`: an OpenAI-compatible chat-completions server with continuous batching and a web page."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lavin_edge.commands.options import activations_option, device_option, threads_option
from lavin_edge.demo.paths import DEMO_DESCRIPTION

EPILOG = (DEMO_DESCRIPTION + "\n\nAPI: POST /v1/chat/completions (OpenAI's schema, stream=true for server-sent "
          "events), GET /v1/models, GET /health; the web page at /. Images only as data:image/...;base64 URLs "
          "(nothing is fetched), or files under --allow-files DIR. See docs/serving.md.")


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


@click.command(name="serve", epilog=EPILOG)
@activations_option
@click.option("--model", "model_dir", default=None, metavar="DIR",
              help="Merged or quantized model dir (default: the built demo model, quantized).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes the server to the network: set --api-key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: a free one, printed); checked before the model loads: in use, exit 2.")
@device_option
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "kernels", "torch"]),
              help="kernels: the compiled extension; torch: plain PyTorch; auto: kernels when built.")
@click.option("--slots", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Requests that decode together in one batched step (each holds a KV cache).")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a slot; beyond that: 503 with Retry-After.")
@click.option("--max-context", default=2048, show_default=True, type=click.IntRange(16),
              help="Context per slot in tokens (capped by the model's); longer prompts get a 400.")
@click.option("--api-key", default=None, envvar="LAVIN_EDGE_API_KEY", show_envvar=True,
              help="Require Authorization: Bearer KEY on /v1/* (401 otherwise).")
@click.option("--max-image-bytes", default=8 << 20, show_default=True, type=click.IntRange(1),
              help="Largest encoded image accepted (413 above).")
@click.option("--max-image-pixels", default=4096 * 4096, show_default=True, type=click.IntRange(1),
              help="Largest width x height accepted, read before decoding (413 above: decompression bombs).")
@click.option("--allow-files", default=None, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also accept file:// image URLs of files under DIR (paths leaving DIR are refused).")
@click.option("--exact-head", is_flag=True,
              help="Keep the fp32 output layer (kernels backend: it otherwise runs as 4-bit + 4-bit residual).")
@threads_option()
@click.option("--prefill", default="auto", show_default=True, type=click.Choice(["auto", "inline", "thread"]),
              help="Where an arriving request's prefill runs: inline (on the decode loop, between batched steps: "
                   "the other requests wait), thread (on a thread of its own, with its own --threads cores, while "
                   "the others keep decoding), auto (thread when the cores hold both: 2 x threads <= cores).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn's log level.")
def command(model_dir: str | None, host: str, port: int, device: str, backend: str, slots: int, max_queue: int,
            max_context: int, api_key: str | None, max_image_bytes: int, max_image_pixels: int,
            allow_files: Path | None, exact_head: bool, threads: int | None, prefill: str, log_level: str) -> None:
    """Serve a LaVIN model over HTTP: OpenAI-compatible chat completions with images, continuous batching of up
    to --slots requests, and a web page at /.

    Example: lavin-edge serve --slots 8, then open http://127.0.0.1:8000/
    """
    import torch
    import uvicorn

    from lavin_edge.demo.build import demo_model_dir
    from lavin_edge.demo.paths import DemoModelMissing
    from lavin_edge.runtime import ModelDirError
    from lavin_edge.serve.images import ImageLimits
    from lavin_edge.serve.server import PortInUse, ServeOptions, bind_socket, load_app

    if threads:
        torch.set_num_threads(threads)
    if api_key is not None and not api_key.strip():
        _fail("--api-key is empty")
    try:
        sock = bind_socket(host, port)  # before the model loads: a port in use is said at once
    except PortInUse as e:
        _fail(str(e))
    port = sock.getsockname()[1]
    limits = ImageLimits(max_image_bytes, max_image_pixels, allow_files)
    opts = ServeOptions(slots, max_queue, backend, max_context, api_key, limits, exact_head, prefill, device)
    try:
        path = Path(model_dir) if model_dir is not None else demo_model_dir(build=True)
        model_id = "lavin-edge-demo" if model_dir is None else path.resolve().name
        app, scheduler = load_app(path, model_id, opts)
    except (ModelDirError, DemoModelMissing) as e:
        _fail(str(e))
    where = "own thread" if scheduler.overlap_prefill else "inline"
    click.echo(f"serving {model_id} on http://{host}:{port}/ ({slots} slots, prefill: {where})", err=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[sock])
