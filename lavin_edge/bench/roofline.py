"""What the chat benchmark's rows share: peak RSS, the random prompt ids (the same for our engine and llama.cpp),
and the bandwidth limit of a decode step (read bandwidth over the bytes one step reads)."""

from __future__ import annotations

from typing import Any

import torch


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def probe_read_bw(threads: int, probe_bytes: int | None = None) -> float:
    """Read bandwidth (GB/s) on a buffer > 4x the last-level cache, freed afterwards (RSS peak stays the model's)."""
    from lavin_edge.bench.kernels import last_level_cache_bytes, measure_read_bandwidth

    return measure_read_bandwidth(threads, probe_bytes or max(512 * 2**20, 8 * last_level_cache_bytes()))


def roofline_fields(llm: Any, read_bw: float, weight_bytes: int, kv_elem_bytes: int, mean_len: float,
                     decode_tok_s: float) -> dict[str, Any]:
    """The bandwidth limit of a decode step: read bandwidth over the weight bytes plus the KV cache (K and V of
    every layer, ``kv_elem_bytes`` per element) at the mean decode length; and the row's share of it."""
    kv_bytes = int(2 * llm.n_layers * llm.n_kv_heads * llm.head_dim * kv_elem_bytes * mean_len)
    roofline = read_bw * 1e9 / (weight_bytes + kv_bytes)
    return {"roofline_tok_s": round(roofline, 2), "pct_of_roofline": round(100 * decode_tok_s / roofline, 1),
            "read_bw_gbs": round(read_bw, 2), "weight_bytes_per_token": weight_bytes, "kv_bytes_per_token": kv_bytes}


def random_prompt_ids(vocab_size: int, n: int) -> list[int]:
    """The 7B and long-context rows' prompt: the same random ids for our engine and for llama.cpp."""
    return [int(i) for i in torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(0))]
