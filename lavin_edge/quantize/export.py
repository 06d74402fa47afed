"""Export the LLM of a quantized directory as a Hugging Face GPTQ LLaMA (``LlamaForCausalLM`` +
``quantization_config``), so transformers / gptqmodel can load it: the interop proof of the format.

Only the LLM goes (no vision tower, no adapters): the export refuses a model whose folded adapters are
not the identity for the chosen modality unless ``allow_adapters`` (then they are dropped, and the
exported model is the base LLM only). q/k rows go from Meta's interleaved rotary layout to HF's
rotate-half layout; for packed tensors that is a permutation of the output columns of ``qweight`` and
``scales`` and of the nibbles of ``qzeros``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lavin_edge.kernels.gptq_format import pack_nibbles_cols, unpack_nibbles_cols

_HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
       "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
       "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _meta_to_hf_rows(n_heads: int, rows: int) -> torch.Tensor:
    """Index p such that hf_rows = meta_rows[p] (transformers' ``permute`` of q/k)."""
    idx = torch.arange(rows)
    return idx.view(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(rows)


def export_hf_gptq(quant_dir: str | Path, out_dir: str | Path, allow_adapters: bool = False) -> Path:
    from safetensors.torch import load_file, save_file

    qd, out = Path(quant_dir), Path(out_dir)
    cfg = json.loads((qd / "config.json").read_text())
    qc = cfg["quantization_config"]
    llm = cfg["lavin_config"]["llm"]
    sd = load_file(str(qd / "model.safetensors"))
    if not allow_adapters:
        ups = [v for k, v in sd.items() if k.endswith("adapter.up.weight") or k.endswith("adapter.up.bias")]
        if any(bool(v.abs().max() > 0) for v in ups):
            raise ValueError("the folded adapters are not the identity; HF LLaMA has no place for them "
                             "(pass allow_adapters=True to export the base LLM alone)")
    hf: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["tok_embeddings.weight"],
                                   "model.norm.weight": sd["norm.weight"]}
    if "output.weight" in sd:
        hf["lm_head.weight"] = sd["output.weight"]
    hd = llm["dim"] // llm["n_heads"]
    for i in range(llm["n_layers"]):
        for ours, theirs in _HF.items():
            src, dst = f"layers.{i}.{ours}", f"model.layers.{i}.{theirs}"
            if f"{src}.weight" in sd:
                hf[f"{dst}.weight"] = sd[f"{src}.weight"]
                continue
            t = {s: sd[f"{src}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
            if ours in ("attention.wq", "attention.wk"):
                heads = llm["n_heads"] if ours == "attention.wq" else llm["n_kv_heads"]
                p = _meta_to_hf_rows(heads, heads * hd)
                t["qweight"] = t["qweight"][:, p].contiguous()
                t["scales"] = t["scales"][:, p].contiguous()
                t["qzeros"] = pack_nibbles_cols(unpack_nibbles_cols(t["qzeros"], heads * hd)[:, p].contiguous())
            for s, v in t.items():
                hf[f"{dst}.{s}"] = v
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_qc = {k: qc[k] for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format", "static_groups",
                                "damp_percent", "true_sequential") if k in qc}
    hf_qc.update(quant_method="gptq", pack_dtype="int32", lm_head=False)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": llm["dim"],
        "num_hidden_layers": llm["n_layers"], "num_attention_heads": llm["n_heads"],
        "num_key_value_heads": llm["n_kv_heads"], "intermediate_size": llm["ffn_dim"],
        "vocab_size": llm["vocab_size"], "rms_norm_eps": llm["norm_eps"], "rope_theta": llm["rope_theta"],
        "max_position_embeddings": llm["max_seq_len"], "tie_word_embeddings": llm["tie_embeddings"],
        "hidden_act": "silu", "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
        "head_dim": hd, "quantization_config": hf_qc,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "quantize_config.json").write_text(json.dumps(hf_qc, indent=2) + "\n")
    return out
