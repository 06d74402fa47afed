"""Strict state-dict checks shared by every checkpoint loader.

Why strict: a checkpoint that loads "mostly" gives a model that runs and produces fluent nonsense,
which costs hours to trace back. So a missing tensor, an unknown tensor or a shape mismatch is an
error that names the tensor, the expected shape and the shape found. The only exceptions are the
ones the caller lists explicitly (trainable parts that base checkpoints never hold, and buffers
known to be derived data such as rotary ``inv_freq``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lavin_edge.config import LlamaConfig, VisionConfig

# Trainable parts of lavin-edge that no base checkpoint holds (docs/method.md).
DEFAULT_ALLOW_MISSING: tuple[str, ...] = ("adapter", "adapters")


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into (missing/unexpected/mis-shaped tensor)."""


def _matches(key: str, patterns: Iterable[str]) -> bool:
    """True when ``key`` contains one of ``patterns`` as a run of whole dotted components.

    ``"adapter"`` matches ``layers.3.adapter.down.weight`` and ``adapter.up_b.weight`` but not
    ``my_adapterx.weight``: matching on whole components keeps the allowance from leaking.
    """
    k = f".{key}."
    return any(f".{p}." in k for p in patterns)


def check_state_dict(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    found: Mapping[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = DEFAULT_ALLOW_MISSING,
    ignore_unexpected: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Compare tensor names and shapes of ``found`` against ``expected``; raise CheckpointError on any
    difference not covered by ``allow_missing`` / ``ignore_unexpected`` (dotted-component patterns).

    All problems are collected first so one run shows everything that is wrong.
    """
    allow_missing = tuple(allow_missing)
    ignore_unexpected = tuple(ignore_unexpected)
    problems: list[str] = []
    for name, shape in expected.items():
        if name not in found:
            if not _matches(name, allow_missing):
                problems.append(f"missing tensor {name!r} (expected shape {tuple(shape)})")
            continue
        got = tuple(found[name].shape)
        if got != tuple(shape):
            problems.append(f"tensor {name!r}: expected shape {tuple(shape)}, found {got}")
    for name in found:
        if name not in expected and not _matches(name, ignore_unexpected):
            problems.append(f"unexpected tensor {name!r} with shape {tuple(found[name].shape)}")
    if problems:
        head = f"{source}: {len(problems)} problem(s):\n  "
        raise CheckpointError(head + "\n  ".join(problems[:40]) + ("\n  ..." if len(problems) > 40 else ""))


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every persistent tensor of ``module`` (what ``state_dict()`` holds)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    allow_missing_prefixes: Iterable[str] = DEFAULT_ALLOW_MISSING,
    ignore_unexpected: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module`` after a strict name/shape check.

    Tensors whose name contains one of ``allow_missing_prefixes`` (dotted components, e.g.
    ``"adapter"``) may be absent and keep their current values; every other parameter and
    persistent buffer must be present with the right shape. Values are cast to each parameter's dtype.
    """
    check_state_dict(
        expected_shapes(module), state_dict,
        allow_missing=allow_missing_prefixes, ignore_unexpected=ignore_unexpected, source=source,
    )
    wanted = {k: v for k, v in state_dict.items() if not _matches(k, tuple(ignore_unexpected))}
    # strict=False only because allowed-missing names were checked above; nothing else can be absent.
    result = module.load_state_dict(wanted, strict=False)
    if result.unexpected_keys:  # pragma: no cover - excluded by check_state_dict
        raise CheckpointError(f"{source}: unexpected tensors {result.unexpected_keys}")


def llama_expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Base (non-adapter) tensor shapes of a LLaMA in the Meta naming contract."""
    hd = cfg.dim // cfg.n_heads
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        out[p + "attention_norm.weight"] = (cfg.dim,)
        out[p + "attention.wq.weight"] = (cfg.n_heads * hd, cfg.dim)
        out[p + "attention.wk.weight"] = (cfg.n_kv_heads * hd, cfg.dim)
        out[p + "attention.wv.weight"] = (cfg.n_kv_heads * hd, cfg.dim)
        out[p + "attention.wo.weight"] = (cfg.dim, cfg.n_heads * hd)
        out[p + "ffn_norm.weight"] = (cfg.dim,)
        out[p + "feed_forward.w1.weight"] = (cfg.ffn_dim, cfg.dim)
        out[p + "feed_forward.w2.weight"] = (cfg.dim, cfg.ffn_dim)
        out[p + "feed_forward.w3.weight"] = (cfg.ffn_dim, cfg.dim)
    out["norm.weight"] = (cfg.dim,)
    if not cfg.tie_embeddings:
        out["output.weight"] = (cfg.vocab_size, cfg.dim)
    return out


def clip_expected_shapes(cfg: VisionConfig, embed_dim: int | None) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an OpenAI CLIP ViT visual tower (without the ``visual.`` prefix).

    ``embed_dim`` is the width of CLIP's output projection ``proj``; None when the checkpoint has none
    (HF ``CLIPVisionModel``), in which case ``proj`` is not expected.
    """
    w = cfg.width
    grid = cfg.image_size // cfg.patch_size
    out: dict[str, tuple[int, ...]] = {
        "conv1.weight": (w, 3, cfg.patch_size, cfg.patch_size),
        "class_embedding": (w,),
        "positional_embedding": (grid * grid + 1, w),
        "ln_pre.weight": (w,),
        "ln_pre.bias": (w,),
    }
    for j in range(cfg.layers):
        p = f"transformer.resblocks.{j}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"] = (w,)
            out[p + ln + ".bias"] = (w,)
        out[p + "attn.in_proj_weight"] = (3 * w, w)
        out[p + "attn.in_proj_bias"] = (3 * w,)
        out[p + "attn.out_proj.weight"] = (w, w)
        out[p + "attn.out_proj.bias"] = (w,)
        out[p + "mlp.c_fc.weight"] = (4 * w, w)
        out[p + "mlp.c_fc.bias"] = (4 * w,)
        out[p + "mlp.c_proj.weight"] = (w, 4 * w)
        out[p + "mlp.c_proj.bias"] = (w,)
    out["ln_post.weight"] = (w,)
    out["ln_post.bias"] = (w,)
    if embed_dim is not None:
        out["proj"] = (w, embed_dim)
    return out
