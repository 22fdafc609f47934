"""The app's model threads: every model call on a few fixed threads, and predictions that wait batched.

Two reasons, both measured on a 2-core CPU (docs/app.md, "Speed"):

- torch's CPU thread pool (OpenMP) belongs to the thread that calls into it. gradio runs each event
  on a worker thread of its own choosing; once a second thread had used torch, every later forward
  pass ran up to 1.8x slower for the life of the process. So models are loaded and run only here.
- A request that arrives while the model is busy waits anyway; when the model is free, everything
  that waits goes through it as one batch (a 224-px ResNet50 with Grad-CAM: 133 ms for one image,
  ~105 ms an image for two to eight). A request alone never waits for company.

A burst of batches leaves the server's allocator holding a few hundred MiB it no longer uses (gradio's
worker threads and the model thread each keep their own malloc arenas); once the model has been idle
for :data:`GIVE_BACK_AFTER` seconds after a batch, that memory is returned to the system
(:func:`release_free_memory`). Lone requests never trigger it: they would pay the page faults again.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

#: Requests one forward pass may serve at most: everyone who waits, for up to 8 people at once (a
#: cap below that makes some wait two passes). 224-px ResNet50 with Grad-CAM on this 2-core CPU:
#: 133 ms for one image, ~105 ms an image for 2 to 8; a burst of batches of 8 raises the server's
#: memory by ~250-430 MiB while it lasts (given back after it: GIVE_BACK_AFTER).
MAX_BATCH = 8
#: Seconds of idleness after a pass of several requests before freed memory goes back to the system
#: (under steady load the model is never idle this long, so the trim costs nothing there).
GIVE_BACK_AFTER = 1.0


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the memory that every malloc arena holds but no longer uses to the system (glibc's
    ``malloc_trim(0)``, about 1 ms); whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


#: Bytes of images that all requests together may hold at once (decoding, the decoded frame, its
#: crop and heatmap): one 40 Mpx upload's decode (~210 MB at its peak) and ordinary frames beside it,
#: never two such decodes at once. The model's own working memory (a batch) is bounded by MAX_BATCH.
IMAGE_BUDGET = 320 * 2**20


class MemoryBudget:
    """Bytes that requests may hold at once for their images, shared by every request of a server.

    A request takes what its decode will need at its peak before decoding
    (:attr:`~thyroid_classifier.preprocess.PendingImage.cost`, read from the header), and keeps what
    it still holds after (:meth:`Hold.resize`) until it is done. One that needs more than the whole
    budget waits until nothing else is held, then goes alone. Not first come, first served: an
    ordinary frame that fits goes ahead of a large upload that waits for room, so a person's request
    does not queue behind someone else's decoding (the large ones take their turns among themselves)."""

    def __init__(self, total: int = IMAGE_BUDGET) -> None:
        if total < 1:
            raise ValueError(f"a memory budget must be at least 1 byte (got {total})")
        self.total = total
        self.held = 0
        #: the most ever held at once (for tests and benchmarks)
        self.high_water = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[Hold]:
        """Wait until ``nbytes`` fit (or nothing else is held), hold them for the block, then give them back."""
        nbytes = max(0, int(nbytes))
        with self._room:
            self._room.wait_for(lambda: self.held == 0 or self.held + nbytes <= self.total)
            self.held += nbytes
            self.high_water = max(self.high_water, self.held)
        held = Hold(self, nbytes)
        try:
            yield held
        finally:
            held.resize(0)

    def _give_back(self, nbytes: int) -> None:
        with self._room:
            self.held -= nbytes
            self._room.notify_all()


@dataclass
class Hold:
    """Bytes held from a :class:`MemoryBudget` by one request."""

    budget: MemoryBudget
    nbytes: int

    def resize(self, nbytes: int) -> None:
        """Hold ``nbytes`` from now on (never more than already held: growing would skip the wait)."""
        nbytes = max(0, min(int(nbytes), self.nbytes))
        if nbytes < self.nbytes:
            freed, self.nbytes = self.nbytes - nbytes, nbytes
            self.budget._give_back(freed)


class GiveBackWhenIdle:
    """Counts the requests in flight (``with idle.request():``); once the last of a burst (two or more
    at once) is done and none has come for ``after`` seconds, the memory that every thread freed goes
    back to the system (:func:`release_free_memory`). gradio's worker threads each keep a malloc arena
    of their own: after a flood they held ~300 MiB they no longer used. Lone requests never trigger
    it (they would pay the page faults again)."""

    def __init__(self, after: float = GIVE_BACK_AFTER) -> None:
        self.after = after
        self.released = 0  # times memory was given back (for tests)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._burst = False

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            self._burst = self._burst or self._in_flight > 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                last_of_a_burst = self._in_flight == 0 and self._burst
                if last_of_a_burst:
                    self._burst = False
            if last_of_a_burst:
                timer = threading.Timer(self.after, self._give_back_if_idle)
                timer.daemon = True
                timer.start()

    def _give_back_if_idle(self) -> None:
        with self._lock:
            if self._in_flight:  # busy again: the last request of this burst schedules it
                self._burst = True
                return
        release_free_memory()
        self.released += 1


def _lower_this_threads_priority(niceness: int) -> None:
    """Lower the calling thread's CPU priority (Linux: niceness is per thread); nothing where the OS says no."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


class BackgroundWorker:
    """One thread at a lower CPU priority (nice ``niceness``) for heavy work that must not slow the
    model's thread or other people's requests on a small CPU: decoding a large upload (a 40 Mpx PNG
    takes ~2 s of one core). One thread: such work takes turns, and its freed memory stays in one
    malloc arena, given back to the system after each job (:func:`release_free_memory`)."""

    def __init__(self, niceness: int = 10) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="background", initializer=_lower_this_threads_priority, initargs=(niceness,))

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the background thread; its result, or its exception raised here."""
        return self._pool.submit(self._then_release, fn, *args).result()

    @staticmethod
    def _then_release(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        finally:
            release_free_memory()


@dataclass
class _Call:
    """Any callable to run on a model thread (loading a model, for one)."""

    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)


@dataclass
class _Prediction:
    """One image for one predictor's ``predict`` (the rest of its keyword arguments: ``kwargs``; ``each``: arguments
    that ``predict`` takes as one value per image, given here for this image)."""

    predictor: Any
    image: Any
    kwargs: dict
    future: Future = field(default_factory=Future)
    each: dict = field(default_factory=dict)


class ModelRunner:
    """``workers`` fixed threads that run every model call; each pass of a thread takes everything
    that waits (up to ``max_batch`` requests) and gives each predictor's images one ``predict`` call.

    ``run(load_predictors, names)`` loads on a model thread; ``predict(predictor, image)`` blocks
    until that image's :class:`~thyroid_classifier.predict.Prediction` is ready. Images of one batch
    never affect each other's results (the models are in eval mode); an image whose batch fails is
    retried alone, so one bad image fails only its own request."""

    def __init__(self, workers: int = 1, max_batch: int = MAX_BATCH, give_back_after: float = GIVE_BACK_AFTER) -> None:
        if workers < 1 or max_batch < 1:
            raise ValueError(f"workers and max_batch must be at least 1 (got {workers}, {max_batch})")
        if not give_back_after > 0:  # a negative timeout would kill the model thread at its first idle moment
            raise ValueError(f"give_back_after must be a positive number of seconds (got {give_back_after})")
        self.workers = workers
        self.max_batch = max_batch
        self.give_back_after = give_back_after
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        #: the sizes of the last 1000 batches, in order (for tests and benchmarks; bounded: a server runs for months)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        for i in range(workers):
            threading.Thread(target=self._work, name=f"models-{i}", daemon=True).start()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a model thread; its result, or its exception raised here."""
        job = _Call(fn, args)
        self._queue.put(job)
        return job.future.result()

    def predict(self, predictor: Any, image: Any, each: dict | None = None, **kwargs: Any) -> Any:
        """``predictor.predict([image], **kwargs)[0]``, batched with whatever else waits. ``each``: arguments ``predict``
        takes per image (a list, one value per image: e.g. ``{"nodule_boxes": box}``), this image's value; images batch
        together whatever their ``each`` (an image without it gets None)."""
        job = _Prediction(predictor, image, kwargs, each=dict(each or {}))
        self._queue.put(job)
        return job.future.result()

    def _work(self) -> None:
        batched = False  # a pass of several requests since memory was last given back
        while True:
            try:  # wait for work; then take whatever else already waits
                jobs = [self._queue.get(timeout=self.give_back_after if batched else None)]
            except queue.Empty:  # idle after a burst: give its memory back
                release_free_memory()
                batched = False
                continue
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: list[list[_Prediction]] = []
            for job in jobs:
                if isinstance(job, _Call):
                    try:
                        job.future.set_result(job.fn(*job.args))
                    except BaseException as exc:  # noqa: BLE001 - raised again in the waiting thread
                        job.future.set_exception(exc)
                    continue
                mine = next((g for g in groups if g[0].predictor is job.predictor and _same(g[0].kwargs, job.kwargs)), None)
                if mine is None:
                    groups.append([job])
                else:
                    mine.append(job)
            for group in groups:
                self._predict(group)
            batched = batched or any(len(group) > 1 for group in groups)

    def _predict(self, group: Sequence[_Prediction]) -> None:
        self.batch_sizes.append(len(group))
        try:
            per_image = {name: [job.each.get(name) for job in group] for name in sorted({n for job in group for n in job.each})}
            results = group[0].predictor.predict([job.image for job in group], **group[0].kwargs, **per_image)
            if len(results) != len(group):
                raise RuntimeError(f"predict returned {len(results)} results for {len(group)} images")
        except BaseException as exc:  # noqa: BLE001 - raised again in the waiting thread; this thread goes on
            if len(group) == 1:
                group[0].future.set_exception(exc)
            else:  # one by one: only the bad image's request fails
                for job in group:
                    self._predict([job])
            return
        for job, result in zip(group, results, strict=True):
            job.future.set_result(result)


def _same(a: dict, b: dict) -> bool:
    """Whether two calls' keyword arguments are equal (values that cannot be compared: not equal)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. arrays: such calls simply do not share a pass
        return False
