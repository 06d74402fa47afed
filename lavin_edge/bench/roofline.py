"""The bandwidth limit of a decode step ("roofline") in ``bench chat``: the bytes one step reads (weights plus
the KV cache at the mean decode length) at the best streaming rate measured in the run.

Each row's child probes the read bandwidth before its model loads (``probe_read_bw``) and reports its figures
against that probe (:func:`roofline_fields`); the driver then puts every roofline row on one rate, the best
measured in the run (:func:`apply_run_roofline`): the highest probe, or a row's own decode where it streams
faster than any probe (a probe that some decode outruns understates the memory), and names which."""

from __future__ import annotations

from typing import Any

from lavin_edge.bench.kernels import PROBE, best_streaming_rate

__all__ = ["apply_run_roofline", "probe_read_bw", "roofline_fields"]


def probe_read_bw(threads: int, probe_bytes: int | None = None) -> float:
    """Read bandwidth (GB/s) on a buffer > 4x the last-level cache, freed afterwards (RSS peak stays the model's)."""
    from lavin_edge.bench.kernels import last_level_cache_bytes, measure_read_bandwidth

    return measure_read_bandwidth(threads, probe_bytes or max(512 * 2**20, 8 * last_level_cache_bytes()))


def _on_rate(row: dict[str, Any], gbs: float, source: str) -> dict[str, Any]:
    """``row``'s roofline at ``gbs`` GB/s (from ``source``): tok/s and the row's share of it."""
    roofline = gbs * 1e9 / (row["weight_bytes_per_token"] + row["kv_bytes_per_token"])
    row.update({"roofline_tok_s": round(roofline, 2), "pct_of_roofline": round(100 * row["decode_tok_s"] / roofline, 1),
                "roofline_gbs": round(gbs, 2), "roofline_source": source})
    return row


def roofline_fields(llm: Any, read_bw: float, weight_bytes: int, kv_elem_bytes: int, mean_len: float,
                    decode_tok_s: float) -> dict[str, Any]:
    """A row's roofline figures on its own probe: the bytes of a decode step (weights plus K and V of every layer,
    ``kv_elem_bytes`` per element, at the mean decode length), the rate it streamed them at, and its share."""
    kv_bytes = int(2 * llm.n_layers * llm.n_kv_heads * llm.head_dim * kv_elem_bytes * mean_len)
    row = {"decode_tok_s": decode_tok_s, "read_bw_gbs": round(read_bw, 2), "weight_bytes_per_token": weight_bytes,
           "kv_bytes_per_token": kv_bytes, "stream_gbs": round(decode_tok_s * (weight_bytes + kv_bytes) / 1e9, 2)}
    _on_rate(row, read_bw, f"{PROBE} of this row")
    del row["decode_tok_s"]
    return row


def apply_run_roofline(rows: list[dict[str, Any]]) -> tuple[float, str] | None:
    """Put every row that has roofline figures on the run's best streaming rate; returns (GB/s, source), or None
    when no row has them. Rates: each row's probe (``read_bw_gbs``) and each row's own decode (``stream_gbs``)."""
    timed = [r for r in rows if r.get("read_bw_gbs") and r.get("decode_tok_s")]
    if not timed:
        return None
    rates: dict[str, float] = {}
    for r in timed:
        rates[f"{PROBE} in row '{r['model']}'"] = r["read_bw_gbs"]
        rates[f"decode of row '{r['model']}'"] = r["stream_gbs"]
    gbs, source = best_streaming_rate(rates)
    for r in timed:
        _on_rate(r, gbs, source)
    return gbs, source
