"""The app's model runner: batches what waits, keeps each request's answer its own, isolates a bad image."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from thyroid_classifier.serving import ModelRunner


class FakePredictor:
    """``predict`` returns each image's own answer; the first call holds until ``release`` is set,
    so that the requests sent meanwhile have to wait."""

    def __init__(self, hold_first: bool = True) -> None:
        self.calls: list[list] = []
        self.threads: set[int] = set()
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def predict(self, images, **kwargs):
        self.calls.append(list(images))
        self.threads.add(threading.get_ident())
        self.started.set()
        self.release.wait(timeout=30)
        if "bad" in images:
            raise ValueError("cannot read")
        return [f"answer to {image} at {kwargs.get('opacity')}" for image in images]


def _busy_then(runner: ModelRunner, predictor: FakePredictor, images: list, **kwargs) -> list:
    """One request that holds the model, then ``images`` sent while it is busy; every answer (or error)."""
    with ThreadPoolExecutor(len(images) + 1) as pool:
        first = pool.submit(runner.predict, predictor, "first", **kwargs)
        assert predictor.started.wait(timeout=30)
        waiting = [pool.submit(runner.predict, predictor, image, **kwargs) for image in images]
        while runner._queue.qsize() < len(images):  # all of them wait before the model is free
            threading.Event().wait(0.01)
        predictor.release.set()
        futures = [first, *waiting]
        return [f.exception(timeout=30) or f.result() for f in futures]


def test_requests_that_wait_share_one_pass_and_each_gets_its_own_answer():
    runner, predictor = ModelRunner(max_batch=8), FakePredictor()
    answers = _busy_then(runner, predictor, [f"image {i}" for i in range(5)], opacity=None)
    assert answers == ["answer to first at None"] + [f"answer to image {i} at None" for i in range(5)]
    assert predictor.calls == [["first"], [f"image {i}" for i in range(5)]]  # one pass for the five that waited
    assert list(runner.batch_sizes) == [1, 5]
    assert len(predictor.threads) == 1 and threading.get_ident() not in predictor.threads


@pytest.mark.parametrize(("max_batch", "passes"), [(2, [1, 2, 2, 1]), (1, [1] * 6)])
def test_a_batch_is_never_larger_than_max_batch(max_batch, passes):
    """``--max_batch 1``: every request its own pass, as before batching."""
    runner, predictor = ModelRunner(max_batch=max_batch), FakePredictor()
    answers = _busy_then(runner, predictor, ["a", "b", "c", "d", "e"])
    assert answers[1:] == [f"answer to {x} at None" for x in "abcde"]
    assert list(runner.batch_sizes) == passes
    assert runner.batch_sizes.maxlen == 1000  # bounded: a server runs for months


def test_a_bad_image_fails_only_its_own_request():
    runner, predictor = ModelRunner(), FakePredictor()
    answers = _busy_then(runner, predictor, ["a", "bad", "c"])
    assert answers[0] == "answer to first at None" and answers[1] == "answer to a at None" and answers[3] == "answer to c at None"
    assert isinstance(answers[2], ValueError)
    assert predictor.calls[1] == ["a", "bad", "c"] and ["bad"] in predictor.calls  # the batch failed; each retried alone


def test_different_predictors_and_settings_are_never_mixed_in_one_call():
    runner, one, two = ModelRunner(), FakePredictor(), FakePredictor(hold_first=False)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(runner.predict, one, "first")
        assert one.started.wait(timeout=30)
        jobs = [pool.submit(runner.predict, two, "x"), pool.submit(runner.predict, one, "y", opacity=0.5), pool.submit(runner.predict, one, "z")]
        while runner._queue.qsize() < 3:
            threading.Event().wait(0.01)
        one.release.set()
        assert [j.result(timeout=30) for j in [first, *jobs]] == ["answer to first at None", "answer to x at None", "answer to y at 0.5", "answer to z at None"]
    assert two.calls == [["x"]] and sorted(one.calls) == [["first"], ["y"], ["z"]]


def test_requests_whose_arguments_cannot_be_compared_never_share_a_call():
    """Array arguments (``a == b`` is an array, not a truth value): each such request is its own call."""
    runner, predictor = ModelRunner(), FakePredictor()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(runner.predict, predictor, "first")
        assert predictor.started.wait(timeout=30)
        jobs = [pool.submit(runner.predict, predictor, image, weights=np.full(2, value)) for image, value in (("x", 1.0), ("y", 2.0))]
        while runner._queue.qsize() < 2:
            threading.Event().wait(0.01)
        predictor.release.set()
        assert [j.result(timeout=30) for j in [first, *jobs]] == [f"answer to {x} at None" for x in ("first", "x", "y")]
    assert predictor.calls == [["first"], ["x"], ["y"]]


class BoxPredictor(FakePredictor):
    """Answers each image with the nodule box it was given (``nodule_boxes``: one per image)."""

    def predict(self, images, nodule_boxes=None, **kwargs):
        super().predict(images, **kwargs)
        assert nodule_boxes is None or len(nodule_boxes) == len(images)
        return [f"{image} boxed {box}" for image, box in zip(images, nodule_boxes or [None] * len(images), strict=True)]


def test_per_image_arguments_share_a_pass_and_each_image_keeps_its_own():
    """Bugs: the first request's box given to every image of the pass, or requests with boxes never batched."""
    runner, predictor = ModelRunner(), BoxPredictor()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(runner.predict, predictor, "first")
        assert predictor.started.wait(timeout=30)
        jobs = [pool.submit(runner.predict, predictor, "x", each={"nodule_boxes": (1, 2, 3, 4)}), pool.submit(runner.predict, predictor, "y"),
                pool.submit(runner.predict, predictor, "z", each={"nodule_boxes": (5, 6, 7, 8)})]
        while runner._queue.qsize() < 3:
            threading.Event().wait(0.01)
        predictor.release.set()
        assert [j.result(timeout=30) for j in [first, *jobs]] == ["first boxed None", "x boxed (1, 2, 3, 4)", "y boxed None", "z boxed (5, 6, 7, 8)"]
    assert predictor.calls == [["first"], ["x", "y", "z"]]  # one pass for the three


def test_run_returns_or_raises_on_a_model_thread():
    runner = ModelRunner()
    assert runner.run(threading.get_ident) != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        runner.run(lambda: 1 / 0)
    with pytest.raises(ValueError, match="at least 1"):
        ModelRunner(max_batch=0)


def test_a_batched_prediction_equals_the_one_made_alone(short_run, sample_dir):
    """Real model, real frames (a split screen among them): batching changes nothing a user sees."""
    from PIL import Image

    from thyroid_classifier.app import load_predictors

    out, _ = short_run
    predictor = load_predictors([str(out / "tiny-resnet")])["tiny-resnet"]
    frames = [Image.open(p).convert("RGB") for p in sorted(sample_dir.rglob("*.png"))[:6]]
    alone = [predictor.predict([frame], opacity=None)[0] for frame in frames]
    together = predictor.predict(frames, opacity=None)
    for a, b in zip(alone, together, strict=True):
        assert a.label == b.label and a.explained == b.explained and a.prediction_set == b.prediction_set
        assert [a.probabilities[k] for k in predictor.labels] == pytest.approx([b.probabilities[k] for k in predictor.labels], abs=1e-5)
        assert np.abs(a.heatmap - b.heatmap).max() < 1e-3
        assert a.in_domain_score == pytest.approx(b.in_domain_score, rel=1e-4, abs=1e-6) if a.in_domain_score is not None else b.in_domain_score is None


def _within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``'s result or exception, failing the test if it has neither after ``seconds``."""
    outcome: list = []

    def call() -> None:
        try:
            outcome.append(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert outcome, f"no answer within {seconds} s: the model thread is gone"
    return outcome[0]


def test_a_predictor_that_breaks_its_promise_fails_its_requests_and_the_thread_goes_on():
    """A ``predict`` that returns the wrong number of results (or raises anything) must not kill the
    model thread: every later request would wait for ever."""

    class Short(FakePredictor):
        def predict(self, images, **kwargs):
            return super().predict(images, **kwargs)[:-1]

    runner = ModelRunner()
    failed = _within(30, runner.predict, Short(hold_first=False), "a")
    assert isinstance(failed, RuntimeError) and "0 results for 1 images" in str(failed)
    assert isinstance(_within(30, runner.predict, Short(hold_first=False), "b", unhashable=np.zeros(2)), RuntimeError)  # arguments that cannot be compared
    assert _within(30, runner.predict, FakePredictor(hold_first=False), "c") == "answer to c at None"


def test_memory_is_given_back_once_the_model_idles_after_a_burst_and_never_for_lone_requests(monkeypatch):
    """A burst of batches leaves the allocator holding memory it no longer uses; once the model has
    been idle ``give_back_after`` seconds after a batch, it is trimmed, once. Lone requests never
    trim: the next one would pay the page faults again."""
    import time

    from thyroid_classifier import serving

    calls: list[tuple[int, float]] = []  # (thread, time): other tests' runners may trim meanwhile
    monkeypatch.setattr(serving, "release_free_memory", lambda: calls.append((threading.get_ident(), time.monotonic())) or True)
    runner = ModelRunner(give_back_after=0.3)
    lone = FakePredictor(hold_first=False)

    def trims() -> list[float]:
        return [at for thread, at in calls if thread in lone.threads]

    for image in ("a", "b"):
        assert _within(30, runner.predict, lone, image) == f"answer to {image} at None"
        time.sleep(0.5)
    assert trims() == [] and list(runner.batch_sizes) == [1, 1]
    burst = FakePredictor()
    _busy_then(runner, burst, ["c", "d", "e"])
    finished = time.monotonic()
    time.sleep(1.0)
    assert list(runner.batch_sizes)[2:] == [1, 3] and len(trims()) == 1  # once, not every 0.3 s
    assert 0.25 <= trims()[0] - finished <= 0.9  # after the idle time, not at once
    assert _within(30, runner.predict, lone, "f") == "answer to f at None"  # the thread goes on after giving back
    time.sleep(0.5)
    assert len(trims()) == 1  # a lone request after it does not trim again
    assert burst.threads == lone.threads  # (one model thread: the filter above sees all of this runner's trims)
    for wrong in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="give_back_after"):
            ModelRunner(give_back_after=wrong)


def test_release_free_memory_returns_what_a_thread_freed_to_the_system():
    """glibc keeps what a thread frees in that thread's arena; ``malloc_trim`` hands it back."""
    import platform

    import psutil

    from thyroid_classifier.serving import release_free_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")

    def churn() -> None:  # many small blocks (below the mmap threshold), freed but the last
        blocks = [np.ones(16_000) for _ in range(3_000)]  # 125 kB each, ~370 MiB together
        keep = blocks[-1]
        del blocks
        churn.kept = keep

    release_free_memory()
    process = psutil.Process()
    before = process.memory_info().rss
    thread = threading.Thread(target=churn)
    thread.start()
    thread.join()
    held = process.memory_info().rss - before
    assert release_free_memory()
    after = process.memory_info().rss - before
    assert held > 200 * 2**20 and after < held / 4, (held / 2**20, after / 2**20)


def test_release_free_memory_says_so_where_the_c_library_cannot(monkeypatch):
    from thyroid_classifier import serving

    monkeypatch.setattr(serving, "_malloc_trim", lambda: None)  # macOS, musl
    assert serving.release_free_memory() is False


def _in_thread(fn, *args) -> tuple[threading.Thread, threading.Event]:
    """``fn(*args)`` started on a thread; an event set once it has returned."""
    done = threading.Event()

    def run() -> None:
        fn(*args)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_a_memory_budget_makes_requests_wait_for_room_and_lets_a_small_one_past_a_large_one_that_waits():
    from thyroid_classifier.serving import MemoryBudget

    budget = MemoryBudget(100)
    assert (budget.total, budget.held, budget.high_water) == (100, 0, 0)
    release_first = threading.Event()

    def hold(nbytes: int, until: threading.Event | None = None) -> None:
        with budget.hold(nbytes):
            if until is not None:
                assert until.wait(timeout=30)

    _, first_done = _in_thread(hold, 60, release_first)
    while budget.held < 60:
        threading.Event().wait(0.005)
    _, large_done = _in_thread(hold, 60)  # 60 + 60 > 100: waits for room
    _, small_done = _in_thread(hold, 30)  # 60 + 30 fits: goes ahead of the large one that waits
    assert small_done.wait(timeout=10)
    assert not large_done.wait(timeout=0.3) and budget.held == 60
    release_first.set()
    assert first_done.wait(timeout=10) and large_done.wait(timeout=10)
    assert budget.held == 0 and budget.high_water == 90


def test_a_request_larger_than_the_budget_goes_alone_and_a_resized_hold_gives_back_at_once():
    from thyroid_classifier.serving import MemoryBudget

    budget = MemoryBudget(100)
    release = threading.Event()
    entered: list[int] = []

    def hold(nbytes: int, keep: int, until: threading.Event) -> None:
        with budget.hold(nbytes) as held:
            entered.append(nbytes)
            held.resize(keep)
            held.resize(keep + 1000)  # never grows past what it waited for
            assert until.wait(timeout=30)

    _, huge_done = _in_thread(hold, 250, 250, release)  # more than the whole budget: alone, since nothing else is held
    while budget.held < 250:
        threading.Event().wait(0.005)
    _, small_done = _in_thread(hold, 1, 1, release)
    assert not small_done.wait(timeout=0.3) and entered == [250]  # nothing beside the one that took it all
    release.set()
    assert huge_done.wait(timeout=10) and small_done.wait(timeout=10) and budget.held == 0
    release.clear()
    _, a_done = _in_thread(hold, 80, 10, release)  # decoded: keeps 10 of its 80
    while 80 not in entered[2:]:
        threading.Event().wait(0.005)
    _, b_done = _in_thread(hold, 80, 10, release)  # fits once the first has given back 70
    while len(entered) < 4:
        threading.Event().wait(0.005)
    assert budget.held == 20
    release.set()
    assert a_done.wait(timeout=10) and b_done.wait(timeout=10) and budget.held == 0
    with pytest.raises(ValueError, match="at least 1 byte"):
        MemoryBudget(0)
    assert MemoryBudget(1).total == 1


def test_the_app_gives_memory_back_once_idle_after_a_burst_of_requests_and_never_after_a_lone_one():
    import time

    from thyroid_classifier.serving import GiveBackWhenIdle

    idle = GiveBackWhenIdle(after=0.3)
    with idle.request():
        pass
    time.sleep(0.5)
    assert idle.released == 0  # a lone request: nothing to give back, and the next one would pay the page faults
    first_in, second_in, done = threading.Event(), threading.Event(), threading.Event()

    def request(entered: threading.Event) -> None:
        with idle.request():
            entered.set()
            assert done.wait(timeout=30)

    threads = [threading.Thread(target=request, args=(e,)) for e in (first_in, second_in)]
    for thread in threads:
        thread.start()
    assert first_in.wait(timeout=10) and second_in.wait(timeout=10)
    done.set()
    for thread in threads:
        thread.join(timeout=10)
    with idle.request():  # one more right after the burst, still running when the give-back is due: it waits for this one
        time.sleep(0.5)
    assert idle.released == 0
    time.sleep(0.6)
    assert idle.released == 1  # once, after the idle time
    time.sleep(0.5)
    assert idle.released == 1


def test_the_background_worker_runs_jobs_on_one_low_priority_thread_and_gives_memory_back(monkeypatch):
    """Large decodes run here: one thread (they take turns), at a lower CPU priority than the model's,
    an exception raised in the caller, and the freed memory given back after every job."""
    import os

    from thyroid_classifier import serving

    given_back: list[int] = []
    monkeypatch.setattr(serving, "release_free_memory", lambda: given_back.append(threading.get_ident()) or True)
    worker = serving.BackgroundWorker(niceness=7)

    def where() -> tuple[int, int]:
        return threading.get_ident(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    first, second = worker.run(where), worker.run(where)
    assert first[0] == second[0] != threading.get_ident()  # one thread, not the caller's
    assert first[1] >= os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 7 or first[1] == 19  # niced (19: the most there is)
    with pytest.raises(ZeroDivisionError):
        worker.run(lambda: 1 / 0)
    assert given_back == [first[0]] * 3  # after each job, the failed one too
