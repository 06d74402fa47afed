"""What a one-sequence engine remembers between calls, shared by ``Engine`` and ``CudaEngine``: how many
positions its KV cache holds, the ids at those positions, and the sequence's route (text or image)."""

from __future__ import annotations

from lavin_edge.modality import TEXT


class CachedSequence:
    length: int = 0
    history: list[int]
    modality: int = TEXT

    def reset(self, modality: int = TEXT) -> None:
        self.length = 0
        self.history = []
        self.modality = modality

    def rewind(self, n: int) -> None:
        """Forget cache positions from ``n`` on (causal attention: the first n stay valid as they are)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot rewind to {n}: {self.length} positions cached")
        self.length = n
        del self.history[n:]
