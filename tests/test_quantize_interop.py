"""Interop: our quantized checkpoint, exported as a Hugging Face GPTQ LLaMA, loads in transformers (through
optimum + gptqmodel's CPU kernel) and gives our logits.

Runs where transformers, optimum and gptqmodel import -- the gptqmodel venv of tests/test_gptq_vs_gptqmodel.py
plus `pip install --no-deps optimum`; skips elsewhere, naming the reason. Measured: max abs logit difference
0.010-0.011 at logit scale ~2.3 (the library's int4 kernel computes in reduced precision: q_proj outputs
agree to 0.4% relative), against 0.25-0.32 for the quantization itself; v1 sym, v1 sym act-order, v2 asym.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
for _mod in ("transformers", "optimum", "gptqmodel"):
    pytest.importorskip(_mod, reason=f"{_mod} is not installed here (see this file's docstring)")


@pytest.mark.parametrize("sym,desc_act", [(True, False), (True, True), (False, True)])
def test_transformers_loads_our_gptq_llm(tmp_path, sym: bool, desc_act: bool) -> None:
    from transformers import AutoModelForCausalLM

    from lavin_edge.config import preset
    from lavin_edge.io.llama_loaders import meta_to_hf_qk
    from lavin_edge.merge import merge_lavin, save_merged
    from lavin_edge.model.lavin import build_lavin
    from lavin_edge.quantize.export import export_hf_gptq
    from lavin_edge.quantize.files import load_quantized_as_fp, save_quantized
    from lavin_edge.quantize.pipeline import CalibSample, GPTQConfig, quantize_model

    torch.manual_seed(0)
    model = build_lavin(preset("tiny", "tiny")).eval()  # fresh adapters: the identity, so HF LLaMA can hold it
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if ".adapter." not in f".{n}" and p.dim() > 1:
                p.normal_(0, 0.05)
    merged, table = merge_lavin(model)
    g = torch.Generator().manual_seed(1)
    samples = [CalibSample(torch.randint(0, 256, (48,), generator=g).tolist()) for _ in range(8)]
    qcfg = GPTQConfig(group_size=32, sym=sym, desc_act=desc_act)
    packed, rep = quantize_model(merged, samples, qcfg, modalities=("text",), progress=False)
    save_merged(merged, tmp_path / "m", "bytes", {}, table)
    save_quantized(merged, packed, json.loads((tmp_path / "m" / "config.json").read_text()), qcfg, tmp_path / "q",
                   "bytes", rep)
    ours, _ = load_quantized_as_fp(tmp_path / "q")
    export_hf_gptq(tmp_path / "q", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), device_map="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 20), generator=g)
    with torch.no_grad():
        a = ours.llm.forward_embeds(ours.llm.tok_embeddings(ids), torch.zeros(1, dtype=torch.long))
        b = hf(ids).logits.float()
        t_m = model.modality_embedding(torch.zeros(1, dtype=torch.long))[:, None]
        fp = model.llm.forward_embeds(torch.cat([t_m, model.llm.tok_embeddings(ids)], 1))[:, 1:]
        x = torch.randn(4, 64, generator=g)
        y = hf.model.layers[1].self_attn.q_proj(x).float()
    ref = x @ meta_to_hf_qk(ours.llm.layers[1].attention.wq.weight, 4).T
    assert ((y - ref).abs().max() / ref.abs().max()) < 0.01  # q rows permuted right, same ints/scales/zeros
    diff, effect = (a - b).abs().max().item(), (a - fp).abs().max().item()
    assert diff < 0.02 * a.abs().max().item() and diff < 0.1 * effect, (diff, effect)
