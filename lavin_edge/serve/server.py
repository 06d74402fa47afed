"""Model dir -> a running server: load the engine, wrap it in a ``BatchDecoder`` and ``Scheduler``, build the app."""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from starlette.applications import Starlette

from lavin_edge.runtime import Engine
from lavin_edge.runtime.batch import BatchDecoder
from lavin_edge.serve.app import ServerConfig, create_app
from lavin_edge.serve.images import ImageLimits
from lavin_edge.serve.scheduler import Scheduler

if TYPE_CHECKING:
    from lavin_edge.runtime.cuda_engine import CudaEngine

DEFAULT_MAX_CONTEXT = 2048  # each slot holds a KV cache of this many positions


@dataclass
class ServeOptions:
    slots: int = 4
    max_queue: int = 16
    backend: str = "auto"
    max_context: int | None = DEFAULT_MAX_CONTEXT
    api_key: str | None = None
    limits: ImageLimits | None = None
    exact_head: bool = False
    prefill: str = "auto"  # inline | thread | auto (see prefill_on_thread)
    device: str = "cpu"  # cpu | cuda (the CUDA engine, lavin_edge.runtime.cuda_batch)


def prefill_on_thread(prefill: str, threads: int | None = None, cores: int | None = None) -> bool:
    """Whether prefills run on their own thread: "thread" / "inline" say so; "auto" does when the cores hold two
    sets of the kernels' threads (2 x threads <= cores), so the prefill thread never competes with the decode
    loop's OpenMP team for a core."""
    if prefill not in ("auto", "inline", "thread"):
        raise ValueError(f"prefill must be auto, inline or thread, not {prefill!r}")
    if prefill != "auto":
        return prefill == "thread"
    threads = threads or torch.get_num_threads()
    cores = cores or len(os.sched_getaffinity(0))
    return 2 * threads <= cores


class PortInUse(ValueError):
    """The address to serve on cannot be bound (in use, or not this machine's)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``, bound before the model loads so that a port in use is one
    line at once, not a traceback after the load (uvicorn serves on it: ``uvicorn.Server.run(sockets=...)``).
    Port 0 picks a free port (read it back with ``getsockname``)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise PortInUse(f"cannot serve on {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait TIME_WAIT
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is in use (another server on {host}:{port}?); choose another with "
                            "--port") from None
        raise PortInUse(f"cannot serve on {host}:{port}: {e.strerror}") from None
    return sock


def build_app(engine: Engine | CudaEngine, model_id: str, opts: ServeOptions) -> tuple[Starlette, Scheduler]:
    """An app over an already loaded engine (tests build tiny ones in code). A ``CudaEngine`` (built with
    ``slots``) batches through ``CudaBatchDecoder``, its prefills inline: a prefill thread would launch work
    beside the replayed decode graph."""
    from lavin_edge.runtime.cuda_batch import CudaBatchDecoder
    from lavin_edge.runtime.cuda_engine import CudaEngine

    if isinstance(engine, CudaEngine):
        scheduler = Scheduler(CudaBatchDecoder(engine), opts.max_queue, False)  # type: ignore[arg-type]
    else:
        scheduler = Scheduler(BatchDecoder(engine, opts.slots), opts.max_queue, prefill_on_thread(opts.prefill))
    config = ServerConfig(model_id, opts.limits or ImageLimits(), opts.api_key)
    return create_app(scheduler, config), scheduler


def load_app(model_dir: str | Path, model_id: str, opts: ServeOptions) -> tuple[Starlette, Scheduler]:
    if opts.device == "cuda":
        from lavin_edge.runtime.cuda_engine import CudaEngine

        return build_app(CudaEngine.load(model_dir, "cuda", opts.max_context, slots=opts.slots), model_id, opts)
    engine = Engine.load(model_dir, backend=opts.backend, max_context=opts.max_context,
                         head_w4=False if opts.exact_head else None)
    return build_app(engine, model_id, opts)
