"""What the engine learns while it serves: observed interactions, kept per user and in an append-only log.

The state is independent of the model version: a swap keeps it, and each version derives what it needs
from it (a user's seen set, its recent history, its folded-in vector). The log is JSON lines, flushed
(and optionally fsynced) before ``observe`` returns, so a restart replays every event and offline
retraining loses none.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from ._core import RecEngineError


class EventLogError(RecEngineError):
    """The event log cannot be read back (a line that is not an event)."""


class OnlineState:
    """Observed items per user (in order), with a version counter per user for cache invalidation.

    Thread-safe: ``observe`` may run while requests read. Readers get immutable snapshots (arrays)."""

    def __init__(self, log_path: str | os.PathLike | None = None, *, fsync: bool = False):
        self._lock = threading.Lock()
        self._items: dict[int, np.ndarray] = {}
        self._stamp: dict[int, int] = {}
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
                    user, items = int(ev["user"]), [int(i) for i in ev["items"]]
                except (ValueError, KeyError, TypeError) as e:
                    if not line.endswith("\n"):      # a torn last line of a crash: the event never returned
                        break
                    raise EventLogError(f"{path}:{lineno}: not an event ({e})") from None
                self._add(user, np.asarray(items, np.int64))

    def _add(self, user: int, items: np.ndarray) -> None:
        old = self._items.get(user)
        self._items[user] = items if old is None else np.concatenate([old, items])
        self._stamp[user] = self._stamp.get(user, 0) + 1
        self.n_events += len(items)

    def observe(self, user: int, items: np.ndarray, **extra) -> None:
        """Record that ``user`` interacted with ``items`` (in this order); logged before it returns."""
        items = np.asarray(items, np.int64).reshape(-1)
        with self._lock:
            if self._log is not None:
                rec = {"ts": time.time(), "user": int(user), "items": items.tolist(), **extra}
                self._log.write(json.dumps(rec) + "\n")
                self._log.flush()
                if self.fsync:
                    os.fsync(self._log.fileno())
            self._add(int(user), items)

    def items(self, user: int) -> np.ndarray | None:
        """Items observed for ``user`` since the start (None if none)."""
        return self._items.get(int(user))

    def stamp(self, user: int) -> int:
        """Changes each time ``user`` gets new events (0: never observed)."""
        return self._stamp.get(int(user), 0)

    def users(self) -> list[int]:
        with self._lock:
            return list(self._items)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
