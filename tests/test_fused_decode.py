"""The one-call native decode step (lavin_edge.runtime.native_decode, csrc/decode.cpp) against the engine's per-op
PyTorch loop (``Engine.decode_step_reference``, what runs with ``native_decode = None``), its reference.

Both paths quantize activations to int8 before each W4 GEMV, so a last-bit difference upstream (the attention
sums run in a different order than SDPA's) can move one activation across a rounding boundary. Measured
on the tiny model: without such a flip the two agree to ~2e-7 relative; a flip gives ~3e-3 (the same as
perturbing the reference's own input by 1e-6); swapping the modality gives 0.6. The bound of 2e-2 allows
flips and nothing more: a wrong rotary, GQA mapping, cache slot, modality or SwiGLU half changes the logits
at the scale of the logits themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import quantize_tiny_dir
from test_engine import trained_like

from lavin_edge.config import preset
from lavin_edge.kernels.dispatch import CPU_BACKENDS
from lavin_edge.modality import IMAGE, TEXT
from lavin_edge.model.lavin import LaVIN
from lavin_edge.runtime import Engine

pytestmark = pytest.mark.skipif(
    __import__("lavin_edge.kernels", fromlist=["extension"]).extension() is None, reason="lavin_edge._C not built")


def _model(vocab: int | None = None, dim: int | None = None, seed: int = 0, heads: tuple[int, int] | None = None
           ) -> LaVIN:
    """A tiny LaVIN (GQA: 4 query heads on 2 kv heads, or ``heads`` = (query, kv)) with random non-zero
    adapters."""
    cfg = preset("tiny", "tiny")
    if vocab is not None:
        cfg.llm.vocab_size = vocab
    if dim is not None:
        cfg.llm.dim, cfg.llm.ffn_dim, cfg.llm.max_seq_len = dim, 2 * dim, 1200
    if heads is not None:
        cfg.llm.n_heads, cfg.llm.n_kv_heads = heads
    return trained_like(seed, cfg=cfg)


def _quantized_dir(model: LaVIN, root: Path, act_order: bool) -> Path:
    """GPTQ-packed LLM linears. ``act_order``: GPTQ with desc_act on a different random Hessian per linear, so
    q, k and v carry different permutations and the engine keeps them as separate parts (``ConcatLinear``)."""
    from lavin_edge.quantize.gptq import QuantResult, gptq_quantize

    g = torch.Generator().manual_seed(1)

    def gptq_random_hessian(w: torch.Tensor) -> QuantResult:
        x = torch.randn(4 * w.shape[1], w.shape[1], generator=g) * torch.rand(w.shape[1], generator=g) * 3
        return gptq_quantize(w, 2 * x.T @ x / x.shape[0], 4, 32, True, desc_act=True)

    return quantize_tiny_dir(model, root, gptq_random_hessian if act_order else None, desc_act=act_order)


def _teacher_forced(eng: Engine, fused: bool, prompt: torch.Tensor, tokens: list[int], modality: int
                    ) -> torch.Tensor:
    keep = eng.native_decode
    eng.native_decode = keep if fused else None
    try:
        eng.reset(modality)
        eng.forward(prompt)
        return torch.stack([eng.forward(eng.embed[torch.tensor([t])].float()) for t in tokens])
    finally:
        eng.native_decode = keep


def _compare(eng: Engine, n_prompt: int, n_steps: int, modality: int, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    vocab = eng.embed.shape[0]
    prompt = eng.embed[torch.randint(0, vocab, (n_prompt,), generator=g)].float()
    tokens = torch.randint(0, vocab, (n_steps,), generator=g).tolist()
    ref = _teacher_forced(eng, False, prompt, tokens, modality)
    got = _teacher_forced(eng, True, prompt, tokens, modality)
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return rel, agree


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _quantized_dir(_model(), tmp_path_factory.mktemp("fd_plain"), act_order=False)


@pytest.fixture(scope="module")
def act_order_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # vocab 264: a multiple of 8, so the engine packs the tied head as two W4 passes (``SumLinear``, re-scored).
    return _quantized_dir(_model(vocab=264, seed=1), tmp_path_factory.mktemp("fd_act"), act_order=True)


@pytest.mark.parametrize("modality", [TEXT, IMAGE])
def test_fused_step_matches_reference_loop(plain_dir: Path, modality: int) -> None:
    eng = Engine.load(plain_dir, backend="kernels")
    fd = eng.native_decode
    assert fd is not None
    assert fd.head is not None  # vocab 259 cannot be packed: the fp head runs after the native layers
    rel, agree = _compare(eng, 9, 24, modality)
    assert rel < 2e-2, rel
    assert agree >= 0.9, agree


def test_fused_step_with_act_order_parts_and_w4_head(act_order_dir: Path) -> None:
    eng = Engine.load(act_order_dir, backend="kernels")
    from lavin_edge.runtime.ops import ConcatLinear, RescoredHead, SumLinear

    assert isinstance(eng.layers[0].wqkv, ConcatLinear) and isinstance(eng.lm_head, RescoredHead)
    assert isinstance(eng.lm_head.approx, SumLinear)
    # The W4 head and its exact re-scoring of the top logits run inside the native step.
    assert eng.native_decode is not None and eng.native_decode.head is None
    rel, agree = _compare(eng, 5, 24, IMAGE, seed=3)
    assert rel < 2e-2, rel
    assert agree >= 0.9, agree


def _native_vs_python_head(eng: Engine, n_prompt: int, n_steps: int, seed: int) -> None:
    """The stack's head (two W4 passes + top-8 re-scoring in fp64) against the same stack stopping at the final
    norm with ``RescoredHead`` applied in Python: bitwise equal logits, text and image."""
    from lavin_edge.runtime.native_decode import build_native_decode

    native = eng.native_decode
    assert native is not None and native.head is None
    python_head = build_native_decode(eng, eng.backend_impl.isa, native_head=False)
    assert python_head is not None and python_head.head is eng.lm_head
    g = torch.Generator().manual_seed(seed)
    vocab = eng.embed.shape[0]
    for modality in (TEXT, IMAGE):
        eng.reset(modality)
        eng.forward(eng.embed[torch.randint(0, vocab, (n_prompt,), generator=g)].float())
        for t in torch.randint(0, vocab, (n_steps,), generator=g).tolist():
            h = eng.embed[torch.tensor([t])].float()
            # Both write the same k/v at this position; the engine's step runs last and advances the length.
            want = python_head.step(h, eng.length, modality)
            got = eng.forward(h)
            assert torch.equal(got, want)


def test_native_head_equals_python_rescored_head(act_order_dir: Path) -> None:
    _native_vs_python_head(Engine.load(act_order_dir, backend="kernels"), 5, 12, seed=5)


def test_native_head_equals_python_rescored_head_demo() -> None:
    """The same on the demo (SmolLM2's 49152-row tied head), when it is built."""
    from lavin_edge.demo.build import demo_model_dir
    from lavin_edge.demo.paths import DemoModelMissing

    try:
        qdir = demo_model_dir()
    except DemoModelMissing as e:
        pytest.skip(str(e))
    _native_vs_python_head(Engine.load(qdir, backend="kernels", max_context=64), 7, 16, seed=6)


def test_fused_step_long_context_parallel_heads(tmp_path: Path) -> None:
    """A cache long enough that the native attention splits heads over threads (end x heads x hd >= 2^18)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # before loading: the stack takes its thread count at build time
    try:
        eng = Engine.load(_quantized_dir(_model(dim=256, seed=2), tmp_path, act_order=False), backend="kernels")
        assert eng.native_decode is not None
        rel, agree = _compare(eng, 1030, 4, TEXT, seed=4)
    finally:
        torch.set_num_threads(threads)
    assert rel < 2e-2, rel
    assert agree >= 0.9, agree


@pytest.mark.parametrize(("dim", "heads"), [(96, (4, 2)), (128, (4, 1)), (256, (2, 2))],
                         ids=["hd24-plain-loops", "hd32-group4", "hd128"])
def test_fused_step_attention_head_sizes(tmp_path: Path, dim: int, heads: tuple[int, int]) -> None:
    """The native attention's register-blocked paths (head sizes 16..128 in steps of 16; the tiny model's 16 and
    the demo's 64 run in the tests above) and its plain loops (any other size) against the reference."""
    eng = Engine.load(_quantized_dir(_model(dim=dim, seed=3, heads=heads), tmp_path, act_order=False),
                      backend="kernels")
    assert eng.native_decode is not None
    assert eng.hd == dim // heads[0]
    rel, agree = _compare(eng, 70, 4, IMAGE, seed=5)
    assert rel < 2e-2, rel
    assert agree >= 0.9, agree


@pytest.mark.parametrize("isa", [b for b in CPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("dim", [64, 96], ids=["hd16", "hd24"])
def test_fused_step_each_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isa: str, dim: int) -> None:
    """Every CPU backend's step (its own W4, adapter and attention builds: the attention of the scalar backend
    converts the fp16 cache with integer vector ops, the others with F16C or NEON's fcvtl) against the reference,
    on the register-blocked attention (hd 16) and the plain loops (hd 24)."""
    from lavin_edge.kernels.dispatch import available_backends

    if isa not in available_backends():
        pytest.skip(f"{isa}: not built for this architecture or not supported by this CPU")
    monkeypatch.setenv("LAVIN_EDGE_KERNELS", isa)
    eng = Engine.load(_quantized_dir(_model(dim=dim, seed=4), tmp_path, act_order=False), backend="kernels")
    assert eng.native_decode is not None and eng.backend_impl.isa == isa
    rel, agree = _compare(eng, 60, 4, IMAGE, seed=6)
    assert rel < 2e-2, rel
    assert agree >= 0.9, agree


def test_greedy_generation_identical_tokens(plain_dir: Path) -> None:
    """End to end through generate(): the fused path produces the reference's tokens."""
    from lavin_edge.runtime.sampling import GenerationConfig

    eng = Engine.load(plain_dir, backend="kernels")
    ids = list(range(40, 60))
    out = []
    for fused in (False, True):
        keep = eng.native_decode
        eng.native_decode = keep if fused else None
        eng.reset(TEXT)
        out.append(eng.generate(ids, GenerationConfig(max_new_tokens=16), stop_ids=set()).ids)
        eng.native_decode = keep
    assert out[0] == out[1]
    assert len(out[0]) == 16


def _stepped(eng: Engine, h: torch.Tensor) -> torch.Tensor:
    """The logits after h's last row, h fed one position at a time through the native step."""
    for i in range(h.shape[0]):
        logits = eng.forward(h[i:i + 1])
    return logits


@pytest.mark.parametrize("modality", [TEXT, IMAGE])
def test_native_prefill_is_the_native_step_token_by_token(act_order_dir: Path, modality: int) -> None:
    """One native prefill call (chunks of 64 rows, the W4 head and its re-scoring on the last row) gives bitwise
    the logits and the cache of feeding the prompt one position at a time; so does a turn appended after
    cached history (start > 0), across a chunk boundary."""
    eng = Engine.load(act_order_dir, backend="kernels")
    assert eng.native_decode is not None and eng.native_decode.head is None
    g = torch.Generator().manual_seed(7)
    h = eng.embed[torch.randint(0, eng.embed.shape[0], (150,), generator=g)].float()
    eng.reset(modality)
    whole = eng.forward(h)
    assert eng.length == 150
    cache = [(k[0, :, :150].clone(), v[0, :, :150].clone()) for k, v in eng.kv_cache]
    eng.reset(modality)
    assert torch.equal(_stepped(eng, h), whole)
    assert all(torch.equal(k[0, :, :150], ck) and torch.equal(v[0, :, :150], cv)
               for (k, v), (ck, cv) in zip(eng.kv_cache, cache, strict=True))
    eng.reset(modality)
    eng.forward(h[:30])
    assert torch.equal(eng.forward(h[30:]), whole)  # 120 positions after 30 cached: rows 30..93, 94..149


def test_native_prefill_matches_reference_prefill(plain_dir: Path) -> None:
    """The native prefill against the engine's PyTorch prefill (its reference), text and image, fresh and
    appended: the same bound as the step's (module docstring) and the same next token."""
    eng = Engine.load(plain_dir, backend="kernels")
    g = torch.Generator().manual_seed(8)
    h = eng.embed[torch.randint(0, eng.embed.shape[0], (90,), generator=g)].float()
    for modality in (TEXT, IMAGE):
        for start in (0, 20):
            got, want = [], []
            for out, run in ((got, eng.forward), (want, eng.prefill_reference)):
                eng.reset(modality)
                if start:
                    eng.forward(h[:start])
                out.append(run(h[start:]))
            rel = ((got[0] - want[0]).norm() / want[0].norm()).item()
            assert rel < 2e-2, (modality, start, rel)
            assert got[0].argmax() == want[0].argmax()


def test_torch_backend_has_no_fused_step(plain_dir: Path) -> None:
    assert Engine.load(plain_dir, backend="torch").native_decode is None


def test_stack_rejects_mismatched_shapes(plain_dir: Path) -> None:
    """The native stack checks every part against the model's sizes and every step's position."""
    from lavin_edge.kernels.decode import new_decode_stack
    from lavin_edge.runtime.native_decode import norm_args, op_parts

    eng = Engine.load(plain_dir, backend="kernels")
    lyr, keep = eng.layers[0], []
    rope = torch.view_as_real(eng.rope).contiguous()
    stack = new_decode_stack(eng.backend_impl.isa, eng.dim, eng.n_heads, eng.n_kv, eng.hd, lyr.w13.n_out // 2,
                             eng.max_context, eng.dim, eng.norm.eps, rope, 1)
    norms = (norm_args(lyr.attn_in, keep), norm_args(lyr.ffn_norm, keep))
    wqkv, wo, w13, w2 = (op_parts(op, keep) for op in (lyr.wqkv, lyr.wo, lyr.w13, lyr.w2))
    caches = (eng.kv_cache[0][0].data_ptr(), eng.kv_cache[0][1].data_ptr())
    with pytest.raises(ValueError, match="decode wo"):
        stack.add_layer(*norms, wqkv, w13, w13, w2, *caches)  # w13 where wo belongs
    with pytest.raises(ValueError, match="decode wqkv: parts do not cover"):
        stack.add_layer(*norms, wo, wo, w13, w2, *caches)  # [D -> D] where [D -> (h + 2 kv) hd] belongs
    with pytest.raises(ValueError, match="no parts"):
        stack.add_layer(*norms, [], wo, w13, w2, *caches)
    other_eps = new_decode_stack(eng.backend_impl.isa, eng.dim, eng.n_heads, eng.n_kv, eng.hd, lyr.w13.n_out // 2,
                                 eng.max_context, eng.dim, 2 * eng.norm.eps, rope, 1)
    with pytest.raises(ValueError, match="eps"):
        other_eps.add_layer(*norms, wqkv, wo, w13, w2, *caches)
    stack.add_layer(*norms, wqkv, wo, w13, w2, *caches)
    x, out = torch.zeros(eng.dim), torch.zeros(eng.dim)
    with pytest.raises(ValueError, match="set_head"):
        stack.step(x.data_ptr(), 0, 0, out.data_ptr())
    stack.set_head(norm_args(eng.norm, keep), [])
    with pytest.raises(ValueError, match="outside the cache"):
        stack.step(x.data_ptr(), eng.max_context, 0, out.data_ptr())
    with pytest.raises(ValueError, match="modality"):
        stack.step(x.data_ptr(), 0, 2, out.data_ptr())
    stack.step(x.data_ptr(), 0, 0, out.data_ptr())
    assert stack.n_layers == 1
    # A one-slot stack: step_rows checks its rows' count, slots, positions and modalities.
    slot, pos, mod = (torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                      torch.zeros(2, dtype=torch.int32))
    args = (slot.data_ptr(), pos.data_ptr(), mod.data_ptr(), out.data_ptr())
    with pytest.raises(ValueError, match="rows must be"):
        stack.step_rows(x.data_ptr(), 2, *args)
    slot[0] = 1
    with pytest.raises(ValueError, match="slot outside"):
        stack.step_rows(x.data_ptr(), 1, *args)
    slot[0], pos[0] = 0, eng.max_context
    with pytest.raises(ValueError, match="outside the cache"):
        stack.step_rows(x.data_ptr(), 1, *args)
    pos[0], mod[0] = 0, 2
    with pytest.raises(ValueError, match="modality"):
        stack.step_rows(x.data_ptr(), 1, *args)
    mod[0] = 1
    stack.step_rows(x.data_ptr(), 1, *args)
    # prefill: at least one position, all inside the cache, a slot the stack has.
    xs = torch.zeros(3, eng.dim)
    with pytest.raises(ValueError, match="at least one"):
        stack.prefill(xs.data_ptr(), 0, 0, 0, 0, out.data_ptr())
    with pytest.raises(ValueError, match="outside the cache"):
        stack.prefill(xs.data_ptr(), 3, 0, eng.max_context - 2, 0, out.data_ptr())
    with pytest.raises(ValueError, match="slot outside"):
        stack.prefill(xs.data_ptr(), 3, 1, 0, 0, out.data_ptr())
    with pytest.raises(ValueError, match="modality"):
        stack.prefill(xs.data_ptr(), 3, 0, 0, 2, out.data_ptr())
    stack.prefill(xs.data_ptr(), 3, 0, eng.max_context - 3, 1, out.data_ptr())
    with pytest.raises(ValueError, match="rescore"):
        stack.set_head(norm_args(eng.norm, keep), op_parts(eng.layers[0].wo, keep), eng.embed.data_ptr(),
                       "float64", eng.embed.numel(), 8)


def test_cache_rounding_is_numpy_half() -> None:
    """The native step's fp32 -> fp16 rounding of keys and values (csrc/kernels.h float_to_half) gives NumPy's (and
    torch's) bits: round to nearest even across normals, subnormals, ties, the overflow edge, inf and nan."""
    import numpy as np

    from lavin_edge.kernels import extension

    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e9, np.inf, -np.inf, np.nan,
                        2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 6.1e-5, 1e-45,
                        1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 2048.0 + 1.0, 2048.0 + 3.0], dtype=np.float32)
    wide = (rng.standard_normal(200_000) * 2.0 ** rng.uniform(-30, 18, 200_000)).astype(np.float32)
    # Exact ties: halfway between two fp16 neighbours at many exponents.
    ties = (np.arange(1, 2049, dtype=np.float32) + 0.5) * np.float32(2.0) ** rng.integers(-24, 5, 2048)
    x = np.ascontiguousarray(np.concatenate([special, wide, ties.astype(np.float32)]))
    got = np.empty(x.size, dtype=np.uint16)
    extension().float_to_half(x.ctypes.data, got.ctypes.data, x.size)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()
