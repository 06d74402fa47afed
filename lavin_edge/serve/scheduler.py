"""Continuous batching: up to ``slots`` requests decode together, one batched step (``BatchDecoder.step``) for
all active rows; requests join (prefill into a free slot) and leave (end of text, stop string, token budget,
cancelled) between steps; a bounded queue waits behind the slots.

The decode loop runs on one thread of its own (the model's ops release the GIL, so the HTTP event loop keeps
serving). A request's prefill runs either inline, on that loop between two steps (every active row waits for
it), or with ``overlap_prefill`` on a second thread of its own, into a slot reserved for it, while the loop
goes on stepping the others; the row joins the batch at the next step after its prefill. The two threads
touch disjoint KV-cache slots and each kernel call keeps its scratch to itself, so a row's tokens are the
same either way. Each request hears about its progress through ``Job.sink``, called on those threads with
``("text", str)``, ``("done", dict)`` or ``("error", str)``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lavin_edge.runtime.batch import BatchDecoder
from lavin_edge.runtime.sampling import Sampler, StopStringStream
from lavin_edge.serve.protocol import Completion

Event = tuple[str, Any]


class QueueFull(Exception):
    """Every slot is busy and the queue behind them is full."""


@dataclass
class Job:
    completion: Completion
    sink: Callable[[Event], None]
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float = 0.0
    slot: int = -1
    next_token: int = -1
    out: list[int] = field(default_factory=list)
    sampler: Sampler | None = None
    stream: StopStringStream | None = None


class Scheduler:
    """The batching loop over one ``BatchDecoder``; ``max_queue`` jobs may wait beyond the free slots;
    ``overlap_prefill``: prefill on a thread of its own (see the module docstring)."""

    def __init__(self, decoder: BatchDecoder, max_queue: int, overlap_prefill: bool = False) -> None:
        self.decoder = decoder
        self.engine = decoder.engine
        self.max_queue = max_queue
        tok = self.engine.tokenizer
        self.stop_ids = set(getattr(tok, "stop_ids", {tok.eos_id}))
        self.vocab = self.engine.embed.shape[0]
        self.waiting: deque[Job] = deque()
        self.active: dict[int, Job] = {}
        self.starting: dict[int, Job] = {}  # slots reserved by jobs whose prefill runs on the prefill thread
        self.cv = threading.Condition()
        self.closing = False
        self.steps = 0
        self.overlap_prefill = overlap_prefill
        self.threads = [threading.Thread(target=self.run, name="lavin-edge-batching", daemon=True)]
        if overlap_prefill:
            self.threads.append(threading.Thread(target=self.run_prefill, name="lavin-edge-prefill", daemon=True))

    # -- called from request handlers -----------------------------------------------------------------
    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        with self.cv:
            self.closing = True
            self.cv.notify_all()
        for t in self.threads:
            t.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.cv:
            free = self.decoder.slots - len(self.active) - len(self.starting)
            if len(self.waiting) >= self.max_queue + max(free, 0):
                raise QueueFull(f"all {self.decoder.slots} slots busy and {len(self.waiting)} requests queued")
            self.waiting.append(job)
            self.cv.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop ``job`` before the next step (its slot is free for the next waiting request)."""
        with self.cv:
            job.cancelled = True
            self.cv.notify_all()

    def load(self) -> dict[str, int]:
        with self.cv:
            return {"slots": self.decoder.slots, "active": len(self.active) + len(self.starting),
                    "queued": sum(not j.cancelled for j in self.waiting), "max_queue": self.max_queue}

    # -- the loops -------------------------------------------------------------------------------------
    def _admit(self) -> list[Job]:
        """Under the lock: give waiting jobs the free slots (all of them inline, one on the prefill thread)."""
        admit = []
        free = [s for s in range(self.decoder.slots) if s not in self.active and s not in self.starting]
        while free and self.waiting and not (self.overlap_prefill and admit):
            job = self.waiting.popleft()
            if not job.cancelled:
                job.slot = free.pop(0)
                (self.starting if self.overlap_prefill else self.active)[job.slot] = job
                admit.append(job)
        return admit

    def run(self) -> None:
        """The decode loop (and, without ``overlap_prefill``, the prefills between its steps)."""
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                for slot in [s for s, j in self.active.items() if j.cancelled]:
                    del self.active[slot]
                while not self.closing and not self.active and (self.overlap_prefill or not self.waiting):
                    self.cv.wait()
                if self.closing:
                    return
                admit = [] if self.overlap_prefill else self._admit()
            for job in admit:
                self._guarded([job], self._start)
            with self.cv:
                rows = [j for j in self.active.values() if not j.cancelled and j.next_token >= 0]
            if rows:
                self._guarded(rows, self._step)

    def run_prefill(self) -> None:
        """With ``overlap_prefill``: prefill arriving jobs one at a time into reserved slots; each joins the
        decode batch when its first token is out."""
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not self.closing and not (admit := self._admit()):
                    self.cv.wait()
                if self.closing:
                    return
            (job,) = admit
            self._guarded([job], self._start)
            with self.cv:
                self.starting.pop(job.slot, None)
                if job.next_token >= 0 and not job.cancelled:
                    self.active[job.slot] = job
                self.cv.notify_all()

    def _guarded(self, jobs: list[Job], fn: Callable[[list[Job]], None]) -> None:
        """Run ``fn``; a failure ends these jobs with an error and the server keeps serving."""
        try:
            fn(jobs)
        except Exception as e:  # noqa: BLE001 - reported to the client, the loop goes on
            for job in jobs:
                job.sink(("error", f"{type(e).__name__}: {e}"))
                self._leave(job)

    def _start(self, jobs: list[Job]) -> None:
        (job,) = jobs
        c = job.completion
        visual = c.visual
        if visual is None and c.image is not None:
            visual = self.engine.encode_image(c.image)
        logits = self.decoder.prefill(job.slot, c.ids, c.modality, c.image_pos, visual)
        job.sampler = Sampler(c.gen, self.vocab)
        job.sampler.observe(c.ids)
        job.stream = StopStringStream(self.engine.tokenizer.decode, c.gen.stop_strings)
        job.first_token = time.perf_counter()
        self._take(job, job.sampler(logits))

    def _step(self, jobs: list[Job]) -> None:
        logits = self.decoder.step([j.slot for j in jobs], [j.next_token for j in jobs])
        self.steps += 1
        for i, job in enumerate(jobs):
            assert job.sampler is not None
            self._take(job, job.sampler(logits[i]))

    def _take(self, job: Job, tok: int) -> None:
        """One sampled token for ``job``: stream its text, or finish the job."""
        assert job.stream is not None
        if tok in self.stop_ids and not job.completion.ignore_eos:
            return self._finish(job, "stop")
        job.out.append(tok)
        piece = job.stream.push(tok)
        if piece:
            job.sink(("text", piece))
        if job.stream.stopped:
            return self._finish(job, "stop")
        if len(job.out) >= job.completion.max_tokens:
            return self._finish(job, "length")
        job.next_token = tok

    def _finish(self, job: Job, reason: str) -> None:
        assert job.stream is not None
        rest = job.stream.finish()
        if rest:
            job.sink(("text", rest))
        now = time.perf_counter()
        job.sink(("done", {"finish_reason": reason, "prompt_tokens": len(job.completion.ids),
                           "completion_tokens": len(job.out), "ttft_s": job.first_token - job.submitted,
                           "total_s": now - job.submitted}))
        self._leave(job)

    def _leave(self, job: Job) -> None:
        job.next_token = -1
        with self.cv:
            if self.active.get(job.slot) is job:
                del self.active[job.slot]
            self.cv.notify_all()  # a slot is free: the prefill thread may be waiting for one
