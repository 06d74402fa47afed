"""The chat benchmark's 7B row: decode on random 4-bit weights of LLaMA-7B's shape, generated as the engine loads
them (peak memory ~1x the model), against the bandwidth limit."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lavin_edge.bench.roofline import peak_rss_mb, probe_read_bw, random_prompt_ids, roofline_fields


class RandomGPTQLlama(Mapping):
    """The tensors of a merged LLaMA in the quantized-dir naming, generated on access and never kept: linears
    (and lm_head) as random 4-bit GPTQ (sym, group 128, v1), norms at 1, small random folded adapters,
    a 16-bit embedding table. The engine packs each layer as it loads, so peak memory stays ~1x the model."""

    def __init__(self, cfg: Any, group_size: int = 128, seed: int = 0) -> None:
        self.cfg, self.gs, self.seed = cfg, group_size, seed
        d, hd = cfg.dim, cfg.head_dim
        self.linears = {"attention.wq": (cfg.n_heads * hd, d), "attention.wk": (cfg.n_kv_heads * hd, d),
                        "attention.wv": (cfg.n_kv_heads * hd, d), "attention.wo": (d, cfg.n_heads * hd),
                        "feed_forward.w1": (cfg.ffn_dim, d), "feed_forward.w2": (d, cfg.ffn_dim),
                        "feed_forward.w3": (cfg.ffn_dim, d)}
        names = ["tok_embeddings.weight", "norm.weight"] + [f"output.{s}" for s in ("qweight", "qzeros", "scales",
                                                                                     "g_idx")]
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            names += [p + "attention_norm.weight", p + "ffn_norm.weight"]
            names += [p + "adapter." + s for s in ("down.weight", "down.bias", "up.weight", "up.bias")]
            names += [f"{p}{n}.{s}" for n in self.linears for s in ("qweight", "qzeros", "scales", "g_idx")]
        self.names = names
        self._set = set(names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __getitem__(self, key: str) -> torch.Tensor:
        cfg = self.cfg
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{key}".encode()))
        if key == "tok_embeddings.weight":
            return (torch.randn(cfg.vocab_size, cfg.dim, generator=g) * 0.02).half()
        if key.endswith("norm.weight"):
            return torch.ones(cfg.dim)
        if ".adapter." in key:
            r = 8
            shape = {"down.weight": (r, cfg.dim), "down.bias": (r,), "up.weight": (2, cfg.dim, r),
                     "up.bias": (2, cfg.dim)}[key.split(".adapter.")[1]]
            return torch.randn(shape, generator=g) * 0.01
        prefix, suffix = key.rsplit(".", 1)
        n, k = (cfg.vocab_size, cfg.dim) if prefix == "output" else self.linears[prefix.split(".", 2)[2]]
        groups = k // self.gs
        if suffix == "qweight":
            return torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=g)
        if suffix == "qzeros":
            return torch.full((groups, n // 8), 0x77777777, dtype=torch.int32)  # symmetric v1: zero 8, stored 7
        if suffix == "scales":
            # Scaled so that unit-RMS inputs give unit-scale outputs: keeps the random network finite.
            return (torch.rand(groups, n, generator=g) * 0.5 + 0.75).mul_(1.0 / (4.6 * k**0.5)).half()
        if suffix == "g_idx":
            return (torch.arange(k) // self.gs).to(torch.int32)
        raise KeyError(key)


class NoTokenizer:
    """Random weights have no vocabulary: ids are decoded to nothing, and nothing stops generation."""

    bos_id, eos_id, pad_id = 1, 2, 0
    stop_ids: set[int] = set()

    def decode(self, ids: list[int]) -> str:
        return ""


def llama7b_row(new_tokens: int, prompt_tokens: int, max_context: int, llm: dict[str, Any] | None = None,
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
