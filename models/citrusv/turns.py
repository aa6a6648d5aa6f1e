"""A lock that is handed out in the order it was asked for.

The engine answers one question at a time (its slice cache and KV prefixes are shared state),
and a question over a slice range takes the engine slice chunk by slice chunk, so that others
get their turn in between. Python's own locks do not give that turn: a thread that releases a
lock and at once asks for it again usually gets it back before a waiting thread wakes, so a
range over a CT's 133 slices would still hold every other question until its last slice.
`TurnLock` serves the threads in the order they asked (first come, first served); the thread
holding it may take it again (reentrant), as the engine's methods call one another."""

from __future__ import annotations

import threading


class TurnLock:
    """A reentrant lock served first come, first served."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._next_turn = 0  # the turn the next thread to ask gets
        self._serving = 0  # the turn that may take the lock once it is free
        self._abandoned: set[int] = set()  # turns whose threads stopped waiting

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._changed:
            if self._owner == me:
                self._depth += 1
                return True
            turn = self._next_turn
            self._next_turn += 1
            try:
                while self._owner is not None or self._serving != turn:
                    self._changed.wait()
            except BaseException:  # interrupted while waiting: give the turn up
                self._abandoned.add(turn)
                self._skip_abandoned()
                raise
            self._owner, self._depth = me, 1
            return True

    def _skip_abandoned(self) -> None:
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._changed.notify_all()

    def release(self) -> None:
        with self._changed:
            if self._owner != threading.get_ident():
                raise RuntimeError("TurnLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._skip_abandoned()

    @property
    def waiting(self) -> int:
        """How many threads wait for their turn."""
        with self._changed:
            return (self._next_turn - self._serving - len(self._abandoned)
                    - (self._owner is not None))

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
