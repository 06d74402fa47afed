"""`lavin-edge bench serve`: a bounded load run against `lavin-edge serve` on loopback.

The server runs in its own process (``lavin-edge serve --slots S``, the demo unless ``--model``); this process
plays 1, 4 and 8 concurrent clients (``--clients``), each sending ``--requests`` streaming requests one after
the other, alternating image and text questions, each asking exactly ``--new-tokens`` tokens (greedy,
``ignore_eos``). Per level: requests sent, completed, failed; aggregate tok/s (completion tokens of the level /
its wall time); p50/p99 time to first token (request sent -> first content chunk) and per-token latency
((last chunk - first chunk) / (tokens - 1), per request). The ratio of the top level's aggregate tok/s to the
one-client level's is ``speedup``.

llama.cpp's server as a peer is not run: llama-cpp-python is not installed on the machines this was written on,
so that path could not be tested (README "Serving").
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

QUESTIONS = ("What shape is in the image?", "What colour is the shape?", "Is there a red shape?")
TEXT_QUESTIONS = ("Name three colours.", "What is a triangle?", "Say hello.")


def _images() -> list[str]:
    """Data URLs of the examples/ pictures (a checkout), else easy-vqa's test images."""
    root = Path(__file__).resolve().parents[2] / "examples"
    paths = sorted(root.glob("easyvqa-*.png"))
    if not paths:
        import easy_vqa

        paths = [Path(p) for p in easy_vqa.get_test_image_paths()[:4]]
    return ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in paths]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def _request_body(i: int, images: list[str], new_tokens: int) -> dict[str, Any]:
    if i % 2 == 0:
        content: Any = [{"type": "text", "text": QUESTIONS[i // 2 % len(QUESTIONS)]},
                        {"type": "image_url", "image_url": {"url": images[i // 2 % len(images)]}}]
    else:
        content = TEXT_QUESTIONS[i // 2 % len(TEXT_QUESTIONS)]
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}


async def _one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"ok": False, "status": 500}
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if obj["choices"] and obj["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    ok = tokens == body["max_tokens"] and first > 0
    return {"ok": ok, "status": 200, "ttft_s": first - t0, "tokens": tokens,
            "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else 0.0}


async def _level(base: str, clients: int, requests: int, images: list[str], new_tokens: int) -> dict[str, Any]:
    import httpx

    url = base + "/v1/chat/completions"
    results: list[dict[str, Any]] = []

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        for k in range(requests):
            try:
                results.append(await _one(client, url, _request_body(c * requests + k, images, new_tokens)))
            except httpx.HTTPError as e:
                results.append({"ok": False, "status": type(e).__name__})

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        wall = time.perf_counter() - t0
    done = [r for r in results if r["ok"]]
    ttft = [r["ttft_s"] * 1000 for r in done]
    tpot = [r["tpot_s"] * 1000 for r in done]
    tokens = sum(r["tokens"] for r in done)
    return {"clients": clients, "sent": len(results), "completed": len(done), "failed": len(results) - len(done),
            "aggregate_tok_s": round(tokens / wall, 2), "wall_s": round(wall, 2),
            "ttft_p50_ms": round(_percentile(ttft, 50), 1), "ttft_p99_ms": round(_percentile(ttft, 99), 1),
            "tpot_p50_ms": round(_percentile(tpot, 50), 1), "tpot_p99_ms": round(_percentile(tpot, 99), 1)}


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def run_serve_bench(json_out: bool = False, model: str | None = None, clients: tuple[int, ...] = (1, 4, 8),
                    requests: int = 3, new_tokens: int = 64, slots: int | None = None, threads: int | None = None,
                    print_results: bool = True, prefill: str = "auto") -> dict[str, Any]:
    """Start a server, run each client level, stop the server; returns ``{"rows": [...], ...}``."""
    slots = slots or max(clients)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lavin_edge.cli", "serve", "--port", str(port), "--slots", str(slots),
           "--max-queue", str(max(clients)), "--log-level", "warning", "--prefill", prefill]
    if model:
        cmd += ["--model", model]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        _wait_ready(base, proc, 900)
        images = _images()
        asyncio.run(_level(base, 1, 1, images, 8))  # warm-up: first-call allocations, page cache
        rows = [asyncio.run(_level(base, c, requests, images, new_tokens)) for c in clients]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    one = next((r for r in rows if r["clients"] == 1), None)
    top = rows[-1]
    out = {"model": model or "demo", "slots": slots, "new_tokens": new_tokens, "requests_per_client": requests,
           "threads": threads, "prefill": prefill, "rows": rows,
           "speedup": round(top["aggregate_tok_s"] / one["aggregate_tok_s"], 2) if one else None,
           "peer": "llama-cpp-python server: not run (not installed here; path left for a machine that has it)"}
    if print_results:
        if json_out:
            print(json.dumps(out, indent=2))
        else:
            keys = ("clients", "sent", "completed", "failed", "aggregate_tok_s", "ttft_p50_ms", "ttft_p99_ms",
                    "tpot_p50_ms", "tpot_p99_ms")
            print("  ".join(f"{k:>15}" for k in keys))
            for r in rows:
                print("  ".join(f"{r[k]:>15}" for k in keys))
            print(f"speedup (top level vs 1 client): {out['speedup']}x")
    return out
