"""LLaMA checkpoint loaders: Hugging Face safetensors dirs, Meta ``consolidated.*.pth`` and GGUF.

Each returns ``(LlamaConfig, state_dict)`` with tensors in our Meta naming contract (see
``checks.llama_expected_shapes``) and q/k rows in Meta's interleaved rotary layout (pairs
``(x[2i], x[2i+1])``), cast to ``dtype`` (fp32 by default). ``load_llm`` detects the format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lavin_edge.config import LlamaConfig
from lavin_edge.io.checks import CheckpointError, check_state_dict, llama_expected_shapes

# Buffers some HF checkpoints carry that are derived data, not weights (recomputed from rope_theta).
HF_HARMLESS = ("rotary_emb.inv_freq",)
# LLaMA-1 consolidated files carry the rotary frequency table; it is recomputed from rope_theta.
META_HARMLESS = ("rope.freqs",)


# ----------------------------------------------------------------------------- q/k layout

def hf_to_meta_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo transformers' ``convert_llama_weights_to_hf.permute`` on q/k rows.

    HF stores each head's rows as [all even-pair members, all odd-pair members] (rotate-half);
    Meta interleaves them. HF's permute is ``view(h, hd/2, 2, D).transpose(1, 2)``; this is its inverse.
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' ``permute`` (Meta interleaved -> HF rotate-half); used to write HF files in tests."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------- Hugging Face

def _hf_rope_theta(cfg: dict) -> float:
    # transformers >= 5 moved rope_theta into rope_parameters; older files have it top level.
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        # Our rotary has no frequency scaling (llama3/yarn/linear); loading would silently change the model.
        raise CheckpointError(f"unsupported rope scaling {scaling!r}: only plain RoPE is implemented")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def hf_config_to_llama(cfg: dict) -> LlamaConfig:
    """Map a transformers ``LlamaConfig`` dict onto ours."""
    if cfg.get("model_type", "llama") not in ("llama", "mistral") and "LlamaForCausalLM" not in cfg.get(
        "architectures", []
    ):
        raise CheckpointError(f"not a LLaMA config.json (model_type={cfg.get('model_type')!r})")
    dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if cfg.get("head_dim") not in (None, dim // heads):
        raise CheckpointError(f"head_dim {cfg['head_dim']} != hidden_size/num_attention_heads {dim // heads}")
    out = LlamaConfig(
        dim=dim,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        ffn_dim=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_hf_rope_theta(cfg),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    out.validate()
    return out


_HF_LAYER = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of one or more safetensors files; a name in two shards is an error."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                if k in out:
                    raise CheckpointError(f"tensor {k!r} appears in more than one shard ({f.name})")
                out[k] = st.get_tensor(k)
    return out


def load_hf_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Load a Hugging Face LLaMA directory (``config.json`` + single or sharded safetensors)."""
    path = Path(path)
    cfg = hf_config_to_llama(json.loads((path / "config.json").read_text()))
    raw = read_safetensors(hf_files(path))
    if cfg.tie_embeddings and "lm_head.weight" in raw:
        # Some exporters write the tied head anyway; harmless only if it really is the embedding.
        if not torch.equal(raw["lm_head.weight"], raw.get("model.embed_tokens.weight", torch.empty(0))):
            raise CheckpointError("tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
        del raw["lm_head.weight"]
    sd: dict[str, torch.Tensor] = {}
    unexpected: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if k in _HF_TOP:
            sd[_HF_TOP[k]] = v
            continue
        m = _HF_LAYER_RE.fullmatch(k)
        if m and m.group(2) in _HF_LAYER:
            name = f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
            if name.endswith("wq.weight"):
                v = hf_to_meta_qk(v, cfg.n_heads)
            elif name.endswith("wk.weight"):
                v = hf_to_meta_qk(v, cfg.n_kv_heads)
            sd[name] = v
        elif not any(h in k for h in HF_HARMLESS):
            unexpected[k] = v  # reported by name below, in HF naming so the user can find it
    sd = {k: v.to(dtype) for k, v in sd.items()}
    check_state_dict(llama_expected_shapes(cfg), {**sd, **unexpected}, allow_missing=(), source=str(path))
    return cfg, sd


# ----------------------------------------------------------------------------- Meta

def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden width exactly as Meta's ``FeedForward.__init__`` computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# Model-parallel split dims in Meta's fairscale layers: ColumnParallel -> 0, RowParallel/ParallelEmbedding -> 1.
_META_CAT0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
              "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_META_CAT1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def load_meta_llama(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Load Meta's ``params.json`` + ``consolidated.NN.pth`` (one or several model-parallel shards)."""
    path = Path(path)
    params = json.loads((path / "params.json").read_text())
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: no consolidated.*.pth files")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    names = list(shards[0])
    for f, s in zip(files[1:], shards[1:], strict=True):
        if set(s) != set(names):
            raise CheckpointError(f"{f.name}: tensor names differ from {files[0].name}: "
                                  f"{sorted(set(s) ^ set(names))[:10]}")
    sd: dict[str, torch.Tensor] = {}
    for k in names:
        if any(h in k for h in META_HARMLESS):
            continue
        parts = [s[k] for s in shards]
        if len(parts) == 1:
            t = parts[0]
        elif k.endswith(_META_CAT0):
            t = torch.cat(parts, dim=0)
        elif k.endswith(_META_CAT1):
            t = torch.cat(parts, dim=1)
        else:  # norms are replicated on every rank
            t = parts[0]
        sd[k] = t.to(dtype)
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:  # LLaMA-1 params.json says -1; the tokenizer decides, and the embedding shows it
        vocab = int(sd["tok_embeddings.weight"].shape[0])
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    if "multiple_of" in params:
        ffn = meta_ffn_dim(dim, int(params["multiple_of"]), params.get("ffn_dim_multiplier"))
        if w1 is not None and w1.shape[0] != ffn:
            raise CheckpointError(f"params.json gives ffn_dim {ffn} but layers.0.feed_forward.w1.weight "
                                  f"has shape {tuple(w1.shape)}")
    elif w1 is not None:
        ffn = int(w1.shape[0])
    else:
        raise CheckpointError("cannot determine ffn_dim: no multiple_of in params.json and no w1 tensor")
    cfg = LlamaConfig(
        dim=dim, n_layers=int(params["n_layers"]), n_heads=n_heads,
        n_kv_heads=int(params.get("n_kv_heads") or n_heads), ffn_dim=ffn, vocab_size=vocab,
        norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
        max_seq_len=int(params.get("max_seq_len", 2048)),
        tie_embeddings="output.weight" not in sd,
    )
    cfg.validate()
    check_state_dict(llama_expected_shapes(cfg), sd, allow_missing=(), source=str(path))
    return cfg, sd


# ----------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
_GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# llama.cpp writes precomputed rope factors for llama3-style scaling; we do not implement that scaling.
_GGUF_UNSUPPORTED = ("rope_freqs.weight",)


def gguf_field(reader, key: str, default=None):  # noqa: ANN001, ANN201 - gguf types are untyped
    """A scalar/string/array metadata value of a GGUFReader, or ``default`` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_gguf_llama(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Load a llama-architecture GGUF file, dequantizing every tensor (Q4/Q8/F16/... -> ``dtype``).

    GGUF lists dims innermost first (``[in, out]``); the reader's numpy arrays are already row-major
    ``[out, in]``, i.e. PyTorch's Linear layout, which the shape check below confirms. llama.cpp's
    converter permutes HF q/k rows into Meta's interleaved layout, so q/k are used as they are.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r}, only 'llama' is supported")
    n_heads = int(gguf_field(reader, "llama.attention.head_count"))
    dim = int(gguf_field(reader, "llama.embedding_length"))
    rope_dims = gguf_field(reader, "llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != dim // n_heads:
        raise CheckpointError(f"partial rotary ({rope_dims} of {dim // n_heads} dims) is not supported")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = gguf_field(reader, "llama.vocab_size")
    sd: dict[str, torch.Tensor] = {}
    unexpected: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)
        if not arr.flags.writeable:  # F32 tensors come back as views of the read-only memmap
            arr = arr.copy()
        # GGUF shape is reversed PyTorch order; reshape defends against readers that return flat data.
        shape = tuple(int(d) for d in reversed(list(t.shape)))
        tensor = torch.from_numpy(arr.reshape(shape)).to(dtype)
        if t.name in _GGUF_TOP:
            sd[_GGUF_TOP[t.name]] = tensor
            continue
        m = _GGUF_LAYER_RE.fullmatch(t.name)
        if m and m.group(2) in _GGUF_LAYER:
            sd[f"layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"] = tensor
        else:
            unexpected[t.name] = tensor
    if "tok_embeddings.weight" not in sd:
        raise CheckpointError(f"{path}: no token_embd.weight tensor")
    cfg = LlamaConfig(
        dim=dim,
        n_layers=int(gguf_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(gguf_field(reader, "llama.attention.head_count_kv", n_heads)),
        ffn_dim=int(gguf_field(reader, "llama.feed_forward_length")),
        vocab_size=int(vocab) if vocab is not None else (
            len(tokens) if tokens is not None else int(sd["tok_embeddings.weight"].shape[0])),
        # GGUF stores eps as float32 (1e-5 reads back as 9.9999997e-06); 7 digits restore the written value.
        norm_eps=float(f'{float(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)):.7g}'),
        rope_theta=float(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        max_seq_len=int(gguf_field(reader, "llama.context_length", 2048)),
        tie_embeddings="output.weight" not in sd,
    )
    cfg.validate()
    check_state_dict(llama_expected_shapes(cfg), {**sd, **unexpected}, allow_missing=(), source=str(path))
    return cfg, sd


# ----------------------------------------------------------------------------- entry point

def load_llm(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[LlamaConfig, dict[str, torch.Tensor], Path | None]:
    """Detect the checkpoint format and load it: ``(config, state_dict, tokenizer path or None)``.

    - a ``.gguf`` file (its tokenizer is embedded: the tokenizer path is the file itself);
    - a directory with ``config.json`` (Hugging Face; tokenizer ``tokenizer.json`` or ``tokenizer.model``);
    - a directory with ``params.json`` (Meta; ``tokenizer.model`` here or in the parent directory, as in
      Meta's download layout).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        cfg, sd = load_gguf_llama(path, dtype)
        return cfg, sd, path
    if path.is_dir() and (path / "config.json").exists():
        cfg, sd = load_hf_llama(path, dtype)
        tok = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).exists()), None)
        return cfg, sd, tok
    if path.is_dir() and (path / "params.json").exists():
        cfg, sd = load_meta_llama(path, dtype)
        tok = next((d / "tokenizer.model" for d in (path, path.parent) if (d / "tokenizer.model").exists()), None)
        return cfg, sd, tok
    raise CheckpointError(f"{path}: not a .gguf file nor a directory with config.json or params.json")
