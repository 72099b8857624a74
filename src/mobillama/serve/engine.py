"""The bridge between the async HTTP layer and the (synchronous) generation module.

Why a scheduler of its own: the model is plain PyTorch and blocks, so each generation runs in a worker
thread; a :class:`~mobillama.infer.generator.Generator` owns one static KV cache, so each worker thread owns one
Generator (all of them share the same model weights, read-only). Requests wait in one bounded FIFO queue
(first come, first served); when the queue is full a submission fails at once (the HTTP layer answers
429 with ``Retry-After``) instead of piling up latency without bound.

Sampling, stop strings and decoding are the generation module's: a job only calls ``iter_ids`` and
forwards the text deltas. Between deltas the worker checks the job's cancel flag, so a client that goes
away (or a server that shuts down) stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mobillama.infer.sampling import Completion, SamplingParams

log = logging.getLogger("mobillama.serve")

# Why a generation ended early, as the finish_reason the client sees.
ABORT = "abort"  # the server shut down before the reply was complete


class QueueFull(Exception):
    """All slots are busy and the waiting queue is full (HTTP 429)."""


class NotReady(Exception):
    """The model is still loading, failed to load, or the server is shutting down (HTTP 503)."""


@dataclass
class Event:
    """What a worker reports to the waiting request: a text delta, the end, or a failure."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    completion: Completion | None = None
    error: BaseException | None = None


@dataclass(eq=False)  # identity semantics: jobs live in a set
class Job:
    """One request's generation: the prompt ids, the sampling parameters and a channel back."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_reason: str | None = None  # set from any thread; read by the worker between tokens
    polled_at: float = 0.0  # when the HTTP layer last checked that the client is still connected
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    images: list | None = None  # Pillow images for a generator that accepts_images (MobiLlama-V)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def _emit(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def slot_generators(generator: Any, count: int) -> list[Any]:
    """One generator per worker slot, sharing the model weights.

    A real generator (text or MobiLlama-V) keeps a KV cache per object, so its siblings get their own
    (``sibling()``: same model, same tokenizer). Any other object (a test double) is shared and must be
    safe for that.
    """
    if hasattr(generator, "sibling"):
        return [generator] + [generator.sibling() for _ in range(count - 1)]
    return [generator] * count


class Engine:
    """Worker threads over a bounded FIFO queue of :class:`Job` objects.

    ``loader`` is called in a background thread by :meth:`start_loading` (so the server answers
    ``/health`` while a model loads) and returns the generator; ``ready`` turns true when it is done.
    """

    def __init__(self, loader: Callable[[], Any], *, max_concurrency: int = 1, queue_size: int = 16) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self._loader = loader
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self.generator: Any = None  # the first slot's generator: tokenizer and context for the HTTP layer
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.draining = False
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # jobs submitted and not yet picked up by a worker
        self._active: set[Job] = set()  # submitted and not finished (waiting or running)
        self._threads: list[threading.Thread] = []
        self._loading: threading.Thread | None = None

    # ---- life cycle ---------------------------------------------------------------------------------
    def start_loading(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        def load() -> None:
            try:
                generator = self._loader()
                generators = slot_generators(generator, self.max_concurrency)
            except BaseException as e:  # reported through /ready and the log; the server may exit
                self.load_error = e
                log.error("model loading failed: %s", e)
                if on_failure is not None:
                    on_failure(e)
                return
            self.generator = generators[0]
            for i, g in enumerate(generators):
                t = threading.Thread(target=self._work, args=(g,), name=f"mobillama-gen-{i}", daemon=True)
                t.start()
                self._threads.append(t)
            self.ready.set()

        self._loading = threading.Thread(target=load, name="mobillama-load", daemon=True)
        self._loading.start()

    def begin_drain(self) -> None:
        """Refuse new jobs from now on; those already submitted keep going."""
        self.draining = True

    def abort_all(self, reason: str = ABORT) -> int:
        """Cut every submitted job (waiting or running) at its next token; returns how many."""
        with self._lock:
            jobs = list(self._active)
        for job in jobs:
            job.cancel(reason)
        return len(jobs)

    def stop(self, timeout: float = 5.0) -> None:
        """Abort what is left and end the worker threads (bounded wait)."""
        self.draining = True
        self.abort_all()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._active)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    # ---- submission -----------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, images: list | None = None) -> Job:
        """Queue a job (FIFO) or raise :class:`QueueFull` / :class:`NotReady` at once. ``images`` go to
        the generator's ``iter_ids`` (only a generator that ``accepts_images`` is given any)."""
        if self.draining:
            raise NotReady("the server is shutting down")
        if not self.ready.is_set():
            raise NotReady("the model failed to load" if self.load_error else "the model is still loading")
        job = Job(list(prompt_ids), params, asyncio.get_running_loop(), images=images)
        with self._lock:
            # A job waits only when every slot is busy; the waiting line holds at most queue_size jobs.
            busy = len(self._active) - self._waiting
            if busy >= self.max_concurrency and self._waiting >= self.queue_size:
                raise QueueFull(
                    f"all {self.max_concurrency} generation slot(s) are busy and {self._waiting} "
                    "request(s) are already waiting"
                )
            self._waiting += 1
            self._active.add(job)
        self._queue.put(job)
        return job

    # ---- the worker -----------------------------------------------------------------------------------
    def _work(self, generator: Any) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
            job.started.set()
            try:
                self._run(generator, job)
            finally:
                with self._lock:
                    self._active.discard(job)
                job.finished.set()

    def _run(self, generator: Any, job: Job) -> None:
        text: list[str] = []
        if job.cancel_reason is not None:  # cancelled while it waited: never touch the model
            job._emit(Event("done", completion=self._cut(generator, job, text)))
            return
        extra = {"images": job.images} if job.images else {}
        iterator = generator.iter_ids([job.prompt_ids], job.params, **extra)
        try:
            while True:
                try:
                    _, delta = next(iterator)
                except StopIteration as finished:
                    job._emit(Event("done", completion=finished.value[0]))
                    return
                text.append(delta)
                job._emit(Event("delta", text=delta))
                if job.cancel_reason is not None:
                    job._emit(Event("done", completion=self._cut(generator, job, text)))
                    return
        except Exception as e:  # a bug or a bad input the HTTP checks missed: report, keep the worker
            log.exception("generation failed")
            job._emit(Event("error", error=e))
        finally:
            with contextlib.suppress(Exception):
                iterator.close()

    @staticmethod
    def _cut(generator: Any, job: Job, text: list[str]) -> Completion:
        """The completion of a job stopped early. Its token count is re-derived from the text (the
        generation module reports counts only for a finished loop)."""
        joined = "".join(text)
        tokens = len(generator.tokenizer.encode(joined)) if joined else 0
        return Completion(joined, [], job.cancel_reason or ABORT, len(job.prompt_ids), tokens)
