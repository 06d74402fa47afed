"""Streamed answer text from generated token ids (no PyTorch: the engine without it streams through this too)."""

from __future__ import annotations


class StopStringStream:
    """Turns a growing list of token ids into streamed text, holding back what could still become a stop
    string (or an incomplete UTF-8 character), and reports when a stop string has appeared."""

    def __init__(self, decode, stop_strings: tuple[str, ...] = ()) -> None:  # noqa: ANN001 - any ids->str
        self.decode = decode
        self.stops = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the final text already handed out
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the newly stable text (possibly empty)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        for s in self.stops:
            i = text.find(s)
            if i >= 0:
                self.stopped = True
                text = text[:i]
        self.text = text
        if self.stopped:
            return self._take(len(text))
        stable = len(text)
        # A trailing U+FFFD is usually a multi-byte character cut between tokens: wait for the rest.
        while stable > 0 and text[stable - 1] == "\ufffd":
            stable -= 1
        for s in self.stops:
            for k in range(min(len(s) - 1, stable), 0, -1):
                if text[stable - k:stable] == s[:k]:
                    stable -= k
                    break
        return self._take(stable)

    def finish(self) -> str:
        """Generation ended: release whatever was held back."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
