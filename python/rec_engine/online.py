"""What the engine learns while it serves: observed interactions per user, backed by an event store.

The state is independent of the model version: it holds the user's own keys and item keys (never a
version's dense ids), so a swap keeps it, and each version derives what it needs from it (a user's seen
set, its recent history, its folded-in vector) through its key maps. Every event is written to the
:class:`~rec_engine.events.EventStore` (acknowledged: committed) before ``observe`` returns, and the state
is read back from the store in bulk at start (:meth:`EventStore.load_state`, within ``window_days``), so a
restart knows what was observed and offline retraining loses nothing. With ``follow_s``, a thread reads
what other replicas (processes sharing the store) wrote, so an event observed on one is seen by all.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Sequence

import numpy as np

from .events import INTERACTIONS, Event, EventLogError, EventStore, check_key, user_hash

__all__ = ["OnlineState", "EventLogError"]


def _key(k):
    """A key as stored: a Python int or str (NumPy scalars become Python ones)."""
    return check_key(k)


class OnlineState:
    """Observed item keys per user key (in order), with a stamp per user for cache invalidation.

    Thread-safe: ``observe`` may run while requests read. Readers get snapshots (tuples); an event
    costs O(its items), whatever the user's history. Stamps come from one counter, so a user's stamp
    never repeats (not even after :meth:`forget`)."""

    def __init__(self, store: EventStore | None = None, *, window_days: float | None = None,
                 follow_s: float | None = None, owns_store: bool = True):
        self._lock = threading.Lock()
        self._items: dict = {}       # user key -> list of item keys (appended in place)
        self._stamp: dict = {}
        self._keys: dict = {}        # item key -> the one object of that value every history refers to
        self._clock = itertools.count(1)
        self.n_events = 0
        self.store, self.owns_store = store, owns_store
        if window_days is not None and not window_days > 0:
            raise ValueError(f"window_days must be > 0, got {window_days!r}")
        self.window_days = window_days
        self.load_seconds = 0.0
        self._cursor = None
        if store is not None:
            t0 = time.perf_counter()
            self._cursor = store.events_after(None)[1] if follow_s else None
            self._forgotten = store.forgotten() if follow_s else set()
            since = None if window_days is None else time.time() - window_days * 86400.0
            keys = self._keys
            for user, items in store.load_state(since).items():
                self._items[user] = [keys.setdefault(i, i) for i in items]
                self._stamp[user] = next(self._clock)
                self.n_events += len(items)
            self.load_seconds = time.perf_counter() - t0
        self._stop = threading.Event()
        self._follower = None
        if follow_s:
            if store is None:
                raise ValueError("follow_s needs an event store")
            if not follow_s > 0:
                raise ValueError(f"follow_s must be > 0, got {follow_s!r}")
            self.follow_s = float(follow_s)
            self._follower = threading.Thread(target=self._follow, name="rec-engine-follow", daemon=True)
            self._follower.start()

    def _add(self, user, items: list) -> None:
        keys = self._keys                   # one object per distinct item key: an event then costs a list slot
        self._items.setdefault(user, []).extend([keys.setdefault(i, i) for i in items])
        self._stamp[user] = next(self._clock)
        self.n_events += len(items)

    def observe(self, user, items: Sequence, *, kind: str = "click", request_id: str | None = None,
                value: float | None = None, version: str | None = None, attrs=None,
                ts: float | None = None) -> None:
        """Record that the user with key ``user`` interacted with the items with keys ``items`` (in this
        order; ints or strs, as checked by the engine); in the store before it returns."""
        items = [_key(i) for i in (items.tolist() if isinstance(items, np.ndarray) else items)]
        user = _key(user)
        if kind not in INTERACTIONS:
            raise ValueError(f"kind must be one of {INTERACTIONS}, got {kind!r}")
        if self.store is not None:
            now = time.time() if ts is None else ts
            self.store.append([Event(kind, user, i, now, request_id, version, value, attrs=attrs) for i in items])
        with self._lock:
            self._add(user, items)

    def apply(self, events: Sequence[Event]) -> int:
        """Add other replicas' interactions (already stored) to this state; returns how many applied."""
        n = 0
        with self._lock:
            for e in events:
                if e.kind in INTERACTIONS:
                    self._add(e.user, [e.item])
                    n += 1
        return n

    def _follow(self) -> None:
        """Apply what other writers store: a store that can wait for new events (Redis: XREAD BLOCK) is asked
        to wait up to ``follow_s`` and answers as soon as one comes; others are polled every ``follow_s``."""
        import inspect

        blocking = "wait_s" in inspect.signature(self.store.events_after).parameters
        next_forget_check = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_forget_check:
                next_forget_check = time.monotonic() + max(self.follow_s, 1.0)
                try:
                    self._drop_forgotten()
                except Exception:    # noqa: BLE001 - retried at the next check
                    pass
            if not blocking and self._stop.wait(self.follow_s):
                return
            try:
                if blocking:
                    got, self._cursor = self.store.events_after(self._cursor, wait_s=self.follow_s)
                else:
                    got, self._cursor = self.store.events_after(self._cursor)
            except Exception:        # noqa: BLE001 - a store that is closing or briefly unreachable: retry
                if self._stop.wait(self.follow_s):
                    return
                continue
            if got:
                self.apply(got)

    def _drop_forgotten(self) -> None:
        """Users another process forgot (their key hashes are new in the store's list): out of this state too."""
        hashes = self.store.forgotten()
        new = hashes - self._forgotten
        self._forgotten = hashes
        if not new:
            return
        with self._lock:
            gone = [u for u in self._items if user_hash(u) in new]
            for u in gone:
                self.n_events -= len(self._items.pop(u))
                self._stamp[u] = next(self._clock)

    def forget(self, user) -> int:
        """Erase ``user``'s state and (through the store) every event of the user; returns the events erased."""
        user = _key(user)
        n = self.store.forget(user) if self.store is not None else 0
        with self._lock:
            gone = self._items.pop(user, None)
            if gone is not None:
                self.n_events -= len(gone)
            self._stamp[user] = next(self._clock)       # cached views of the user are stale now
        return n if self.store is not None else len(gone or ())

    def items(self, user) -> tuple | None:
        """Item keys observed for the user with key ``user``, oldest first (None if none)."""
        with self._lock:
            got = self._items.get(_key(user))
            return None if got is None else tuple(got)

    def snapshot(self, user) -> tuple[int, tuple]:
        """``(stamp, item keys)`` of ``user``, read together (stamp 0 and () for a user never observed)."""
        user = _key(user)
        with self._lock:
            got = self._items.get(user)
            return (self._stamp.get(user, 0), () if got is None else tuple(got))

    def stamp(self, user) -> int:
        """Changes each time ``user`` gets new events or is forgotten (0: never observed)."""
        return self._stamp.get(_key(user), 0)

    def users(self) -> list:
        with self._lock:
            return [u for u, items in self._items.items() if items]

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join()
            self._follower = None
        if self.store is not None and self.owns_store:
            self.store.close()
