"""The CUDA engine (lavin_edge.runtime.cuda_engine) run on CPU tensors, against the reference ``Engine``: logits
within fp16's error, equal greedy tokens (a tiny model; the shipped demo on text and the four example images),
a decode step that compiles as one graph, sampling on the device, and the --device option. Tests marked
``cuda`` run the same engine on a GPU against its CPU run (scripts/gpu_check.sh)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from test_engine import trained_like  # noqa: F401  (test_serve_batch's helper needs it importable)
from test_serve_batch import _requests, quantized_tiny_dir

from lavin_edge.modality import IMAGE, TEXT
from lavin_edge.runtime import Engine
from lavin_edge.runtime.cuda_engine import CudaEngine
from lavin_edge.runtime.device import DeviceError, resolve_device
from lavin_edge.runtime.device_sampling import DeviceSampler
from lavin_edge.runtime.sampling import GenerationConfig, Sampler

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
U16 = 2.0**-11  # fp16's unit roundoff
GPU = torch.cuda.is_available() and resolve_device("auto") == "cuda"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and the extension's CUDA kernels")


def fp16_tolerance(ref: torch.Tensor, n_layers: int) -> float:
    """How far fp16 activations may move logits: each layer rounds its activations to fp16 about four times
    (normed input, q|k|v, attention output, gated FFN input) and the cache once; the errors add at most linearly
    through the layers, relative to the logits' scale (the head's rows are fp16 as well)."""
    return (4 * n_layers + 2) * U16 * float(ref.abs().max())


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized_tiny_dir(tmp_path_factory.mktemp("cuda_engine"))


def _prompt(eng: Engine, image: bool) -> tuple[list[int], int, torch.Tensor | None]:
    tok = eng.tokenizer
    if not image:
        return tok.encode("Instruction: hi there\nResponse:"), -1, None
    img = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(3))
    n_vis = eng.n_visual
    ids = [tok.bos_id] + tok.encode("Image: ") + [tok.pad_id] * n_vis + tok.encode("Instruction: what?\nResponse:")
    return ids, 1 + len(tok.encode("Image: ")), img


@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
def test_logits_match_reference_engine(qdir: Path, image: bool) -> None:
    """Prefill, then decode steps fed the reference's own argmax: every logits row within the fp16 bound, the
    same argmax; then an appended turn (prefill masked over the history) the same."""
    ref, eng = Engine.load(qdir, backend="torch"), CudaEngine.load(qdir, device="cpu")
    ids, pos, img = _prompt(ref, image)
    mod = IMAGE if image else TEXT
    n_layers = ref.cfg.llm.n_layers
    ref.reset(mod)
    eng.reset(mod)
    a = ref.forward(ref.embed_prompt(ids, pos, None if img is None else ref.encode_image(img)))
    b = eng.prefill(eng.embed_prompt(ids, pos, None if img is None else eng.encode_image(img)))
    rows = [(a, b)]
    for _ in range(6):
        t = int(a.argmax())
        a, b = ref.forward(ref.embed[torch.tensor([t])].float()), eng.decode(t)
        rows.append((a, b))
    more = ref.tokenizer.encode("\nInstruction: and then?\nResponse:")
    rows.append((ref.forward(ref.embed_prompt(more)), eng.prefill(eng.embed_prompt(more))))
    assert eng.length == ref.length
    for a, b in rows:
        assert (a - b).abs().max() <= fp16_tolerance(a, n_layers)
        assert int(a.argmax()) == int(b.argmax())


@pytest.mark.parametrize("image", [False, True], ids=["text", "image"])
def test_greedy_tokens_equal_reference_engine(qdir: Path, image: bool) -> None:
    ref, eng = Engine.load(qdir, backend="torch"), CudaEngine.load(qdir, device="cpu")
    ids, pos, img = _prompt(ref, image)
    got = []
    for e in (ref, eng):
        e.reset(IMAGE if image else TEXT)
        vis = None if img is None else e.encode_image(img)
        got.append(e.generate(ids, GenerationConfig(max_new_tokens=24), pos, vis, stop_ids=set()).ids)
    assert got[0] == got[1] and len(got[1]) == 24


class GraphCheck:
    """A ``torch.compile`` backend (aot_eager's, counting): how many graphs were compiled, and which ops in them
    read a device value back to the host (``.item()``, data-dependent shapes): a CUDA graph cannot hold those."""

    HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique")

    def __init__(self) -> None:
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop

        self.frames = 0
        self.host_reads: list[str] = []

        def forward(gm: torch.fx.GraphModule, inputs: list) -> object:
            self.host_reads += [str(n.target) for n in gm.graph.nodes
                                if n.op == "call_function" and any(h in str(n.target) for h in self.HOST_READS)]
            return boxed_nop(gm, inputs)

        self.inner = aot_autograd(fw_compiler=forward)

    def __call__(self, gm: torch.fx.GraphModule, inputs: list) -> object:
        self.frames += 1
        return self.inner(gm, inputs)


def test_decode_step_compiles_as_one_graph(qdir: Path, torch_compile_on: None) -> None:
    """``torch.compile(fullgraph=True)`` of the decode step (aot_eager): no graph break, no op reading a device
    value back to Python (an ``.item()`` position), one graph for every position (a Python-int position would
    be a guard, recompiling at the next token); the compiled step gives the eager step's logits. The two
    controls show the check catches an ``.item()`` position and a Python-int one."""
    eng = CudaEngine.load(qdir, device="cpu")
    eng.reset(TEXT)
    eng.prefill(eng.embed_prompt(eng.tokenizer.encode("Instruction: hi\nResponse:")))
    st = eng.state

    def run(fn, n: int) -> list[torch.Tensor]:
        out = []
        with torch.inference_mode():
            for p in range(eng.length, eng.length + n):
                st.pos.fill_(p)
                st.tok.fill_(40 + p)
                out.append(fn(256))
                eng.length += 1  # what decode() does after each step
            eng.length -= n
        return out

    def compiled(fn, n: int) -> tuple[GraphCheck, list[torch.Tensor]]:
        torch._dynamo.reset()
        check = GraphCheck()
        out = run(torch.compile(fn, fullgraph=True, backend=check), n)
        torch._dynamo.reset()
        return check, out

    eager = run(eng.decode_step, 3)
    check, got = compiled(eng.decode_step, 3)
    assert check.frames == 1 and check.host_reads == []
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def item_position(span: int) -> torch.Tensor:  # control: the position read back to Python
        return eng.decode_step(span)[:, : int(st.pos[0].item()) + 1]

    def python_position(span: int) -> torch.Tensor:  # control: a Python-int position, changing per token
        return eng.decode_step(span)[:, : eng.length + 1]

    try:  # PyTorch either refuses the data-dependent slice or compiles a host read into the graph
        assert compiled(item_position, 2)[0].host_reads
    except torch._dynamo.exc.TorchDynamoException:
        pass
    assert compiled(python_position, 2)[0].frames == 2


def test_device_sampler_keeps_what_the_cpu_sampler_keeps() -> None:
    """Greedy is the argmax; top-k / top-p draws only tokens ``Sampler.process`` keeps, the top token most often;
    the repetition penalty follows CTRL's rule; a seed reproduces the draws."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=g)
    logits[0, 7] = 5.0  # a clear top token, the rest spread
    assert int(DeviceSampler(GenerationConfig(), 500, torch.device("cpu"))(logits)) == int(logits.argmax())
    for cfg in (GenerationConfig(temperature=0.8, top_k=5), GenerationConfig(temperature=1.0, top_p=0.5),
                GenerationConfig(temperature=1.5, top_k=40, top_p=0.9, seed=1)):
        keep = set(torch.isfinite(Sampler(cfg, 500).process(logits[0])).nonzero()[:, 0].tolist())
        s = DeviceSampler(GenerationConfig(**{**cfg.__dict__, "seed": 7}), 500, torch.device("cpu"))
        drawn = [int(s(logits)) for _ in range(300)]
        assert set(drawn) <= keep and len(set(drawn)) > 1
        assert max(set(drawn), key=drawn.count) == int(logits.argmax())
        again = DeviceSampler(GenerationConfig(**{**cfg.__dict__, "seed": 7}), 500, torch.device("cpu"))
        assert [int(again(logits)) for _ in range(300)] == drawn
    pen = GenerationConfig(repetition_penalty=1.3)
    s = DeviceSampler(pen, 500, torch.device("cpu"))
    top = int(logits.argmax())
    s.observe([top])
    want = Sampler(pen, 500)
    want.observe([top])
    assert int(s(logits)) == int(want.process(logits[0]).argmax())


def test_device_option_without_gpu(tmp_path: Path) -> None:
    """Here (no GPU): auto is the CPU, cuda is one error line and exit 2 from chat, bench chat, serve and eval."""
    if GPU:
        pytest.skip("a GPU is present")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="--device cuda"):
        resolve_device("cuda")
    from lavin_edge.bench.child import module_command

    for args in (["chat", "--device", "cuda", "--prompt", "hi", "--model", str(tmp_path)],
                 ["bench", "chat", "--device", "cuda"], ["serve", "--device", "cuda"],
                 ["eval", "--device", "cuda", str(tmp_path), "--data", "easy-vqa"]):
        # The package these tests imported (installed, with its extension), not the checkout's source tree.
        res = subprocess.run(module_command("lavin_edge.cli", *args), capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and ("GPU" in lines[0] or "CUDA" in lines[0]), lines


def test_batch_rows_decode_as_alone(qdir: Path) -> None:
    """Serve's path (``CudaBatchDecoder``): two text requests and an image one, of different lengths, joining a
    3-slot batch at different steps and leaving it when done, decode the greedy tokens each decodes alone
    (``CudaEngine.generate``); the same ids as text and as image give different rows (per-row modality)."""
    from lavin_edge.runtime.cuda_batch import CudaBatchDecoder

    alone = CudaEngine.load(qdir, device="cpu")
    reqs = _requests(alone)
    want = []
    for ids, mod, pos, vis in reqs:
        alone.reset(mod)
        want.append(alone.generate(ids, GenerationConfig(max_new_tokens=10), pos, vis, stop_ids=set()).ids)
    dec = CudaBatchDecoder(CudaEngine.load(qdir, device="cpu", slots=3))
    toks: dict[int, list[int]] = {}

    def start(slot: int) -> None:
        toks[slot] = [int(dec.prefill(slot, *reqs[slot]).argmax())]

    def step() -> None:
        rows = [s for s in toks if len(toks[s]) < 10]
        for s, row in zip(rows, dec.step(rows, [toks[s][-1] for s in rows]), strict=True):
            toks[s].append(int(row.argmax()))

    start(0)
    for _ in range(3):
        step()
    start(2)
    step()
    start(1)
    while any(len(t) < 10 for t in toks.values()):
        step()
    assert [toks[s] for s in range(3)] == want
    ids = reqs[0][0]
    dec.prefill(0, ids, TEXT)
    dec.prefill(1, ids, IMAGE)
    rows = dec.step([0, 1], [5, 5])
    assert not torch.allclose(rows[0], rows[1])
    with pytest.raises(ValueError, match="distinct"):
        dec.step([0, 0], [1, 2])


def test_serve_on_the_cuda_engine(qdir: Path) -> None:
    """`serve`'s app over the CUDA engine (CPU tensors here): concurrent greedy requests, text and image, on 3
    slots answer as each does alone, and a plain one as ``CudaEngine.generate``."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import LiveServer, png_data_url

    from lavin_edge.prompt import conversation_ids
    from lavin_edge.serve.server import ServeOptions, build_app

    eng = CudaEngine.load(qdir, device="cpu")
    ids, _ = conversation_ids(eng.tokenizer, [], "What shape is it?")
    want = eng.generate(ids, GenerationConfig(max_new_tokens=12), stop_ids=set()).text
    app, scheduler = build_app(CudaEngine.load(qdir, device="cpu", slots=3), "tiny", ServeOptions(slots=3))
    assert not scheduler.overlap_prefill

    def ask(i: int) -> str:
        content: list = [{"type": "text", "text": f"question number {i}?"}]
        if i % 2:
            content.append({"type": "image_url", "image_url": {"url": png_data_url((40 * i, 0, 0))}})
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8 + i, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with LiveServer(app) as server:
        url = server.url
        body = {"messages": [{"role": "user", "content": "What shape is it?"}], "max_tokens": 12, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        assert r["choices"][0]["message"]["content"] == want
        alone = [ask(i) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(ask, range(4))) == alone


def test_bench_row_on_cpu_tensors(qdir: Path) -> None:
    """`bench chat --device cuda`'s row, run on CPU tensors (the GPU run is scripts/gpu_check.sh's): its figures are
    filled and the run agrees with itself."""
    from lavin_edge.bench.chat_cuda import demo_row, random_row

    row = demo_row(str(qdir), 8, "what?", str(ROOT / "examples" / "easyvqa-red-triangle.png"), 10.0, device="cpu")
    assert row["new_tokens"] == 8 and row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
    assert row["tokens_equal_cpu_run"] and row["agreement"] == 1.0 and row["pct_of_roofline"] > 0
    rnd = random_row("tiny", 2, 32, 6, 5, 10.0, device="cpu")  # tied head: the embedding table, as the demo's
    assert rnd["new_tokens"] == 6 and rnd["prompt_tokens"] == 5 and rnd["decode_tok_s"] > 0


# ----------------------------------------------------------------------------------------------- the demo

DEMO_CASES = [(None, "What is the capital of France?"),
              ("easyvqa-red-triangle.png", "What shape is in the image?"),
              ("easyvqa-yellow-rectangle.png", "Is there not a yellow shape?"),
              ("easyvqa-brown-circle.png", "What color is the shape?"),
              ("easyvqa-black-rectangle.png", "Is there a circle?")]


def _demo_answers(eng: Engine | CudaEngine, n_tokens: int) -> list[list[int]]:
    from lavin_edge.data.image import load_image
    from lavin_edge.prompt import conversation_ids

    out = []
    for image, question in DEMO_CASES:
        vis = None if image is None else eng.encode_image(load_image(ROOT / "examples" / image,
                                                                     eng.cfg.vision.image_size))
        ids, pos = conversation_ids(eng.tokenizer, [], question, 0 if vis is None else vis.shape[0])
        eng.reset(TEXT if vis is None else IMAGE)
        # No stop ids: all n tokens, past the end of the answer too (off the training distribution).
        out.append(eng.generate(ids, GenerationConfig(max_new_tokens=n_tokens), pos, vis, stop_ids=set()).ids)
    return out


def test_demo_greedy_tokens_equal_reference_engine(demo_first_chat: subprocess.CompletedProcess[str],
                                                   demo_env: dict[str, str]) -> None:
    """The shipped demo (4-bit), text and the four example images, 32 tokens each: the CUDA engine on CPU
    tensors gives the reference engine's tokens (the demo is built once per session, tests/conftest.py)."""
    assert demo_first_chat.returncode == 0, demo_first_chat.stderr[-2000:]
    qdir = Path(demo_env["LAVIN_EDGE_DEMO_DIR"]) / "quantized"
    want = _demo_answers(Engine.load(qdir, backend="torch", max_context=512), 32)
    got = _demo_answers(CudaEngine.load(qdir, device="cpu", max_context=512), 32)
    assert got == want


@pytest.mark.cuda
@needs_gpu
def test_cuda_tokens_equal_cpu_run(qdir: Path) -> None:
    """On a GPU: the kernels' greedy tokens equal the same engine's on CPU tensors (tiny model, text and image),
    with the decode step replayed from CUDA graphs and without them."""
    for image in (False, True):
        got = []
        for device, graphs in (("cpu", False), ("cuda", True), ("cuda", False)):
            eng = CudaEngine.load(qdir, device=device, graphs=graphs)
            ids, pos, img = _prompt(eng, image)
            eng.reset(IMAGE if image else TEXT)
            vis = None if img is None else eng.encode_image(img)
            got.append(eng.generate(ids, GenerationConfig(max_new_tokens=24), pos, vis, stop_ids=set()).ids)
        assert got[0] == got[1] == got[2], image


@pytest.mark.cuda
@needs_gpu
def test_cuda_demo_tokens_equal_cpu_run() -> None:
    """On a GPU, the demo (when built: $LAVIN_EDGE_DEMO_DIR or the cache): CUDA tokens equal the CPU run's."""
    from lavin_edge.demo.build import demo_model_dir
    from lavin_edge.demo.paths import DemoModelMissing

    try:
        qdir = demo_model_dir()
    except DemoModelMissing:
        pytest.skip("demo model not built")
    want = _demo_answers(CudaEngine.load(qdir, device="cpu", max_context=512), 32)
    got = _demo_answers(CudaEngine.load(qdir, device="cuda", max_context=512), 32)
    assert got == want
