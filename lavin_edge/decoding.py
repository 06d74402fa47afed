"""The decode loop every generator shares (the PyTorch LaVIN's greedy answers, the runtime's generation, the
engine without PyTorch): emit the picked token, stop on a stop id, the budget or the caller's say, else feed it
and pick the next. No PyTorch or NumPy here: callers run the model and pick (argmax, a sampler).

``lavin_edge.serve.scheduler`` runs its own batch loop: its rows join and leave between steps (continuous
batching), each with its own sampler and stop strings, which a loop over a fixed set of rows does not express.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence

EOS, STOP_STRING, LENGTH = "eos", "stop_string", "length"


def decode(first: Sequence[int], step: Callable[[list[int]], Sequence[int]], stop_ids: Container[int],
           budget: int, emit: Callable[[int, int], bool]) -> tuple[list[str], list[int]]:
    """Rows decode in lockstep from their first picks (what the prefill's logits gave). For each row still going:
    a stop id ends it (``EOS``; the id is not emitted), else ``emit(row, token)`` takes the token and False from
    it ends the row (``STOP_STRING``), and the row's ``budget``-th token ends it (``LENGTH``). While a row goes on,
    ``step(picks)`` feeds every row's pick (ended rows' too: a batch steps together) and returns the next picks.
    Returns (each row's reason, the last picks: an ``EOS`` row's is its stop id)."""
    picks = list(first)
    reasons: list[str | None] = [None] * len(picks)
    if budget < 1:
        return [LENGTH] * len(picks), picks
    counts = [0] * len(picks)
    while True:
        for row, token in enumerate(picks):
            if reasons[row] is not None:
                continue
            if token in stop_ids:
                reasons[row] = EOS
                continue
            counts[row] += 1
            if not emit(row, token):
                reasons[row] = STOP_STRING
            elif counts[row] >= budget:
                reasons[row] = LENGTH
        if all(r is not None for r in reasons):
            return [str(r) for r in reasons], picks
        picks = list(step(picks))
