"""`lavin-edge chat`: interactive or one-shot chat about an image, streaming, on a merged/quantized model."""

from __future__ import annotations

import sys
from typing import Any

import click

from lavin_edge.commands.options import activations_option, device_option, threads_option
from lavin_edge.demo.paths import DEMO_DESCRIPTION

EPILOG = (DEMO_DESCRIPTION + "\n\nIn the REPL: /image PATH swaps the image, /reset clears the history, /exit "
          "or Ctrl-D quits (exit code 0); Ctrl-C stops an answer, and at the empty prompt quits with exit code 130, "
          "as Ctrl-C ends every lavin-edge command. Answers go to stdout, everything else to stderr. Bad input "
          "(missing or broken image, a model dir from another version, a prompt longer than the context) ends with a "
          "one-line error and exit code 2.")


@click.command(name="chat", epilog=EPILOG)
@activations_option
@device_option
@click.option("--model", "model_dir", default=None, metavar="DIR",
              help="Merged or quantized model dir (default: the built demo model, quantized).")
@click.option("--image", "image", default=None, metavar="PATH", help="Image to talk about (none: text only).")
@click.option("--prompt", "prompt", default=None,
              help="Answer this once and exit (stdout: only the answer). A greedy plain-text answer on a quantized "
                   "model runs without loading PyTorch, for a fast start.")
@click.option("--json", "json_out", is_flag=True, help="One JSON object per answer, for machines.")
@click.option("--stats", "show_stats", is_flag=True,
              help="Print prefill/decode tok/s, time to first token and peak memory (stderr; in the JSON).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1),
              help="Most tokens an answer may have; it also stops where the context ends (said once on stderr when "
                   "this asks for more).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 = off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible answers).")
@click.option("--stop", "stop", multiple=True, help="Stop string (repeatable); not included in the answer.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "kernels", "torch"]),
              help="kernels: the compiled extension; torch: plain PyTorch; auto: kernels when built.")
@click.option("--max-context", default=None, type=click.IntRange(16), help="Cap the context (tokens).")
@click.option("--exact-head", is_flag=True,
              help="Keep the fp32 output layer (kernels backend: it otherwise runs as 4-bit + 4-bit residual).")
@threads_option()
def command(model_dir: str | None, image: str | None, prompt: str | None, json_out: bool, show_stats: bool,
            max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
            seed: int | None, stop: tuple[str, ...], backend: str, max_context: int | None, exact_head: bool,
            threads: int | None, device: str) -> None:
    """Chat with a LaVIN model about an image: an interactive, streaming REPL, or one answer with --prompt.

    Example: lavin-edge chat --image examples/easyvqa-red-triangle.png --prompt "What shape is in the image?"
    """
    if prompt is not None and not prompt.strip():
        raise click.BadParameter("is empty", param_hint="--prompt")
    greedy_text = temperature == 0 and repetition_penalty == 1 and not (json_out or show_stats or exact_head)
    if prompt is not None and greedy_text and backend != "torch" and device == "cpu" and _answered_without_torch(
            model_dir, image, prompt, max_new_tokens, stop, max_context, threads):
        return
    import torch

    from lavin_edge.chat.repl import answer_once, run_repl
    from lavin_edge.chat.session import ChatSession
    from lavin_edge.commands.process import skip_teardown_at_exit
    from lavin_edge.data.image import load_image
    from lavin_edge.demo.build import demo_model_dir
    from lavin_edge.runtime.cuda_engine import engine_for
    from lavin_edge.runtime.sampling import GenerationConfig

    if threads:
        torch.set_num_threads(threads)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           repetition_penalty=repetition_penalty, seed=seed, stop_strings=stop)
    # Bad input (a missing or broken image, a bad model dir, a prompt longer than the context) raises one of the
    # project's ValueErrors or a FileNotFoundError: the CLI's error convention prints one line, exit 2.
    if model_dir is None and image is not None:
        load_image(image)  # a bad image fails now, not after the first-run demo build
    path = model_dir if model_dir is not None else demo_model_dir(build=True)
    engine = engine_for(path, device, max_context, backend=backend, head_w4=False if exact_head else None)
    session = ChatSession(engine, gen)
    if image is not None:
        session.set_image(image)
    _say_budget(session, prompt, max_new_tokens)
    if prompt is not None:
        answer_once(session, prompt, sys.stdout, sys.stderr, json_out, show_stats)
        skip_teardown_at_exit()  # a one-shot answer wrote nothing that needs the interpreter's teardown
        return
    sys.exit(run_repl(session, json_out=json_out, show_stats=show_stats))


def _say_budget(session: Any, prompt: str | None, max_new_tokens: int) -> None:
    """One note on stderr when --max-new-tokens asks for more than the context holds (answers stop there)."""
    from lavin_edge.prompt import budget_note

    ctx = session.engine.max_context
    if prompt is not None:
        note = budget_note(max_new_tokens, len(session.build(prompt)[0]), ctx)
    elif max_new_tokens >= ctx:
        note = (f"--max-new-tokens {max_new_tokens} is more than the model's context of {ctx} tokens: each answer "
                "stops where the context ends")
    else:
        note = None
    if note:
        click.echo(f"note: {note}", err=True)


def _answered_without_torch(model_dir: str | None, image: str | None, prompt: str, max_new_tokens: int,
                            stop: tuple[str, ...], max_context: int | None, threads: int | None) -> bool:
    """A one-shot greedy answer on the engine without PyTorch (lavin_edge.chat.oneshot), when the model (a built
    demo, or a quantized dir) allows it; False: nothing was written, the PyTorch session answers."""
    from lavin_edge.chat.oneshot import answer_without_torch
    from lavin_edge.commands.process import skip_teardown_at_exit
    from lavin_edge.demo.paths import built_demo_dir

    path = model_dir if model_dir is not None else built_demo_dir()
    if path is None:
        return False  # the PyTorch path builds the demo first (or rebuilds a stale one)
    if not answer_without_torch(path, image, prompt, max_new_tokens, stop, max_context, threads, sys.stdout,
                                sys.stderr):
        return False
    skip_teardown_at_exit()
    return True
