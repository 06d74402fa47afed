"""The interactive loop: streamed answers on stdout, prompts and notices on stderr (so stdout stays the
conversation's answers only and the REPL can be scripted through a pipe).

Commands: ``/image PATH`` swaps the image, ``/reset`` clears the history, ``/exit`` (or end of input) quits
with exit code 0; Ctrl-C at the prompt quits with 130, Ctrl-C during an answer stops that answer.
With ``json_out`` every answer is one JSON line instead of streamed text.

Input: on a terminal, lines are read through readline (arrow keys edit the line, up/down recall earlier
questions); from a pipe or a file, one question per line until the end; a closed stdin (``<&-``) is an empty
input (exit 0).
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from typing import TextIO

from lavin_edge.chat.session import ChatSession
from lavin_edge.runtime import ContextError, GenerationResult

EXIT_INTERRUPTED = 130  # lavin_edge.cli's code for Ctrl-C (the CLI layer sits above this one)
HELP = "commands: /image PATH (a new image starts a new conversation), /reset (clear the history), /exit"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def stats_line(result: GenerationResult) -> str:
    s = result.stats
    return (f"[stats] prompt {s.prompt_tokens} tok, prefill {s.prefill_tok_s:.1f} tok/s, "
            f"decode {s.decode_tok_s:.1f} tok/s ({s.new_tokens} tok), TTFT {s.ttft_s * 1000:.1f} ms, "
            f"peak RSS {peak_rss_mb():.0f} MB")


def result_json(session: ChatSession, question: str, result: GenerationResult, notices: list[str]) -> dict:
    return {"question": question, "answer": result.text.strip(), "image": session.image_path,
            "notices": notices, "backend": session.engine.backend,
            "stats": {**result.stats.as_dict(), "peak_rss_mb": round(peak_rss_mb(), 1)}}


def answer_once(session: ChatSession, question: str, out: TextIO, err: TextIO, json_out: bool,
                show_stats: bool) -> GenerationResult:
    """Ask one question; streams the answer to ``out`` (or prints one JSON object)."""
    started = [False]

    def on_text(piece: str) -> None:
        # The answer starts after "Response:" with a space the model generates: drop leading blanks.
        if not started[0]:
            piece = piece.lstrip()
            if not piece:
                return
            started[0] = True
        out.write(piece)
        out.flush()

    result, notices = session.ask(question, None if json_out else on_text)
    if json_out:
        out.write(json.dumps(result_json(session, question, result, notices)) + "\n")
    else:
        out.write("\n")
        for n in notices:
            err.write(f"note: {n}\n")
    out.flush()
    if show_stats and not json_out:
        err.write(stats_line(result) + "\n")
    return result


def _is_tty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):  # a closed stream
        return False


def line_reader(inp: TextIO, err: TextIO, interactive: bool) -> Callable[[], str]:
    """A function returning the next input line ('' at the end of input). The process's own terminal goes
    through readline (``input()`` uses it when stdin and stdout are terminals); anything else is read plainly,
    with the prompt on stderr when interactive."""
    if interactive and inp is sys.stdin and _is_tty(sys.stdout):
        try:
            import readline  # noqa: F401 - importing it is what makes input() edit lines and keep history
        except ImportError:
            pass

        def read_terminal() -> str:
            try:
                return input(">>> ") + "\n"
            except EOFError:
                err.write("\n")
                return ""

        return read_terminal

    def read_plain() -> str:
        if interactive:
            err.write(">>> ")
            err.flush()
        return inp.readline()

    return read_plain


def run_repl(session: ChatSession, inp: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None,
             json_out: bool = False, show_stats: bool = False) -> int:
    """Read questions until /exit or end of input (exit code 0) or Ctrl-C at the prompt (130; Ctrl-C during an
    answer stops that answer only); returns the exit code. Streams default to the
    process's current sys.stdin/stdout/stderr (looked up at call time, so redirection works)."""
    from lavin_edge.data.image import ImageError

    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    if inp is None or getattr(inp, "closed", False):
        err.write("note: stdin is closed: no questions to read (use --prompt for one answer)\n")
        return 0

    interactive = _is_tty(inp)
    if interactive:
        what = f"image {session.image_path}" if session.image_path else "no image (text only)"
        err.write(f"lavin-edge chat ({session.engine.backend} backend, {what}). {HELP}\n")
    read_line = line_reader(inp, err, interactive)
    while True:
        try:
            line = read_line()
        except KeyboardInterrupt:  # at the prompt: quit, as Ctrl-C ends every command (exit code 130)
            err.write("\n")
            return EXIT_INTERRUPTED
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                session.reset()
                err.write("history cleared\n")
            elif cmd == "/image":
                if not arg.strip():
                    err.write("error: /image needs a path\n")
                    continue
                try:
                    cleared = session.set_image(arg.strip())
                    err.write(f"image set: {arg.strip()} (a new conversation"
                              + ("; history cleared)\n" if cleared else ")\n"))
                except ImageError as e:
                    err.write(f"error: {e}\n")
            elif cmd == "/help":
                err.write(HELP + "\n")
            else:
                err.write(f"error: unknown command {cmd} ({HELP})\n")
            continue
        try:
            answer_once(session, line, out, err, json_out, show_stats)
        except ContextError as e:
            err.write(f"error: {e}\n")
        except KeyboardInterrupt:
            out.write("\n")
            err.write("(interrupted)\n")
            session.engine.reset(session.engine.modality)
