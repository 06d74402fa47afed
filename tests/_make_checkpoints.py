"""Write tiny checkpoints in the real on-disk layouts of other tools (HF, Meta, OpenAI CLIP, HF CLIP).

Each writer takes a state dict in our naming and produces what the original tool would have written,
so the loaders are tested on real layouts, not on our own format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lavin_edge.config import LlamaConfig, VisionConfig
from lavin_edge.io.llama_loaders import meta_to_hf_qk

_HF_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}


def to_hf_llama(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our names -> transformers' LlamaForCausalLM names, q/k permuted as convert_llama_weights_to_hf does."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["model.norm.weight"] = v
        elif k == "output.weight":
            out["lm_head.weight"] = v
        else:
            _, i, rest = k.split(".", 2)
            if rest.endswith("wq.weight"):
                v = meta_to_hf_qk(v, cfg.n_heads)
            elif rest.endswith("wk.weight"):
                v = meta_to_hf_qk(v, cfg.n_kv_heads)
            out[f"model.layers.{i}.{_HF_LAYER[rest]}"] = v
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_config(cfg: LlamaConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.ffn_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32",
    }


def write_hf_llama(d: Path, sd: dict[str, torch.Tensor], cfg: LlamaConfig, shards: int = 1) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config(cfg)))
    hf = to_hf_llama(sd, cfg)
    if shards == 1:
        save_file(hf, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d
    names = sorted(hf)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: hf[k] for k in names[s::shards]}
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return d


_CAT0 = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_CAT1 = ("wo.weight", "w2.weight", "tok_embeddings.weight")


def write_meta_llama(d: Path, sd: dict[str, torch.Tensor], params: dict, shards: int) -> Path:
    """Split like Meta's model-parallel ranks: column-parallel on dim 0, row-parallel/embedding on dim 1."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.json").write_text(json.dumps(params))
    for r in range(shards):
        part = {}
        for k, v in sd.items():
            if k.endswith(_CAT0):
                v = v.chunk(shards, dim=0)[r]
            elif k.endswith(_CAT1):
                v = v.chunk(shards, dim=1)[r]
            part[k] = v.clone()
        part["rope.freqs"] = torch.zeros(4)  # LLaMA-1 files carry this buffer
        torch.save(part, d / f"consolidated.{r:02d}.pth")
    return d


def write_openai_clip(path: Path, visual_sd: dict[str, torch.Tensor], with_text: bool = True) -> Path:
    """A full-CLIP state dict with ``visual.*`` keys plus text-tower tensors, as torch.save writes it."""
    sd = {f"visual.{k}": v.clone() for k, v in visual_sd.items()}
    if with_text:
        w = 16
        sd.update({"token_embedding.weight": torch.randn(10, w), "positional_embedding": torch.randn(5, w),
                   "transformer.resblocks.0.ln_1.weight": torch.ones(w), "ln_final.weight": torch.ones(w),
                   "ln_final.bias": torch.zeros(w), "text_projection": torch.randn(w, w),
                   "logit_scale": torch.tensor(4.6)})
    torch.save(sd, path)
    return path


def write_hf_clip_vision(d: Path, visual_sd: dict[str, torch.Tensor], cfg: VisionConfig,
                         with_projection: bool = False) -> Path:
    """transformers' CLIPVisionModel layout (q/k/v split out of in_proj, ``pre_layrnorm`` spelling)."""
    d.mkdir(parents=True, exist_ok=True)
    p = "vision_model."
    out = {
        p + "embeddings.patch_embedding.weight": visual_sd["conv1.weight"],
        p + "embeddings.class_embedding": visual_sd["class_embedding"],
        p + "embeddings.position_embedding.weight": visual_sd["positional_embedding"],
        p + "embeddings.position_ids": torch.arange(visual_sd["positional_embedding"].shape[0])[None],
        p + "pre_layrnorm.weight": visual_sd["ln_pre.weight"], p + "pre_layrnorm.bias": visual_sd["ln_pre.bias"],
        p + "post_layernorm.weight": visual_sd["ln_post.weight"],
        p + "post_layernorm.bias": visual_sd["ln_post.bias"],
    }
    for j in range(cfg.layers):
        src, dst = f"transformer.resblocks.{j}.", f"{p}encoder.layers.{j}."
        for s in ("weight", "bias"):
            q, k, v = visual_sd[f"{src}attn.in_proj_{s}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{s}"], out[f"{dst}self_attn.k_proj.{s}"] = q, k
            out[f"{dst}self_attn.v_proj.{s}"] = v
            out[f"{dst}self_attn.out_proj.{s}"] = visual_sd[f"{src}attn.out_proj.{s}"]
            out[f"{dst}layer_norm1.{s}"] = visual_sd[f"{src}ln_1.{s}"]
            out[f"{dst}layer_norm2.{s}"] = visual_sd[f"{src}ln_2.{s}"]
            out[f"{dst}mlp.fc1.{s}"] = visual_sd[f"{src}mlp.c_fc.{s}"]
            out[f"{dst}mlp.fc2.{s}"] = visual_sd[f"{src}mlp.c_proj.{s}"]
    if with_projection:
        out["visual_projection.weight"] = visual_sd["proj"].t()
    save_file({k: v.contiguous().clone() for k, v in out.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "model_type": "clip_vision_model", "hidden_size": cfg.width, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "patch_size": cfg.patch_size, "image_size": cfg.image_size,
        "intermediate_size": 4 * cfg.width, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}))
    return d
