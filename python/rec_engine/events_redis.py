"""The shared event store: :class:`RedisEventStore`, the :class:`~rec_engine.events.EventStore` interface on a
Redis Stream, so several engine replicas (processes or machines) write to and follow one log of events.

Layout in Redis (``stream`` defaults to ``rec_engine:events``):

- ``<stream>``: the stream, one entry per event, with an auto id (``*``: ``<ms>-<seq>`` from the Redis
  server's clock, increasing). The entry is a flat hash: ``kind``, ``user``, ``ts`` (``repr`` of the float),
  ``origin`` (the writing store object), and when set ``item``, ``request_id``, ``version``, ``value``,
  ``items`` / ``scores`` / ``attrs`` (JSON). Keys keep their type: ``i:<int>`` or ``s:<str>``.
- ``<stream>:forgotten``: a set of :func:`~rec_engine.events.user_hash` of the users erased by ``forget``.
- ``<stream>:meta``: a hash with the layout's ``schema`` version.

Differences from :class:`~rec_engine.events.SqliteEventStore`, all forced by streams:

- **Ids are strings**: an event's id (``Event.id``, what :meth:`append` returns) is its stream id, such as
  ``"1718000000123-0"``; ``read(after_id=...)`` and the cursors of :meth:`events_after` are such strings
  (``0`` or ``"0"``: from the start). They order like the SQLite ids (arrival order) but are not ints.
- **Retention goes by arrival time**: :meth:`drop_before` (and ``retention_days``) trims by the stream id,
  i.e. by when the Redis server received the event, not by the event's own ``ts`` (a client may stamp
  events with another clock, or late). ``since`` / ``until`` filters of reads go by ``ts``, as on SQLite.
- **Durability is the server's**: an append is acknowledged once Redis has applied it in memory; whether it
  survives a Redis crash is Redis's persistence setting (``appendonly yes`` with ``appendfsync always``:
  nothing acknowledged is lost; ``everysec``: up to a second; no persistence: all of it). A crash of the
  engine process never loses an acknowledged event. An append whose reply is lost to a dropped connection
  may be retried by the client and stored twice (at least once).
- **A batch is all or nothing**: the XADDs of one :meth:`append` are one ``MULTI``/``EXEC`` transaction,
  sent in one round trip: all are applied together or (connection lost before ``EXEC``, server out of
  memory) none. Events are validated (:meth:`Event.checked`) before anything is sent.
- **Filtered reads scan**: a stream has no secondary index, so ``read(user=...)``, ``count(kind)`` and
  ``forget`` scan the stream in pages, server side (a Lua script per page of ``page`` entries, so Redis is
  never held for long and only matching entries travel). ``forget`` is not atomic with concurrent appends
  of the same user: it erases what it finds while scanning to the end, records the user's hash first.
- A failed append without ``wait`` is reported by the next :meth:`flush` (or :meth:`close`), which raises
  :class:`~rec_engine.events.EventStoreError` naming how many events were lost.
"""
from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from .events import (INTERACTIONS, KINDS, USER_KINDS, SCHEMA_VERSION, Event, EventStore, EventStoreError, _scan_columns, _scan_kinds,
                     check_key, user_hash)

try:
    import redis
except ImportError:          # pragma: no cover - the message says what to install
    redis = None

_ID = re.compile(r"^\d+(-\d+)?$")

# One page of a filtered scan, run inside Redis: XRANGE ``page`` entries after ``start``, keep those that
# match (kinds, ts in [since, until), user), and return them whole ('entries'), as user/item pairs
# ('pairs'), only the fields named in ARGV[8] ('fields': a flat list, nil for a field not set; ``id``: the
# entry's id), or only count ('count') or delete ('delete') them. Returns {scanned, last id, matched, out}.
_SCAN = """
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
local kinds, since, untl, user, mode = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local out, ids, n = {}, {}, 0
local cols = {}
if mode == 'fields' then for c in string.gmatch(ARGV[8] or '', '[^,]+') do cols[#cols + 1] = c end end
for _, e in ipairs(rows) do
  local f, h = e[2], {}
  for i = 1, #f, 2 do h[f[i]] = f[i + 1] end
  local ok = true
  if kinds ~= '' and not string.find(kinds, ',' .. (h.kind or '') .. ',', 1, true) then ok = false end
  if ok and user ~= '' and h.user ~= user then ok = false end
  if ok and (since or untl) then
    local ts = tonumber(h.ts or '')
    if ts == nil or (since and ts < since) or (untl and ts >= untl) then ok = false end
  end
  if ok then
    n = n + 1
    if mode == 'entries' then out[#out + 1] = e
    elseif mode == 'pairs' then out[#out + 1] = h.user or ''; out[#out + 1] = h.item or ''
    elseif mode == 'fields' then
      for _, c in ipairs(cols) do
        if c == 'id' then out[#out + 1] = e[1] else out[#out + 1] = h[c] or false end
      end
    elseif mode == 'delete' then ids[#ids + 1] = e[1] end
  end
end
if mode == 'delete' then
  for i = 1, #ids, 1000 do redis.call('XDEL', KEYS[1], unpack(ids, i, math.min(i + 999, #ids))) end
end
local last = ''
if #rows > 0 then last = rows[#rows][1] end
return {#rows, last, n, out}
"""


def _enc_key(k) -> bytes:
    return (f"i:{k}" if isinstance(k, int) else f"s:{k}").encode()


def _dec_key(s: bytes):
    s = s.decode()
    if s.startswith("i:"):
        return int(s[2:])
    if s.startswith("s:"):
        return s[2:]
    raise EventStoreError(f"not an event store entry: key {s!r} has no type tag")


def _str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _xread_rows(got) -> list:
    """The entries of a one-stream XREAD reply: [[stream, entries]] (RESP2) or {stream: [entries]} (RESP3)."""
    if not got:
        return []
    if isinstance(got, dict):
        (value,) = got.values()
        return value[0] if value else []
    return got[0][1]


def _json(x) -> bytes:
    return json.dumps(x, separators=(",", ":")).encode()


def _fields(e: Event, origin: bytes) -> dict:
    """The stream entry of a checked event (bytes, so a key that is not UTF-8 fails here, before sending)."""
    try:
        f = {b"kind": e.kind.encode(), b"user": _enc_key(e.user), b"ts": repr(e.ts).encode(), b"origin": origin}
        if e.item is not None:
            f[b"item"] = _enc_key(e.item)
        if e.request_id is not None:
            f[b"request_id"] = e.request_id.encode()
        if e.version is not None:
            f[b"version"] = e.version.encode()
    except UnicodeEncodeError as err:
        raise ValueError(f"event keys and strings must be encodable as UTF-8: {err}") from None
    if e.value is not None:
        f[b"value"] = repr(e.value).encode()
    if e.items is not None:
        f[b"items"] = _json(list(e.items))
    if e.scores is not None:
        f[b"scores"] = _json(list(e.scores))
    if e.attrs is not None:
        f[b"attrs"] = _json(e.attrs)
    return f


def _event_of(eid, flat) -> Event:
    """An event from a stream entry: ``flat`` is a dict or a flat [field, value, ...] list (bytes)."""
    h = flat if isinstance(flat, dict) else dict(zip(flat[0::2], flat[1::2]))
    try:
        items, scores, attrs, item = h.get(b"items"), h.get(b"scores"), h.get(b"attrs"), h.get(b"item")
        value, rid, version = h.get(b"value"), h.get(b"request_id"), h.get(b"version")
        return Event(h[b"kind"].decode(), _dec_key(h[b"user"]), None if item is None else _dec_key(item),
                     float(h[b"ts"]), None if rid is None else rid.decode(),
                     None if version is None else version.decode(), None if value is None else float(value),
                     None if items is None else tuple(json.loads(items)),
                     None if scores is None else tuple(json.loads(scores)),
                     None if attrs is None else json.loads(attrs),
                     eid.decode() if isinstance(eid, bytes) else eid)
    except (KeyError, ValueError, AttributeError) as err:
        raise EventStoreError(f"not an event store entry: {eid!r} ({err!r})") from None


def _opt(fn):
    return lambda x: None if x is None else fn(x)


# how :meth:`RedisEventStore.scan` turns a field's bytes into its value ("json": items / scores / attrs decoded)
_SCAN_DECODE = {"id": _opt(bytes.decode), "ts": _opt(float), "kind": _opt(bytes.decode), "user": _opt(_dec_key),
                "item": _opt(_dec_key), "request_id": _opt(bytes.decode), "version": _opt(bytes.decode),
                "value": _opt(float), "items": _opt(bytes.decode), "scores": _opt(bytes.decode),
                "attrs": _opt(bytes.decode), "json": _opt(json.loads)}


def _redacted(url: str) -> str:
    """The URL without its password (it goes into error messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _stream_id(x, what: str) -> str:
    """A stream id string from ``x`` (``0`` / ``"0"``: before the first entry)."""
    if isinstance(x, bytes):
        x = x.decode()
    if isinstance(x, int) and not isinstance(x, bool) and x == 0:
        return "0-0"
    if isinstance(x, str) and _ID.match(x):
        return x if "-" in x else f"{x}-0"
    raise ValueError(f"{what} must be a stream id string such as '1718000000123-0' (or 0), got {x!r}")


class _Pending:
    __slots__ = ("entries",)

    def __init__(self, entries):
        self.entries = entries


class RedisEventStore(EventStore):
    """The event store on a Redis Stream, shared by several engine replicas (see the module docstring for
    the layout and how it differs from :class:`~rec_engine.events.SqliteEventStore`).

    Parameters
    ----------
    url : str
        ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS) or ``unix:///path.sock?db=0``.
    stream : str
        The stream's key; every replica of one deployment names the same one.
    retention_days : float, optional
        Trim entries that arrived longer ago than this (by the stream id's time), at open and then about
        once a minute while appending.
    socket_timeout : float
        Seconds a command may wait for Redis before :class:`~rec_engine.events.EventStoreError` (a blocking
        :meth:`events_after` ``wait_s`` must be shorter).
    connect_timeout : float
        Seconds to wait for a connection.
    page : int
        Entries per page of a scan (``read``, ``load_state``, ``count(kind)``, ``forget``): the longest
        Redis is held by one of them.

    Ids of events and cursors of :meth:`events_after` are stream id strings (``"<ms>-<seq>"``), not ints.
    """

    def __init__(self, url, *, stream: str = "rec_engine:events", retention_days: float | None = None,
                 socket_timeout: float = 30.0, connect_timeout: float = 5.0, page: int = 10_000):
        if redis is None:
            raise EventStoreError(f"{url}: the Redis event store needs the redis package (pip install redis)")
        if retention_days is not None and (isinstance(retention_days, bool) or not retention_days > 0):
            raise ValueError(f"retention_days must be > 0, got {retention_days!r}")
        if not isinstance(stream, str) or not stream:
            raise ValueError(f"stream must be a non-empty string, got {stream!r}")
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise ValueError(f"page must be a positive int, got {page!r}")
        if not isinstance(url, str):
            raise TypeError(f"url must be a string, got {type(url).__name__}")
        self.url = _redacted(url)
        self.stream = stream
        self.retention_days = retention_days
        self.socket_timeout = float(socket_timeout)
        self.page = page
        self.origin = uuid.uuid4().hex[:16]
        self._origin_b = self.origin.encode()
        self._key = stream.encode()
        self._forgotten_key = f"{stream}:forgotten"
        try:
            self._r = redis.Redis.from_url(url, socket_timeout=self.socket_timeout,
                                           socket_connect_timeout=float(connect_timeout))
        except ValueError as e:
            raise EventStoreError(f"{self.url}: not a Redis URL ({e})") from None
        try:
            self._r.ping()
            kind = self._r.type(self._key)
            if kind not in (b"stream", b"none"):
                raise EventStoreError(f"{self.url}: key {stream!r} holds a {kind.decode()}, not an event stream")
            self._r.hsetnx(f"{stream}:meta", "schema", str(SCHEMA_VERSION))
            got = self._r.hget(f"{stream}:meta", "schema")
            if got is not None and int(got) > SCHEMA_VERSION:
                raise EventStoreError(f"{self.url}: event stream schema {int(got)} is newer than this "
                                      f"release's ({SCHEMA_VERSION})")
        except redis.RedisError as e:
            self._r.close()
            raise EventStoreError(f"{self.url}: cannot use Redis ({e})") from None
        except EventStoreError:
            self._r.close()
            raise
        self._scan = self._r.register_script(_SCAN)
        self._closed = False
        self._close_lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._unflushed = 0                  # appends without wait, handed to the writer, not yet done
        self._done = threading.Condition()
        self._lost = 0                       # events of appends without wait that failed since the last flush
        self._lost_error: BaseException | None = None
        self._last_retention = 0.0
        if retention_days is not None:
            self._apply_retention()

    # ------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed:
            raise EventStoreError(f"{self.url}: the event store is closed")

    def _call(self, fn, *args, **kwargs):
        self._check_open()
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:
            raise EventStoreError(f"{self.url}: Redis error ({e})") from None

    def _scan_pages(self, *, kinds=None, since=None, until=None, user=None, mode: str, after: str = "0-0",
                    page: int | None = None, fields: str = ""):
        """Yields (matched, out) per page of a server-side scan from after ``after`` to the stream's end."""
        page = self.page if page is None else page
        kinds_arg = "" if kinds is None else "," + ",".join(kinds) + ","
        args = [None, page, kinds_arg, "" if since is None else repr(float(since)),
                "" if until is None else repr(float(until)), "" if user is None else _enc_key(user), mode, fields]
        start = "-" if after == "0-0" else "(" + after
        while True:
            args[0] = start
            scanned, last, matched, out = self._call(self._scan, keys=[self._key], args=args)
            yield matched, out
            if scanned < page:
                return
            start = "(" + _str(last)

    # ------------------------------------------------------------------ writes
    def append(self, events: Sequence[Event], *, wait: bool = True) -> list[str]:
        """Store ``events`` (see :meth:`EventStore.append`): one transaction, one round trip. Returns their
        stream ids as strings (``"<ms>-<seq>"``), empty without ``wait``."""
        if isinstance(events, Event):
            events = [events]
        entries = []
        for ev in events:
            if not isinstance(ev, Event):
                raise TypeError(f"events must be Event objects, got {type(ev).__name__}")
            entries.append(_fields(ev.checked(), self._origin_b))
        if not entries:
            return []
        self._check_open()
        if not wait:
            self._start_writer()
            with self._done:
                self._unflushed += 1
            self._queue.put(_Pending(entries))
            return []
        try:
            ids = self._xadd(entries)
        except redis.RedisError as e:
            raise EventStoreError(f"{self.url}: events not stored ({e})") from None
        self._maybe_retention()
        return ids

    def _xadd(self, entries: list[dict]) -> list[str]:
        pipe = self._r.pipeline(transaction=True)
        for f in entries:
            pipe.xadd(self._key, f)
        return [i.decode() for i in pipe.execute()]

    def _start_writer(self) -> None:
        if self._writer is None:
            with self._writer_lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="rec-engine-events-redis",
                                                    daemon=True)
                    self._writer.start()

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            while True:                       # everything waiting goes in one transaction
                try:
                    p = self._queue.get_nowait()
                except queue.Empty:
                    break
                if p is None:
                    stop = True
                    break
                batch.append(p)
            entries = [f for p in batch for f in p.entries]
            error = None
            try:
                self._xadd(entries)
            except Exception as e:           # noqa: BLE001 - reported by the next flush
                error = e
            with self._done:
                if error is not None:
                    self._lost += len(entries)
                    self._lost_error = error
                self._unflushed -= len(batch)
                self._done.notify_all()
            if error is None:
                try:
                    self._maybe_retention()
                except EventStoreError:
                    pass
            if stop:
                return

    def flush(self) -> None:
        """Wait until every append made so far is stored; raises :class:`EventStoreError` if appends made
        without ``wait`` since the last flush failed (how many events, and why)."""
        with self._done:
            self._drain()
            lost, error = self._lost, self._lost_error
            self._lost, self._lost_error = 0, None
        if lost:
            raise EventStoreError(f"{self.url}: {lost} events appended without wait were not stored ({error})")

    def _drain(self) -> None:
        """Wait (holding ``self._done``) until the writer has taken every append made without ``wait``."""
        while self._unflushed > 0:
            self._done.wait()

    def _maybe_retention(self) -> None:
        if self.retention_days is not None and time.monotonic() - self._last_retention > 60:
            self._apply_retention()

    def _apply_retention(self) -> None:
        self._last_retention = time.monotonic()
        self.drop_before(time.time() - self.retention_days * 86400.0)

    # ------------------------------------------------------------------ reads
    def load_state(self, since: float | None = None) -> dict:
        # server side: only the user/item pairs of interactions travel, a page at a time, in stream order
        state: dict = {}
        for _, out in self._scan_pages(kinds=INTERACTIONS, since=since, mode="pairs"):
            for i in range(0, len(out), 2):
                state.setdefault(_dec_key(out[i]), []).append(_dec_key(out[i + 1]))
        return state

    def read(self, *, kinds: Iterable[str] | None = None, since: float | None = None,
             until: float | None = None, user=None, after_id=0, batch: int | None = None) -> Iterator[Event]:
        """Events in stream order, filtered by kind, ``ts`` in ``[since, until)``, user, and stream id after
        ``after_id`` (a stream id string such as ``"1718000000123-0"``, or 0 for all); ``batch``: entries
        scanned per page (default ``page``)."""
        after = _stream_id(after_id, "after_id")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        page = self.page if batch is None else batch
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError(f"unknown event kinds {bad}; kinds are {KINDS}")
        if user is not None:
            user = check_key(user, "user")
        since = None if since is None else float(since)
        until = None if until is None else float(until)
        return self._read(kinds, since, until, user, after, page)

    def _read(self, kinds, since, until, user, after, page) -> Iterator[Event]:
        if kinds is None and since is None and until is None and user is None:
            start = "-" if after == "0-0" else "(" + after
            while True:                      # plain pages: nothing to filter
                rows = self._call(self._r.xrange, self._key, start, "+", count=page)
                for eid, flat in rows:
                    yield _event_of(eid, flat)
                if len(rows) < page:
                    return
                start = "(" + _str(rows[-1][0])
        for _, out in self._scan_pages(kinds=kinds, since=since, until=until, user=user, mode="entries",
                                       after=after, page=page):
            for eid, flat in out:
                yield _event_of(eid, flat)

    def scan(self, columns, *, kinds=None, since=None, until=None, decode: bool = False,
             batch: int | None = None) -> Iterator[tuple]:
        """See :meth:`EventStore.scan`: a server-side scan (a Lua script per page of ``batch`` entries, default
        ``page``) that sends back only those fields of the matching entries. Keys come back with their
        type, ``ts`` / ``value`` as floats, ``id`` as the stream id string; ``items`` / ``scores`` / ``attrs``
        as their JSON text (a str), or decoded with ``decode``."""
        cols = _scan_columns(columns)
        kinds = _scan_kinds(kinds)
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        since = None if since is None else float(since)
        until = None if until is None else float(until)
        dec = [_SCAN_DECODE["json" if decode and c in ("items", "scores", "attrs") else c] for c in cols]
        return self._scan_fields(cols, dec, kinds, since, until, batch)

    def _scan_fields(self, cols, dec, kinds, since, until, page) -> Iterator[tuple]:
        k = len(cols)
        for _, out in self._scan_pages(kinds=kinds, since=since, until=until, mode="fields", page=page,
                                       fields=",".join(cols)):
            try:
                per = [list(map(d, out[j::k])) for j, d in enumerate(dec)]
            except (ValueError, AttributeError) as err:
                raise EventStoreError(f"{self.url}: not an event store entry ({err!r})") from None
            yield from zip(*per)

    def events_after(self, cursor, *, exclude_origin: bool = True,
                     wait_s: float | None = None) -> tuple[list[Event], Any]:
        """Events appended after ``cursor`` (a stream id string; None: from now on, nothing returned) by
        other writers (``exclude_origin``: not by this store object), and the cursor to pass next time.
        ``wait_s``: when nothing is there yet, wait up to this long for an entry (``XREAD BLOCK``)."""
        with self._done:                     # this store's own appends without wait are in the stream first
            self._drain()
        if cursor is None:
            self._check_open()
            try:
                return [], _str(self._r.xinfo_stream(self._key)["last-generated-id"])
            except redis.ResponseError:      # no stream yet: everything to come is after 0-0
                return [], "0-0"
            except redis.RedisError as e:
                raise EventStoreError(f"{self.url}: Redis error ({e})") from None
        cursor = _stream_id(cursor, "cursor")
        block = None
        if wait_s is not None:
            if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not 0 <= wait_s:
                raise ValueError(f"wait_s must be a number of seconds >= 0, got {wait_s!r}")
            if wait_s >= self.socket_timeout:
                raise ValueError(f"wait_s ({wait_s}) must be shorter than socket_timeout ({self.socket_timeout})")
            block = max(1, int(wait_s * 1000)) if wait_s > 0 else None   # BLOCK 0 would wait forever
        out: list[Event] = []
        while True:
            got = self._call(self._r.xread, {self._key: cursor}, count=self.page, block=block)
            block = None                     # later pages only take what is there
            rows = _xread_rows(got)
            for eid, flat in rows:
                if exclude_origin and flat.get(b"origin") == self._origin_b:
                    continue
                out.append(_event_of(eid, flat))
            if rows:
                cursor = _str(rows[-1][0])
            if len(rows) < self.page:
                return out, cursor

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return self._call(self._r.xlen, self._key)
        return sum(n for n, _ in self._scan_pages(kinds=[kind], mode="count"))

    def forgotten(self) -> set[str]:
        return {h.decode() for h in self._call(self._r.smembers, self._forgotten_key)}

    # ------------------------------------------------------------------ erasure
    def forget(self, user) -> int:
        """Erase (XDEL) every event of ``user`` and add its hash to ``<stream>:forgotten`` (first, so a
        forget cut short still marks the user); returns the number of events erased."""
        user = check_key(user, "user")
        self.flush()
        self._call(self._r.sadd, self._forgotten_key, user_hash(user))
        return sum(n for n, _ in self._scan_pages(kinds=USER_KINDS, user=user, mode="delete"))

    def drop_before(self, ts: float) -> int:
        """Erase the events that *arrived* before ``ts`` (XTRIM MINID by the stream id's millisecond time,
        which is the Redis server's clock at the append, not the event's ``ts``); returns how many."""
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            raise TypeError(f"ts must be a number of seconds, got {type(ts).__name__}")
        ms = max(0, int(float(ts) * 1000))
        return self._call(self._r.xtrim, self._key, minid=f"{ms}-0", approximate=False)

    def close(self) -> None:
        """Store what was appended without ``wait``, then close the connections (raises like :meth:`flush`
        if some of it could not be stored)."""
        with self._close_lock:
            if self._closed:
                return
            if self._writer is not None:
                self._queue.put(None)
                self._writer.join()
            self._closed = True
            self._r.close()
            self._r.connection_pool.disconnect()
        self.flush()
