"""Questions take turns at the engine: a question over a slice range holds the engine one
chunk of slices at a time, and a question asked meanwhile is answered between two chunks,
not after the range's last slice (before, the range held the engine from its first slice to
its last: on a CT's 133 slices every other radiologist's question waited for all of them).
A closer look takes a turn per model pass in the same way."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from citrusv.turns import TurnLock


def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_turn_lock_serves_threads_in_the_order_they_asked():
    """Python's locks let a thread that releases and at once asks again take the lock back
    before a waiting thread wakes; here the waiting threads come first."""
    lock, order = TurnLock(), []

    def take(name):
        with lock:
            order.append(name)

    lock.acquire()
    with lock:  # reentrant: the holder takes it again without waiting for itself
        pass
    b = threading.Thread(target=take, args=("b",))
    b.start()
    _until(lambda: lock.waiting == 1)
    c = threading.Thread(target=take, args=("c",))
    c.start()
    _until(lambda: lock.waiting == 2)
    lock.release()
    take("a")  # asks again at once: after b and c
    b.join(5)
    c.join(5)
    assert order == ["b", "c", "a"] and lock.waiting == 0
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.release()


def _volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 400, size=(6, 64, 64)).astype(np.int16)


def _asked_meanwhile(engine, method: str, name: str, nth: int, image, call):
    """Run `call()` with a one-slice question asked while the engine's `method` (one model
    pass) runs for the `nth` time and holds the engine; (what `call` returns, the order of the
    passes, named `name` and numbered, and the question, the question's answer)."""
    events, answered = [], {}
    original = getattr(engine, method)

    def question():
        answered["r"] = engine.ask(image, "Segment the spleen.", window="abdomen")
        events.append("question")

    def one_pass(*args, **kwargs):
        events.append(f"{name} {len(events)}")
        if len(events) == nth:  # this pass holds the engine when the question comes
            asking = threading.Thread(target=question)
            asking.start()
            _until(lambda: engine._lock.waiting == 1)
            answered["thread"] = asking
        return original(*args, **kwargs)

    setattr(engine, method, one_pass)
    try:
        out = call()
    finally:
        delattr(engine, method)
        answered["thread"].join(30)
    return out, events, answered["r"]


def _same_masks(a, b) -> None:
    assert [m.label for m in a.masks] == [m.label for m in b.masks]
    for x, y in zip(a.masks, b.masks):
        np.testing.assert_array_equal(x.array, y.array)


def test_a_question_asked_during_a_range_is_answered_between_its_chunks(fitted_engine):
    engine = fitted_engine
    vol = _volume()

    def ask_range():
        return engine.ask_volume(vol, "Segment the liver.", window="abdomen", batch_size=1)

    alone = ask_range()
    shared, events, question = _asked_meanwhile(engine, "_run_batch", "chunk", 3, vol[3],
                                                ask_range)
    assert events == ["chunk 0", "chunk 1", "chunk 2", "question", "chunk 4", "chunk 5",
                      "chunk 6"]
    assert question.task == "segment"
    # taking turns changed nothing in the range's answer
    assert shared.answer == alone.answer and shared.text == alone.text
    _same_masks(shared, alone)


def test_a_range_is_told_its_progress_and_stops_where_progress_raises(fitted_engine):
    engine = fitted_engine
    vol = _volume()
    seen = []

    class Stop(Exception):
        pass

    def progress(asked, total):
        seen.append((asked, total))
        if asked >= 4:
            raise Stop

    with pytest.raises(Stop):
        engine.ask_volume(vol, "Segment the liver.", slices=range(1, 6), window="abdomen",
                          batch_size=2, progress=progress)
    assert seen == [(0, 5), (2, 5), (4, 5)]
    assert engine._lock.waiting == 0 and engine.ask(vol[0], "Segment the liver.").task


def test_a_question_asked_during_a_closer_look_is_answered_between_its_looks(fitted_engine):
    """A closer look at several regions takes one turn per region's look (and one for its
    first pass), so a question asked meanwhile does not wait for all of them."""
    engine = fitted_engine
    ct = _volume()[2]
    rois = [[4, 4, 30, 30], [34, 34, 60, 60], [4, 34, 30, 60]]

    def look():
        return engine.closer_look(ct, "Segment the liver.", roi=rois, window="abdomen")

    alone = look()
    shared, events, question = _asked_meanwhile(engine, "_look", "look", 1, ct, look)
    assert events == ["look 0", "question", "look 2", "look 3"]
    assert question.task == "segment"
    assert shared.answer == alone.answer and shared.closer_look == alone.closer_look
    _same_masks(shared, alone)
