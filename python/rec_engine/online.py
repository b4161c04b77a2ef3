"""What the engine learns while it serves: observed interactions, kept per user and in an append-only log.

The state is independent of the model version: it holds the user's own keys and item keys (never a
version's dense ids), so a swap keeps it, and each version derives what it needs from it (a user's seen
set, its recent history, its folded-in vector) through its key maps. The log is JSON lines, flushed (and
optionally fsynced) before ``observe`` returns, so a restart replays every event and offline retraining
loses none.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from ._core import RecEngineError


def _key(k):
    """A key as stored: a Python int or str (NumPy scalars become Python ones)."""
    if isinstance(k, np.generic):
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise TypeError(f"keys are integers or strings, got {type(k).__name__}")
    return k


class EventLogError(RecEngineError):
    """The event log cannot be read back (a line that is not an event)."""


class OnlineState:
    """Observed item keys per user key (in order), with a counter per user for cache invalidation.

    Thread-safe: ``observe`` may run while requests read. Readers get snapshots (tuples); an event
    costs O(its items), whatever the user's history."""

    def __init__(self, log_path: str | os.PathLike | None = None, *, fsync: bool = False):
        self._lock = threading.Lock()
        self._items: dict = {}       # user key -> list of item keys (appended in place)
        self._stamp: dict = {}
        self.n_events = 0
        self.fsync = fsync
        self.log_path = Path(log_path) if log_path is not None else None
        self._log = None
        if self.log_path is not None:
            if self.log_path.exists():
                self._replay(self.log_path)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")

    def _replay(self, path: Path) -> None:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ev = json.loads(line)
                    user, items = _key(ev["user"]), [_key(i) for i in ev["items"]]
                except (ValueError, KeyError, TypeError) as e:
                    if not line.endswith("\n"):      # a torn last line of a crash: the event never returned
                        break
                    raise EventLogError(f"{path}:{lineno}: not an event ({e})") from None
                self._add(user, items)

    def _add(self, user, items: list) -> None:
        self._items.setdefault(user, []).extend(items)
        self._stamp[user] = self._stamp.get(user, 0) + 1
        self.n_events += len(items)

    def observe(self, user, items, **extra) -> None:
        """Record that the user with key ``user`` interacted with the items with keys ``items`` (in this
        order; ints or strs, as checked by the engine); logged before it returns."""
        items = [_key(i) for i in (items.tolist() if isinstance(items, np.ndarray) else items)]
        user = _key(user)
        with self._lock:
            if self._log is not None:
                rec = {"ts": time.time(), "user": user, "items": items, **extra}
                self._log.write(json.dumps(rec) + "\n")
                self._log.flush()
                if self.fsync:
                    os.fsync(self._log.fileno())
            self._add(user, items)

    def items(self, user) -> tuple | None:
        """Item keys observed for the user with key ``user`` since the start, oldest first (None if none)."""
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
        """Changes each time ``user`` gets new events (0: never observed)."""
        return self._stamp.get(_key(user), 0)

    def users(self) -> list:
        with self._lock:
            return list(self._items)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
