"""Behaviour collection: the event store, the contract between serving and the next training.

Events (:class:`Event`) are impressions (a request id, the model version, the items shown in order with
their scores), clicks, conversions (with a value) and ratings (with the rating), each with a timestamp,
the user's key, an optional request id that ties feedback to the impression it answers, and free-form
attributes. Keys are the user's own (ints or strings), stored with their type.

:class:`EventStore` is the interface; :class:`SqliteEventStore` its embedded default (one SQLite file in WAL
mode): an append is acknowledged once its transaction has committed, so a process killed at any point
(SIGKILL included) loses no acknowledged event, and the file opens after any crash (SQLite's journal
recovery). ``durable=True`` adds ``synchronous=FULL``: an fsync per commit, so a power loss loses nothing
either; the default (``NORMAL``) may lose the last commits to a power loss, never to a process crash.
Writes from many threads are group-committed: one writer thread takes every append waiting and commits
them in one transaction. Several processes may share one file (``serve --workers N``):
:meth:`EventStore.events_after` lets each read what the others wrote.

:func:`open_store` opens a store from a path (a ``.jsonl`` log of older releases is imported once into the
SQLite file beside it) or a ``redis://`` URL (:mod:`rec_engine.events_redis`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ._core import RecEngineError

KINDS = ("impression", "click", "conversion", "rating", "item_added", "item_removed")
INTERACTIONS = ("click", "conversion", "rating")    # kinds that join the user's online state (seen set, history)
USER_KINDS = ("impression",) + INTERACTIONS          # kinds about a user (what forget erases); the others are
                                                     # the catalogue's (item_added / item_removed)
SCHEMA_VERSION = 1


class EventStoreError(RecEngineError):
    """The event store cannot be opened, read or written (a file that is not an event store, a full disk)."""


# the JSON-lines log of older releases raised this name
EventLogError = EventStoreError


def check_key(k, what: str = "key"):
    """A key as stored: a Python int (within int64) or str; NumPy scalars become Python ones."""
    if isinstance(k, np.generic):
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise TypeError(f"{what} must be an integer or a string, got {type(k).__name__}")
    if isinstance(k, int) and not -2**63 <= k < 2**63:
        raise ValueError(f"{what} {k} is outside int64")
    return k


def user_hash(user) -> str:
    """What the store keeps of a forgotten user: a one-way hash of the key (type-tagged), never the key."""
    return hashlib.sha256(f"{type(user).__name__}:{user}".encode()).hexdigest()


@dataclass(frozen=True)
class Event:
    """One observed event.

    ``kind`` is one of :data:`KINDS`. ``item``: the item clicked, converted or rated (None for an
    impression); ``items`` / ``scores``: an impression's items in the order shown (position = index) and
    their scores; ``value``: a conversion's value or a rating; ``request_id``: the recommendation the
    event belongs to; ``version``: the model version that served it; ``attrs``: free-form JSON-able
    attributes; ``ts``: seconds since the epoch (now when not given). ``id`` is set by the store."""

    kind: str
    user: Any
    item: Any = None
    ts: float | None = None
    request_id: str | None = None
    version: str | None = None
    value: float | None = None
    items: tuple | None = None
    scores: tuple | None = None
    attrs: Mapping | None = None
    id: int | None = field(default=None, compare=False)

    def checked(self) -> "Event":
        """This event validated and normalized (TypeError / ValueError naming what is wrong)."""
        if self.kind not in KINDS:
            raise ValueError(f"event kind must be one of {KINDS}, got {self.kind!r}")
        user = check_key(self.user, "user")
        item, items, scores = self.item, self.items, self.scores
        if self.kind == "impression":
            if item is not None:
                raise ValueError("an impression names its items in items=, not item=")
            if items is None:
                raise ValueError("an impression needs items (the items shown, in order)")
            items = tuple(check_key(i, "item") for i in (items.tolist() if isinstance(items, np.ndarray) else items))
            if scores is not None:
                scores = tuple(float(s) for s in (scores.tolist() if isinstance(scores, np.ndarray) else scores))
                if len(scores) != len(items):
                    raise ValueError(f"an impression has {len(items)} items but {len(scores)} scores")
        else:
            if item is None:
                raise ValueError(f"a {self.kind} event needs item=")
            if items is not None or scores is not None:
                raise ValueError(f"a {self.kind} event names one item (item=), not items=")
            item = check_key(item, "item")
        value = self.value
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"value must be a number, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"value must be finite, got {value}")
        if self.kind == "rating" and value is None:
            raise ValueError("a rating event needs value= (the rating)")
        ts = time.time() if self.ts is None else self.ts
        if isinstance(ts, bool) or not isinstance(ts, (int, float, np.integer, np.floating)) or not math.isfinite(ts):
            raise ValueError(f"ts must be a finite number of seconds, got {ts!r}")
        for name in ("request_id", "version"):
            got = getattr(self, name)
            if got is not None and not isinstance(got, str):
                raise TypeError(f"{name} must be a string, got {type(got).__name__}")
        attrs = self.attrs
        if attrs is not None:
            if not isinstance(attrs, Mapping):
                raise TypeError(f"attrs must be a mapping, got {type(attrs).__name__}")
            try:
                json.dumps(attrs, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"attrs must be JSON (finite numbers, strings, lists, mappings): {e}") from None
            attrs = dict(attrs)
        return Event(self.kind, user, item, float(ts), self.request_id, self.version, value, items, scores,
                     attrs, self.id)


def _dumps(x) -> str | None:
    return None if x is None else json.dumps(x, separators=(",", ":"))


def _loads(x):
    return None if x is None else json.loads(x)


_COLUMNS = "id, ts, kind, user, item, request_id, version, value, items, scores, attrs"


def _event_of(row) -> Event:
    eid, ts, kind, user, item, rid, version, value, items, scores, attrs = row
    items, scores = _loads(items), _loads(scores)
    return Event(kind, user, item, ts, rid, version, value, None if items is None else tuple(items),
                 None if scores is None else tuple(scores), _loads(attrs), eid)


#: the columns :meth:`EventStore.scan` can return
SCAN_COLUMNS = ("id", "ts", "kind", "user", "item", "request_id", "version", "value", "items", "scores", "attrs")
_JSON_COLUMNS = frozenset(("items", "scores", "attrs"))
_SCAN_GETTERS = {c: (lambda e, _c=c: getattr(e, _c)) for c in SCAN_COLUMNS}


def _json_getter(column: str, decode: bool):
    """An event's ``items`` / ``scores`` / ``attrs`` as :meth:`EventStore.scan` returns it."""
    if column == "attrs":
        return (lambda e: None if e.attrs is None else dict(e.attrs)) if decode else (lambda e: _dumps(e.attrs))
    if decode:
        return lambda e: None if getattr(e, column) is None else list(getattr(e, column))
    return lambda e: None if getattr(e, column) is None else _dumps(list(getattr(e, column)))


def _scan_columns(columns) -> tuple:
    """``columns`` of :meth:`EventStore.scan` checked: a tuple of names from :data:`SCAN_COLUMNS`."""
    cols = (columns,) if isinstance(columns, str) else tuple(columns)
    bad = [c for c in cols if c not in SCAN_COLUMNS]
    if bad or not cols:
        raise ValueError(f"scan needs columns among {SCAN_COLUMNS}, got {list(cols)}")
    return cols


def _scan_kinds(kinds) -> list | None:
    if kinds is None:
        return None
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown event kinds {bad}; kinds are {KINDS}")
    return kinds


class EventStore:
    """The interface every event store implements (SQLite embedded, Redis Streams shared).

    ``append`` is the only write path for events; everything else reads or erases."""

    #: a store's name in errors and reports
    url: str = ""

    def append(self, events: Sequence[Event], *, wait: bool = True) -> list[int]:
        """Store ``events`` (validated first: nothing is stored if one is invalid). With ``wait`` (the
        default) it returns once they are committed, acknowledged: a crash after that loses none;
        without it, it returns at once (impressions, where throughput beats acknowledgement), and
        :meth:`flush` waits. Returns the events' ids (empty without ``wait``)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until every append made so far is committed."""

    def load_state(self, since: float | None = None) -> dict:
        """The online state in bulk: ``{user: [item, ...]}`` of the interactions (:data:`INTERACTIONS`) at or
        after ``since`` (seconds since the epoch; None: all), oldest first."""
        raise NotImplementedError

    def read(self, *, kinds: Iterable[str] | None = None, since: float | None = None, until: float | None = None,
             user=None, after_id: int = 0) -> Iterator[Event]:
        """Events in the order stored, filtered by kind, time ``[since, until)``, user, and id > ``after_id``."""
        raise NotImplementedError

    def scan(self, columns: Sequence[str], *, kinds: Iterable[str] | None = None, since: float | None = None,
             until: float | None = None, decode: bool = False) -> Iterator[tuple]:
        """The named ``columns`` of the events (filtered like :meth:`read`: kind, ``ts`` in ``[since, until)``),
        in the order stored, as plain tuples: no :class:`Event` built, nothing decoded that was not asked for.

        ``columns``: names among :data:`SCAN_COLUMNS` (``id``, ``ts``, ``kind``, ``user``, ``item``,
        ``request_id``, ``version``, ``value``, ``items``, ``scores``, ``attrs``), in the order wanted; a
        tuple per event holds them in that order (a 1-tuple for one column). Keys keep their type, ``ts`` and
        ``value`` are floats, a field not set is None. ``items`` / ``scores`` / ``attrs`` are their compact
        JSON text (``'["a",7]'``), or with ``decode`` what ``json.loads`` makes of it (lists, a dict).

        This default builds on :meth:`read`; stores implement it without the events (one query of those
        columns only)."""
        cols = _scan_columns(columns)
        get = [_SCAN_GETTERS[c] if c not in _JSON_COLUMNS else _json_getter(c, decode) for c in cols]
        events = self.read(kinds=_scan_kinds(kinds), since=since, until=until)
        return (tuple([g(e) for g in get]) for e in events)

    def events_after(self, cursor, *, exclude_origin: bool = True) -> tuple[list[Event], Any]:
        """Events appended after ``cursor`` (None: from now on) by other writers (``exclude_origin``: not by
        this store object), and the cursor to pass next time: how a replica follows the others."""
        raise NotImplementedError

    def forget(self, user) -> int:
        """Erase every event of ``user`` (and remember a hash of the key, so the next update skips the user
        in its base data too); returns the number of events erased."""
        raise NotImplementedError

    def forgotten(self) -> set[str]:
        """Hashes (:func:`user_hash`) of the users erased by :meth:`forget`."""
        raise NotImplementedError

    def drop_before(self, ts: float) -> int:
        """Erase events older than ``ts`` (the retention window); returns how many."""
        raise NotImplementedError

    def count(self, kind: str | None = None) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CREATE = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    user NOT NULL,
    item,
    request_id TEXT,
    version TEXT,
    value REAL,
    items TEXT,
    scores TEXT,
    attrs TEXT,
    origin TEXT
);
CREATE INDEX IF NOT EXISTS events_user ON events(user);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE INDEX IF NOT EXISTS events_request ON events(request_id) WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS forgotten (user_hash TEXT PRIMARY KEY, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class _Pending:
    __slots__ = ("rows", "done", "ids", "error")

    def __init__(self, rows, wait: bool):
        self.rows = rows
        self.done = threading.Event() if wait else None
        self.ids: list[int] = []
        self.error: BaseException | None = None


class SqliteEventStore(EventStore):
    """The embedded event store: one SQLite database file in WAL mode (see the module docstring).

    Parameters
    ----------
    path : str or Path
        The database file (created with its folder if missing).
    durable : bool
        ``synchronous=FULL`` (an fsync per commit: no loss on power failure) instead of ``NORMAL``
        (no loss on a process crash; the last commits may be lost on a power failure).
    retention_days : float, optional
        Erase events older than this at open and then about once a minute while writing.
    busy_timeout_s : float
        How long a write waits for another process holding the database's write lock.
    """

    def __init__(self, path, *, durable: bool = False, retention_days: float | None = None,
                 busy_timeout_s: float = 30.0):
        if retention_days is not None and (isinstance(retention_days, bool) or not retention_days > 0):
            raise ValueError(f"retention_days must be > 0, got {retention_days!r}")
        self.path = Path(path)
        self.url = str(self.path)
        self.durable, self.retention_days = bool(durable), retention_days
        self.origin = uuid.uuid4().hex[:16]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        try:
            self._wconn = self._connect()
            with self._wconn:
                self._wconn.executescript(_CREATE)
                got = self._wconn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if got is None:
                    self._wconn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif int(got[0]) > SCHEMA_VERSION:
                    raise EventStoreError(f"{self.path}: event store schema {got[0]} is newer than this "
                                          f"release's ({SCHEMA_VERSION})")
        except sqlite3.DatabaseError as e:
            raise EventStoreError(f"{self.path}: not an event store ({e})") from None
        self._rlock = threading.Lock()
        self._rconn = self._connect()          # reads, so they never wait behind the writer's commits
        self._rconn.execute("PRAGMA secure_delete=ON")   # erasures (forget) zero the bytes they free
        # group commit: appends wait in _pending; whoever holds _wlock (a caller that waits for its commit,
        # or the writer thread for appends that do not wait) takes everything waiting into one transaction
        self._pending: list[_Pending] = []
        self._plock = threading.Lock()
        self._wlock = threading.Lock()
        self._wake = threading.Event()        # appends without wait, and close, wake the writer thread
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._last_retention = 0.0
        self._writer = threading.Thread(target=self._write_loop, name="rec-engine-events", daemon=True)
        self._writer.start()
        if retention_days is not None:
            self._apply_retention()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise EventStoreError(f"{self.path}: cannot use WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
        return conn

    # ------------------------------------------------------------------ writes
    def append(self, events: Sequence[Event], *, wait: bool = True) -> list[int]:
        if isinstance(events, Event):
            events = [events]
        rows = []
        for ev in events:
            if not isinstance(ev, Event):
                raise TypeError(f"events must be Event objects, got {type(ev).__name__}")
            e = ev.checked()
            rows.append((e.ts, e.kind, e.user, e.item, e.request_id, e.version, e.value,
                         _dumps(None if e.items is None else list(e.items)),
                         _dumps(None if e.scores is None else list(e.scores)), _dumps(e.attrs), self.origin))
        if not rows:
            return []
        p = _Pending(rows, wait)
        with self._close_lock:               # never added after close() has committed the last ones
            if self._closed:
                raise EventStoreError(f"{self.url}: the event store is closed")
            with self._plock:
                self._pending.append(p)
        if not wait:
            self._wake.set()
            return []
        # the caller commits when the write lock is free, with everything else waiting; else the lock's
        # holder commits p (it drains what waits until nothing does, also after it let the lock go)
        self._drain()
        while not p.done.wait(0.01):
            self._drain()
        self._maybe_retention()
        if p.error is not None:
            raise EventStoreError(f"{self.url}: events not stored ({p.error})") from p.error
        return p.ids

    def _take(self) -> list:
        with self._plock:
            batch, self._pending = self._pending, []
        return batch

    def _drain(self) -> None:
        while self._pending and self._wlock.acquire(blocking=False):
            try:
                while True:
                    batch = self._take()
                    if not batch:
                        break
                    self._commit(batch)
            finally:
                self._wlock.release()

    def flush(self) -> None:
        with self._wlock:
            batch = self._take()
            if batch:
                self._commit(batch)

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(None if self.retention_days is None else 60.0)
            self._wake.clear()
            self.flush()
            if self._stopping:
                return
            self._maybe_retention()

    def _maybe_retention(self) -> None:
        """Erase what left the retention window, at most about once a minute (never under the write lock)."""
        if self.retention_days is None or time.monotonic() - self._last_retention <= 60:
            return
        try:
            self._apply_retention()
        except Exception:                    # noqa: BLE001 - a busy or closing database: next time
            pass

    def _commit(self, batch: list[_Pending]) -> None:
        conn = self._wconn
        error = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for p in batch:
                    if len(p.rows) == 1:
                        cur = conn.execute("INSERT INTO events (ts, kind, user, item, request_id, version, value, "
                                           "items, scores, attrs, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?)", p.rows[0])
                        p.ids = [cur.lastrowid]
                    elif p.rows:
                        conn.executemany("INSERT INTO events (ts, kind, user, item, request_id, version, value, "
                                         "items, scores, attrs, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?)", p.rows)
                        last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                        p.ids = list(range(last - len(p.rows) + 1, last + 1))   # consecutive under the write lock
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except Exception as e:               # noqa: BLE001 - handed to every waiter of the batch
            error = e
            for p in batch:
                p.ids = []
        for p in batch:
            p.error = error
            if p.done is not None:
                p.done.set()

    def _apply_retention(self) -> None:
        self._last_retention = time.monotonic()
        self.drop_before(time.time() - self.retention_days * 86400.0)

    # ------------------------------------------------------------------ reads
    def _query(self, sql: str, args=()) -> list:
        self.flush()                         # reads see this store's own writes, the unacknowledged ones too
        with self._rlock:
            if self._closed:
                raise EventStoreError(f"{self.url}: the event store is closed")
            return self._rconn.execute(sql, args).fetchall()

    def load_state(self, since: float | None = None) -> dict:
        # one row per user, its items as a JSON array built by SQLite in id order (the inner ORDER BY
        # feeds the grouping in that order); Python only decodes one array per user
        marks = ",".join("?" * len(INTERACTIONS))
        where = f"kind IN ({marks})" + ("" if since is None else " AND ts >= ?")
        args = list(INTERACTIONS) + ([] if since is None else [float(since)])
        # NOT INDEXED: one sequential pass over the table and a sort beats the user index's lookup per row
        # (1M events: 1.05 s against 2.9 s)
        rows = self._query(f"SELECT user, json_group_array(item) FROM (SELECT user, item FROM events NOT INDEXED "
                           f"WHERE {where} ORDER BY user, id) GROUP BY user", args)
        return {u: json.loads(items) for u, items in rows}

    def read(self, *, kinds=None, since=None, until=None, user=None, after_id: int = 0,
             batch: int = 10_000) -> Iterator[Event]:
        where, args = ["id > ?"], [int(after_id)]
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError(f"unknown event kinds {bad}; kinds are {KINDS}")
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            args += kinds
        if since is not None:
            where.append("ts >= ?")
            args.append(float(since))
        if until is not None:
            where.append("ts < ?")
            args.append(float(until))
        if user is not None:
            where.append("user = ?")
            args.append(check_key(user, "user"))
        last = int(after_id)
        while True:                          # pages by id, so a long read never holds the database
            args[0] = last
            rows = self._query(f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY id LIMIT {batch}",
                               args)
            for row in rows:
                yield _event_of(row)
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def scan(self, columns, *, kinds=None, since=None, until=None, decode: bool = False,
             batch: int = 10_000) -> Iterator[tuple]:
        """See :meth:`EventStore.scan`: one SELECT of those columns per page of ``batch`` ids (pages by id
        range, as :meth:`read` pages by id, so a long scan never holds the database; rows appended during
        the scan are seen)."""
        cols = _scan_columns(columns)
        kinds = _scan_kinds(kinds)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        since = None if since is None else float(since)
        until = None if until is None else float(until)
        return self._scan_rows(cols, kinds, since, until, decode, batch)

    def _scan_rows(self, cols, kinds, since, until, decode, batch) -> Iterator[tuple]:
        where, args = ["id > ?", "id <= ?"], [0, 0]
        if kinds is not None:
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            args += kinds
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        sql = f"SELECT {', '.join(cols)} FROM events WHERE {' AND '.join(where)}"
        js = [j for j, c in enumerate(cols) if c in _JSON_COLUMNS] if decode else []
        lo = 0
        hi = self._query("SELECT COALESCE(MIN(id) - 1, 0), COALESCE(MAX(id), 0) FROM events")[0]
        lo, hi = max(lo, hi[0]), hi[1]
        while True:
            if lo >= hi:                    # the end seen: rows appended since are read too
                hi = self._query("SELECT COALESCE(MAX(id), 0) FROM events")[0][0]
                if lo >= hi:
                    return
            args[0], args[1] = lo, lo + batch
            rows = self._query(sql, args)  # (id ranges: no id column to strip from each row)
            if js:
                for row in rows:
                    row = list(row)
                    for j in js:
                        if row[j] is not None:
                            row[j] = json.loads(row[j])
                    yield tuple(row)
            else:
                yield from rows
            if rows:
                lo += batch
            else:                           # a gap in the ids (erased rows): on to the next id there is
                nxt = self._query("SELECT MIN(id) FROM events WHERE id > ?", (lo + batch,))[0][0]
                lo = lo + batch if nxt is None else max(lo + batch, nxt - 1)

    def events_after(self, cursor, *, exclude_origin: bool = True) -> tuple[list[Event], Any]:
        if cursor is None:
            return [], self._query("SELECT COALESCE(MAX(id), 0) FROM events")[0][0]
        sql = f"SELECT {_COLUMNS} FROM events WHERE id > ?" + (" AND origin IS NOT ?" if exclude_origin else "")
        self.flush()
        with self._rlock:                    # one snapshot for the rows and the max id: another writer's commit
            if self._closed:                 # between the two must not move the cursor past its events
                raise EventStoreError(f"{self.url}: the event store is closed")
            conn = self._rconn
            conn.execute("BEGIN")
            try:
                rows = conn.execute(sql + " ORDER BY id", (int(cursor), self.origin) if exclude_origin
                                    else (int(cursor),)).fetchall()
                last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0] if not rows \
                    else rows[-1][0]
            finally:
                conn.execute("COMMIT")
        return [_event_of(r) for r in rows], max(int(cursor), last)

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return self._query("SELECT COUNT(*) FROM events")[0][0]
        return self._query("SELECT COUNT(*) FROM events WHERE kind = ?", (kind,))[0][0]

    def forgotten(self) -> set[str]:
        return {h for (h,) in self._query("SELECT user_hash FROM forgotten")}

    # ------------------------------------------------------------------ erasure
    def _erase(self, statements: list, *, checkpoint: bool = False) -> int:
        """Run ``statements`` (``(sql, args)`` pairs) in one write transaction after this store's pending
        appends; returns the rows the first one changed. ``checkpoint``: then move the WAL's pages into the
        main file and truncate it, so erased rows' bytes do not linger there."""
        self.flush()
        with self._rlock:
            if self._closed:
                raise EventStoreError(f"{self.url}: the event store is closed")
            conn = self._rconn
            conn.execute("BEGIN IMMEDIATE")
            try:
                n = conn.execute(*statements[0]).rowcount
                for st in statements[1:]:
                    conn.execute(*st)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if checkpoint:                   # secure_delete zeroed the freed pages; out of the WAL too
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def forget(self, user) -> int:
        user = check_key(user, "user")
        kinds = ",".join("?" * len(USER_KINDS))
        return self._erase([(f"DELETE FROM events WHERE user = ? AND kind IN ({kinds})", (user, *USER_KINDS)),
                            ("INSERT OR REPLACE INTO forgotten VALUES (?, ?)", (user_hash(user), time.time()))],
                           checkpoint=True)

    def drop_before(self, ts: float) -> int:
        return self._erase([("DELETE FROM events WHERE ts < ?", (float(ts),))])

    # ------------------------------------------------------------------ import, close
    def import_jsonl(self, path) -> int:
        """Import a JSON-lines event log of older releases (``{"ts", "user", "items", ...}`` per line, each
        item a click), once: the import is recorded, and a later call for the same file imports only what
        was appended since. A torn last line (a crash mid-write) is skipped; any other line that is not an
        event is an :class:`EventStoreError` naming it, and nothing of the file is imported."""
        path = Path(path)
        key = f"import:{path.resolve()}"
        got = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        done = int(got[0][0]) if got else 0
        data = path.read_bytes()
        if done > len(data):              # the log was replaced: nothing of it is trusted to be new
            raise EventStoreError(f"{path}: shorter than when it was imported ({len(data)} < {done} bytes)")
        events, end, pos = [], done, done
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:                         # a torn last line: the event never returned to its caller
                break
            line = data[pos:nl]
            pos = nl + 1
            end = pos
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ts, user, items = float(rec.get("ts", time.time())), rec["user"], rec["items"]
                extra = {k: v for k, v in rec.items() if k not in ("ts", "user", "items")}
                for item in items:
                    events.append(Event("click", user, item, ts=ts, attrs=extra or None).checked())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                lineno = data.count(b"\n", 0, nl) + 1
                raise EventStoreError(f"{path}:{lineno}: not an event ({e})") from None
        if events:
            self.append(events)
        self.flush()
        with self._rlock:
            self._rconn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(end)))
        return len(events)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._wake.set()
            self._writer.join()
            self.flush()                      # what was appended while the writer stopped
            with self._rlock:
                self._rconn.close()
            self._wconn.close()


def open_store(where, *, durable: bool = False, retention_days: float | None = None) -> EventStore:
    """An event store from ``where``: an :class:`EventStore` (returned as is), a ``redis://`` URL (a
    :class:`~rec_engine.events_redis.RedisEventStore`), a ``.jsonl`` log of older releases (imported once
    into the SQLite file of the same name with ``.db``, which is returned), or the path of a SQLite file."""
    if isinstance(where, EventStore):
        return where
    if isinstance(where, str) and where.startswith(("redis://", "rediss://", "unix://")):
        from .events_redis import RedisEventStore
        return RedisEventStore(where, retention_days=retention_days)
    if not isinstance(where, (str, os.PathLike)):
        raise TypeError(f"an event store is a path, a redis:// URL or an EventStore, got {type(where).__name__}")
    path = Path(where)
    if path.suffix == ".jsonl":
        store = SqliteEventStore(path.with_suffix(".db"), durable=durable, retention_days=retention_days)
        if path.exists():
            try:
                store.import_jsonl(path)
            except BaseException:
                store.close()
                raise
        return store
    return SqliteEventStore(path, durable=durable, retention_days=retention_days)
