"""A LLaMA-shaped GGUF with random Q4_0 weights, for timing llama.cpp on the same shapes as our 7B row.

Nothing can be downloaded here, so the llama.cpp side of the 7B comparison needs a file of the right shape
made locally. Every linear, the token embedding and the output matrix are Q4_0 (blocks of 32 weights: one
fp16 scale + 16 bytes of nibbles), as in llama.cpp's own Q4_0 LLaMA-7B; norms are F32 ones. The scale of
each block is ~1/(8 sqrt(k)) so that unit-RMS inputs keep unit-scale outputs and the random network stays
finite. The vocabulary is a SentencePiece-style list: the control tokens, the 256 byte tokens, then filler
pieces; prompts are fed as token ids, so its content does not matter, only its size.

The file is written tensor by tensor (peak memory: one tensor), to a temporary name renamed at the end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

Q4_0_BLOCK, Q4_0_BYTES = 32, 18


def _q4_0_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """[n, k / 32 * 18] uint8: random nibbles with a scale of about 1 / (8 sqrt(k)) per block."""
    if k % Q4_0_BLOCK:
        raise ValueError(f"Q4_0 needs inputs divisible by {Q4_0_BLOCK}, got {k}")
    blocks = np.frombuffer(rng.bytes(n * (k // Q4_0_BLOCK) * Q4_0_BYTES), dtype=np.uint8).reshape(n, -1, Q4_0_BYTES)
    blocks = blocks.copy()
    scale = (rng.random((n, k // Q4_0_BLOCK), dtype=np.float32) * 0.5 + 0.75) / (8.0 * np.sqrt(k))
    blocks[..., :2] = scale.astype(np.float16).view(np.uint8).reshape(n, -1, 2)
    return blocks.reshape(n, -1)


def _tensor_plan(llm: Any) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
    """(gguf name, numpy shape [n_out, k] or [k], "q4_0" | "f32") in llama.cpp's naming."""
    d, hd = llm.dim, llm.head_dim
    plan: list[tuple[str, Any, str]] = [("token_embd.weight", (llm.vocab_size, d), "q4_0"),
                                        ("output_norm.weight", (d,), "f32"),
                                        ("output.weight", (llm.vocab_size, d), "q4_0")]
    for i in range(llm.n_layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (d,), "f32"), (b + "ffn_norm.weight", (d,), "f32"),
                 (b + "attn_q.weight", (llm.n_heads * hd, d), "q4_0"),
                 (b + "attn_k.weight", (llm.n_kv_heads * hd, d), "q4_0"),
                 (b + "attn_v.weight", (llm.n_kv_heads * hd, d), "q4_0"),
                 (b + "attn_output.weight", (d, llm.n_heads * hd), "q4_0"),
                 (b + "ffn_gate.weight", (llm.ffn_dim, d), "q4_0"),
                 (b + "ffn_up.weight", (llm.ffn_dim, d), "q4_0"),
                 (b + "ffn_down.weight", (d, llm.ffn_dim), "q4_0")]
    return plan


def decode_bytes_per_token(llm: Any) -> int:
    """Weight bytes one decode step reads: every Q4_0 matrix and norm, but one row of the embedding."""
    total = 0
    for name, shape, kind in _tensor_plan(llm):
        if kind == "f32":
            total += 4 * shape[0]
            continue
        n, k = shape
        row = k // Q4_0_BLOCK * Q4_0_BYTES
        total += row if name == "token_embd.weight" else n * row
    return total


def write_random_llama_gguf(path: str | Path, llm: Any, seed: int = 0) -> Path:
    """Write ``llm`` (a ``LlamaConfig``) as a random Q4_0 GGUF at ``path``; returns the path."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("random-llama-q4_0")
    w.add_context_length(llm.max_seq_len)
    w.add_embedding_length(llm.dim)
    w.add_block_count(llm.n_layers)
    w.add_feed_forward_length(llm.ffn_dim)
    w.add_head_count(llm.n_heads)
    w.add_head_count_kv(llm.n_kv_heads)
    w.add_rope_dimension_count(llm.head_dim)
    w.add_rope_freq_base(float(llm.rope_theta))
    w.add_layer_norm_rms_eps(float(llm.norm_eps))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    n_special = 3 + 256
    if llm.vocab_size < n_special:
        raise ValueError(f"vocab_size {llm.vocab_size} < {n_special} (control + byte tokens)")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(llm.vocab_size - n_special)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (llm.vocab_size - n_special)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_special + [-float(i) for i in range(llm.vocab_size - n_special)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    plan = _tensor_plan(llm)
    for name, shape, kind in plan:
        if kind == "f32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            n, k = shape
            byte_shape = (n, k // Q4_0_BLOCK * Q4_0_BYTES)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1],
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _name, shape, kind in plan:
        if kind == "f32":
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data(_q4_0_rows(rng, *shape))
    w.close()
    os.replace(tmp, path)
    return path


def cached_random_llama_gguf(llm: Any, cache_dir: str | Path | None = None) -> Path:
    """The random GGUF for ``llm``, written once under ~/.cache/lavin-edge/bench (or ``cache_dir``)."""
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "lavin-edge" / "bench"
    name = (f"random-llama-d{llm.dim}-l{llm.n_layers}-f{llm.ffn_dim}-h{llm.n_heads}-kv{llm.n_kv_heads}"
            f"-v{llm.vocab_size}-q4_0.gguf")
    path = root / name
    return path if path.is_file() else write_random_llama_gguf(path, llm)
