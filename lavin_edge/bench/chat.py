"""`lavin-edge bench chat`: end-to-end chat throughput and memory.

Rows (each measured in a fresh subprocess, so peak RSS is that row's alone):

- the demo model, fp merged dir in plain PyTorch;
- the demo model, quantized dir on the extension (W4 GEMV, fused RMSNorm + adapter, per-token ViT kernel);
- a LLaMA-7B-shaped LLM with random 4-bit weights built directly in the GPTQ layout (no GPTQ run), on the
  extension: decode tok/s against the memory-bandwidth limit, i.e. read bandwidth measured in the same
  process divided by the bytes one decode step must read (4-bit linears + scales/zeros, the 4-bit
  lm_head, the KV cache at the mean decode length);
- startup: a one-shot ``lavin-edge chat --image ... --prompt ...`` on the built demo (4-bit) as a fresh process,
  the way a user runs it: its process time (user + sys CPU of the child) and wall time, load included; it runs
  without PyTorch (``lavin_edge.chat.oneshot``), and the same command with ``--stats`` through the PyTorch
  session beside it;
- llama.cpp (llama-cpp-python), where installed: the SmolLM2 GGUF with the same prompt text and token count,
  and a LLaMA-7B-shaped GGUF with random Q4_0 weights (``random_gguf``, written once to the cache) with the
  7B row's prompt ids and token count, against the bandwidth limit measured the same way.

The 7B row's model is ``random_gptq.RandomGPTQLlama``; the llama.cpp rows are ``llamacpp`` (run only in their
child: a crashing native build is a skipped row naming the signal); the roofline rows are put on the best
streaming rate measured in the run (``roofline``: the highest probe, or a row's own decode where faster).

Figures per row: prefill tok/s (prompt tokens incl. visual tokens / prefill time), decode tok/s (tokens
after the first / decode time), time to first token (image encoding + prefill + first sample), peak RSS.
Generation ignores EOS so every row decodes exactly the same number of tokens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lavin_edge.bench.child import module_command, peak_rss_mb
from lavin_edge.bench.llamacpp import llamacpp_row, peer_rows
from lavin_edge.bench.random_gptq import NoTokenizer, RandomGPTQLlama, random_prompt_ids
from lavin_edge.bench.roofline import apply_run_roofline, probe_read_bw, roofline_fields

DEFAULT_QUESTION = "What shape is in the image?"
DEFAULT_IMAGE = "examples/easyvqa-red-triangle.png"
KEYS = ("model", "backend", "prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb")


def example_image() -> Path:
    """examples/easyvqa-red-triangle.png from a checkout; an installed package has no examples/, so fall back
    to the same picture inside the easy-vqa package (test image 0)."""
    for p in (Path(DEFAULT_IMAGE), Path(__file__).resolve().parents[2] / DEFAULT_IMAGE):
        if p.exists():
            return p
    import easy_vqa

    return Path(easy_vqa.get_test_image_paths()[0])


# ----------------------------------------------------------------------------------------- demo rows

def _demo_row(model_dir: str, backend: str, new_tokens: int, question: str, image: str | None,
              prompt_tokens: int | None = None) -> dict[str, Any]:
    """The chat question (with ``image``), or with ``prompt_tokens`` a text prompt of that many random ids (the
    long-context row: the same ids as its llama.cpp row)."""
    from lavin_edge.chat.session import ChatSession
    from lavin_edge.modality import IMAGE, TEXT
    from lavin_edge.runtime import Engine, GenerationStats
    from lavin_edge.runtime.sampling import GenerationConfig

    if prompt_tokens:
        eng = Engine.load(model_dir, backend=backend, max_context=prompt_tokens + new_tokens + 8)
        ids, pos, image = random_prompt_ids(eng.embed.shape[0], prompt_tokens), -1, None
    else:
        eng = Engine.load(model_dir, backend=backend)
        sess = ChatSession(eng, GenerationConfig(max_new_tokens=new_tokens))
        if image:
            sess.set_image(image)
        ids, pos, _ = sess.build(question)
    gen = GenerationConfig(max_new_tokens=new_tokens)
    # One warm-up run (first-call allocations, page faults), then the measured one.
    best: GenerationStats | None = None
    for _ in range(2):
        vis_s = 0.0
        visual = None
        if image:
            t0 = time.perf_counter()
            visual = eng.encode_image(_load(image, eng))
            vis_s = time.perf_counter() - t0
        eng.reset(IMAGE if image else TEXT)
        stats = GenerationStats(vision_s=vis_s)
        eng.generate(ids, gen, pos, visual, None, stats, stop_ids=set())
        best = stats
    assert best is not None
    return {"prompt_tokens": best.prompt_tokens, "new_tokens": best.new_tokens,
            "prefill_tok_s": round(best.prefill_tok_s, 1), "decode_tok_s": round(best.decode_tok_s, 1),
            "ttft_ms": round(best.ttft_s * 1000, 1), "vision_ms": round(best.vision_s * 1000, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "weight_bytes_per_token": eng.weight_bytes_per_token(),
            "backend_detail": eng.backend + (" (lm_head W4)" if eng.head_w4 else "")}


def _load(image: str, eng: Any) -> torch.Tensor:
    from lavin_edge.data.image import load_image

    return load_image(image, eng.cfg.vision.image_size)


# ----------------------------------------------------------------------------------------- startup row

def startup_row(model_dir: str, image: str, question: str, timeout: float = 600.0, threads: int | None = None,
                extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Process time of one ``lavin-edge chat --model DIR --image IMAGE --prompt QUESTION [extra]`` run in a fresh
    interpreter (imports, model load, image, prefill, decode, exit): user + sys CPU seconds of the child and
    its wall time. ``answer`` is what it printed."""
    import resource

    cmd = module_command("lavin_edge.cli", "chat", "--model", model_dir, "--image", image, "--prompt", question,
                         *extra, *(["--threads", str(threads)] if threads else []))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"chat failed: {tail}"}
    user, sys_s = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"startup_cpu_s": round(user + sys_s, 2), "startup_user_s": round(user, 2),
            "startup_sys_s": round(sys_s, 2), "startup_wall_s": round(wall, 2), "answer": out.stdout.strip()}


# ----------------------------------------------------------------------------------------- 7B row

def _llama7b_row(new_tokens: int, prompt_tokens: int, max_context: int, llm: dict[str, Any] | None = None,
                 probe_bytes: int | None = None) -> dict[str, Any]:
    """Decode on random 4-bit weights of LLaMA-7B's shape (``llm``: another LlamaConfig as a dict, for tests)
    against the bandwidth limit."""
    from lavin_edge.config import LavinConfig, LlamaConfig, preset
    from lavin_edge.modality import TEXT
    from lavin_edge.runtime import Engine, GenerationStats
    from lavin_edge.runtime.sampling import GenerationConfig

    threads = torch.get_num_threads()
    read_bw = probe_read_bw(threads, probe_bytes)  # first, before the model takes memory
    base = preset("llama-7b", "tiny")
    llm_cfg = LlamaConfig(**llm) if llm else base.llm
    cfg = LavinConfig(llm=llm_cfg, vision=base.vision, adapter=base.adapter)
    t0 = time.perf_counter()
    eng = Engine(cfg, RandomGPTQLlama(cfg.llm), {"checkpoint_format": "gptq", "group_size": 128}, "kernels",
                 max_context, NoTokenizer())
    load_s = time.perf_counter() - t0
    ids = random_prompt_ids(cfg.llm.vocab_size, prompt_tokens)
    stats = GenerationStats()
    eng.reset(TEXT)
    eng.generate(ids, GenerationConfig(max_new_tokens=new_tokens), stats=stats, stop_ids=set())
    return {"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
            "prefill_tok_s": round(stats.prefill_tok_s, 2), "decode_tok_s": round(stats.decode_tok_s, 2),
            "ttft_ms": round(stats.ttft_s * 1000, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            **roofline_fields(cfg.llm, read_bw, eng.weight_bytes_per_token(), 4, prompt_tokens + new_tokens / 2,
                               stats.decode_tok_s),
            "load_s": round(load_s, 1), "threads": threads}


# ----------------------------------------------------------------------------------------- driver

def _run_row_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = module_command("lavin_edge.bench.chat", json.dumps(spec))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if out.returncode < 0:  # a native crash (a peer's build faulting): this row only, with the signal named
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"crashed: {signal.strsignal(-out.returncode) or f'signal {-out.returncode}'} "
                           f"(last line on stderr: {tail})"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"failed: {tail}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_chat_bench(json_out: bool = False, fp_model: str | None = None, q_model: str | None = None,
                   new_tokens: int = 64, threads: int | None = None, question: str = DEFAULT_QUESTION,
                   image: str | None = None, with_7b: bool = True, with_llamacpp: bool = True,
                   print_results: bool = True, timeout: float = 900.0, with_startup: bool = True,
                   context: int = 0) -> dict[str, Any]:
    """Run every row and return ``{"rows": [...], "threads", "new_tokens", "question"}``; prints a table
    (or one JSON object with ``json_out``). A row that cannot run carries ``skipped`` with the reason
    and null figures. ``context`` > 0: also the demo 4-bit on a text prompt of that many tokens (prefill, then
    decode at that context), beside llama.cpp on the same ids."""
    from lavin_edge.demo.build import demo_model_dir
    from lavin_edge.demo.paths import DemoModelMissing

    threads = threads or torch.get_num_threads()
    image = image or str(example_image())
    rows: list[dict[str, Any]] = []

    def add(model: str, backend: str, spec: dict[str, Any] | None, skip: str | None = None,
            res: dict[str, Any] | None = None) -> None:
        row: dict[str, Any] = {"model": model, "backend": backend}
        if res is None:
            res = {"skipped": skip} if skip else _run_row_subprocess({**spec, "threads": threads}, timeout)  # type: ignore[dict-item]
        for k in KEYS[2:]:
            row[k] = res.get(k)
        row.update({k: v for k, v in res.items() if k not in row})
        rows.append(row)

    for label, quantized, backend, given in (("demo fp (merged)", False, "torch", fp_model),
                                             ("demo 4-bit (quantized)", True, "kernels", q_model)):
        try:
            d = given or str(demo_model_dir(quantized=quantized))
        except DemoModelMissing as e:
            add(label, backend, None, str(e))
            continue
        add(f"{label}: {d}", backend, {"kind": "demo", "dir": d, "backend": backend, "new_tokens": new_tokens,
                                       "question": question, "image": image})
    if context:
        label = f"demo 4-bit, a {context}-token text prompt"
        try:
            d = q_model or str(demo_model_dir(quantized=True))
        except DemoModelMissing as e:
            add(label, "kernels", None, str(e))
        else:
            add(f"{label}: {d}", "kernels", {"kind": "demo", "dir": d, "backend": "kernels", "new_tokens": new_tokens,
                                             "question": question, "image": None, "prompt_tokens": context})
    if with_startup:
        label = "startup: one-shot `lavin-edge chat` on the demo 4-bit"
        try:
            d = q_model or str(demo_model_dir(quantized=True))
        except DemoModelMissing as e:
            add(label, "auto", None, str(e))
        else:
            add(f"{label}: {d}", "auto", None, res=startup_row(d, image, question, timeout, threads))
            # The same answer through the PyTorch session (--stats takes that path): what the engine without
            # PyTorch saves.
            add(f"{label}, PyTorch session (--stats): {d}", "auto", None,
                res=startup_row(d, image, question, timeout, threads, ("--stats",)))
    if with_7b:
        add("llama-7b-shaped, random 4-bit GPTQ g128 (+4-bit lm_head)", "kernels",
            {"kind": "llama7b", "new_tokens": min(new_tokens, 32), "prompt_tokens": 16, "max_context": 128})
    if with_llamacpp:
        # The same text the demo rows' LLM reads (image placeholders aside), with the GGUF's own tokenizer.
        for label, spec, skip in peer_rows(f"Image: N/A{_chat_prompt(question)}", new_tokens, context, with_7b):
            add(label, "llama.cpp", spec, skip)
    roofline = apply_run_roofline(rows)
    result = {"threads": threads, "new_tokens": new_tokens, "question": question, "image": image, "context": context,
              "roofline_gbs": roofline and roofline[0], "roofline_source": roofline and roofline[1], "rows": rows}
    if print_results:
        print(json.dumps(result) if json_out else format_table(result))
    return result


def _chat_prompt(q: str) -> str:
    from lavin_edge.prompt import chat_prompt

    return chat_prompt(q)


def format_table(result: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = [f"chat benchmark: {result['new_tokens']} new tokens, {result['threads']} threads, "
             f"question {result['question']!r}, image {result['image']}",
             f"{'model':<62} {'backend':<10} {'prefill':>9} {'decode':>8} {'TTFT ms':>9} {'RSS MB':>8} "
             f"{'roofline':>9} {'%roof':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['model'][:62]:<62} {r['backend']:<10} {f(r['prefill_tok_s']):>9} "
                     f"{f(r['decode_tok_s']):>8} {f(r['ttft_ms']):>9} {f(r['peak_rss_mb']):>8} "
                     f"{f(r.get('roofline_tok_s')):>9} {f(r.get('pct_of_roofline')):>6}")
        if r.get("skipped"):
            lines.append(f"    skipped: {r['skipped']}")
        if r.get("startup_cpu_s") is not None:
            lines.append(f"    process time {r['startup_cpu_s']:.2f} s (user {r['startup_user_s']:.2f} + sys "
                         f"{r['startup_sys_s']:.2f}), wall {r['startup_wall_s']:.2f} s, answer {r['answer'][:60]!r}")
        if r.get("read_bw_gbs"):
            lines.append(f"    {r['weight_bytes_per_token'] / 1e9:.2f} GB weights + {r['kv_bytes_per_token'] / 1e6:.0f}"
                         f" MB KV per token, streamed at {r['stream_gbs']} GB/s; its probe {r['read_bw_gbs']} GB/s")
    lines.append("tok/s columns: prefill and decode tokens per second; TTFT includes image encoding.")
    if result.get("roofline_gbs"):
        lines.append(f"roofline: {result['roofline_gbs']} GB/s, the best streaming rate in this run "
                     f"({result['roofline_source']}), over the bytes one decode step reads")
    return "\n".join(lines)


def _main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    kind = spec["kind"]
    if kind == "demo":
        row = _demo_row(spec["dir"], spec["backend"], spec["new_tokens"], spec["question"], spec.get("image"),
                        spec.get("prompt_tokens"))
    elif kind == "llama7b":
        row = _llama7b_row(spec["new_tokens"], spec["prompt_tokens"], spec["max_context"])
    elif kind == "llamacpp":
        # A random GGUF of ours comes with the config it was written from, for its roofline.
        from lavin_edge.config import LlamaConfig

        llm = LlamaConfig(**spec["llm"]) if spec.get("llm") else None
        row = llamacpp_row(spec["gguf"], spec["new_tokens"], spec.get("prompt"), spec.get("prompt_ids"),
                           spec.get("n_ctx", 512), llm, spec.get("prompt_tokens", 0))
    else:
        raise SystemExit(f"unknown row kind {kind!r}")
    print(json.dumps(row))


if __name__ == "__main__":
    _main(sys.argv[1])
