"""One answer without importing PyTorch: ``lavin-edge chat --prompt`` (greedy, plain text) on a quantized model
runs on ``lavin_edge.runtime.numpy_engine``, so its cold start is the extension's and NumPy's, not PyTorch's.

Same prompt format (``lavin_edge.prompt``), same image preprocessing (``lavin_edge.data.image.image_array``), same
native decode step and head as ``Engine``; the output is written as ``lavin_edge.chat.repl.answer_once`` writes
it. A model or option this path does not cover returns False before writing anything, and the caller answers
through the PyTorch session (tests/test_numpy_engine.py holds the two together).
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from lavin_edge.prompt import budget_note, check_prompt_fits, conversation_ids
from lavin_edge.runtime.text_stream import StopStringStream


def answer_without_torch(model_dir: str | Path, image: str | None, question: str, max_new_tokens: int,
                         stop: tuple[str, ...], max_context: int | None, threads: int | None, out: TextIO,
                         err: TextIO | None = None) -> bool:
    """Answer ``question`` (about ``image``) on ``model_dir`` to ``out`` (a note to ``err`` when
    ``max_new_tokens`` is more than the context leaves); False when the model needs ``Engine``."""
    from lavin_edge.data.image import load_image_array
    from lavin_edge.runtime.numpy_engine import NumpyEngine, Unsupported

    try:
        engine = NumpyEngine(model_dir, max_context, threads)
        if image is not None and engine.vision is None:
            return False  # the PyTorch session reports a text-only model the way chat always has
    except Unsupported:
        return False
    tok = engine.tokenizer
    visual = None
    if image is not None:
        visual = engine.encode_image(load_image_array(image, engine.cfg.vision.image_size))
    ids, image_pos = conversation_ids(tok, [], question, 0 if visual is None else visual.shape[0])
    check_prompt_fits(len(ids), engine.max_context)
    note = budget_note(max_new_tokens, len(ids), engine.max_context)
    if note and err is not None:
        err.write(f"note: {note}\n")
    stream = StopStringStream(tok.decode, stop)
    started = False

    def write(piece: str) -> None:
        nonlocal started
        if not started:  # the answer starts after "Response:" with a space the model generates
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            out.write(piece)
            out.flush()

    def on_token(t: int) -> bool:
        write(stream.push(t))
        return not stream.stopped

    engine.generate(ids, image_pos, visual, max_new_tokens, set(getattr(tok, "stop_ids", {tok.eos_id})), on_token)
    write(stream.finish())
    out.write("\n")
    out.flush()
    return True
