"""The SQLite event store against a brute-force reference (a Python list of the events appended): append,
read and its filters and paging, count, load_state, events_after between two store objects on one file,
many threads appending, forget (checked in the database file itself), drop_before and retention, bad
input, closed and foreign files, and the one-time import of the older JSON-lines log."""
from __future__ import annotations

import json
import random
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rec_engine.events import (INTERACTIONS, KINDS, Event, EventStore, EventStoreError, SqliteEventStore, open_store,
                               user_hash)

T0 = 1_700_000_000.0
# int and str keys mixed, including ones that look alike across types ("7" / 7), the int64 ends, a NUL
KEYS = [7, "7", 0, -1, 2**63 - 1, -2**63, "", "a\x00b", "café-☕", 'q"\\\n', "🙂" * 20]


@pytest.fixture
def store(tmp_path):
    s = SqliteEventStore(tmp_path / "events.db")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------- reference
def ref_read(ref, *, kinds=None, since=None, until=None, user=None, after_id=0):
    """What read() must return: the reference list filtered, in the order appended."""
    out = []
    for eid, e in ref:
        if eid <= after_id or (kinds is not None and e.kind not in kinds):
            continue
        if (since is not None and e.ts < since) or (until is not None and e.ts >= until):
            continue
        if user is not None and not _same_key(e.user, user):
            continue
        out.append((eid, e))
    return out


def _same_key(a, b):
    return type(a) is type(b) and a == b


def ref_state(ref, since=None):
    state = {}
    for _, e in ref:
        if e.kind in INTERACTIONS and (since is None or e.ts >= since):
            state.setdefault((type(e.user), e.user), []).append(e.item)
    return state


def typed(state: dict) -> dict:
    """load_state's dict keyed by (type, key), so 7 and "7" can never be confused by the comparison."""
    return {(type(k), k): v for k, v in state.items()}


def stored(store, **kw):
    return [(e.id, e) for e in store.read(**kw)]


def append_all(store, events, sizes):
    """Append ``events`` in batches of the given sizes (cycled); the reference: (id, checked event)."""
    ref, i, j = [], 0, 0
    while i < len(events):
        chunk = events[i:i + sizes[j % len(sizes)]]
        ids = store.append(chunk)
        assert len(ids) == len(chunk)
        ref += [(eid, e.checked()) for eid, e in zip(ids, chunk)]
        i += len(chunk)
        j += 1
    return ref


def assert_same(got, want):
    assert [eid for eid, _ in got] == [eid for eid, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g == w
        assert type(g.user) is type(w.user) and type(g.item) is type(w.item)
        if g.items is not None:
            assert [type(x) for x in g.items] == [type(x) for x in w.items]


def make_event(r: random.Random, i: int) -> Event:
    kind = r.choice(KINDS)
    user = r.choice(KEYS)
    ts = T0 + r.randrange(20)          # few distinct timestamps: since / until boundaries hit equal ts
    attrs = r.choice([None, {"i": i}, {"pos": r.randrange(10), "src": "home", "tags": ["a", "b"]}])
    if kind == "impression":
        n = r.randrange(1, 5)
        items = tuple(r.choice(KEYS) for _ in range(n))
        scores = r.choice([None, tuple(r.random() for _ in range(n))])
        return Event(kind, user, items=items, scores=scores, ts=ts, request_id=f"r{i}", version="v1", attrs=attrs)
    value = r.uniform(0, 5) if kind == "rating" else r.choice([None, 9.5])
    return Event(kind, user, r.choice(KEYS), ts=ts, request_id=r.choice([None, f"r{i}"]), value=value, attrs=attrs)


# ---------------------------------------------------------------------------------------- append / read
def test_store_implements_the_interface_and_starts_empty(store):
    assert isinstance(store, EventStore)
    assert store.count() == 0 and list(store.read()) == [] and store.load_state() == {}
    assert store.append([]) == []


def test_append_returns_increasing_ids_and_read_returns_the_events_as_appended(store):
    r = random.Random(1)
    events = [make_event(r, i) for i in range(300)]
    ref = append_all(store, events, [1, 5, 17, 2, 40])
    ids = [eid for eid, _ in ref]
    assert ids == sorted(set(ids))
    assert_same(stored(store), ref)
    assert store.count() == 300
    for kind in KINDS:
        assert store.count(kind) == sum(e.kind == kind for _, e in ref)


def test_single_event_append_and_numpy_keys_become_python_ones(store):
    ids = store.append(Event("click", np.int64(5), np.int32(9), ts=T0))
    ids += store.append([Event("impression", "u", items=np.array([3, 4]), scores=np.array([0.5, 0.25]), ts=T0)])
    got = list(store.read())
    assert [e.id for e in got] == ids
    assert type(got[0].user) is int and got[0].user == 5 and type(got[0].item) is int
    assert got[1].items == (3, 4) and got[1].scores == (0.5, 0.25)
    assert all(type(i) is int for i in got[1].items)


def test_load_state_keeps_each_users_interactions_in_order_with_mixed_key_types(store):
    # users interleaved batch after batch, so the per-user order is not the order of one block
    r = random.Random(2)
    events = []
    for i in range(3000):
        kind = r.choice(["click", "conversion", "rating", "impression"])
        u = KEYS[i % len(KEYS)] if i % 3 else r.choice(KEYS)
        if kind == "impression":
            events.append(Event(kind, u, items=(1, 2), ts=T0 + i))
        else:
            events.append(Event(kind, u, r.choice(KEYS), ts=T0 + i, value=1.0 if kind == "rating" else None))
    ref = append_all(store, events, [7, 1, 30])
    want = ref_state(ref)
    assert typed(store.load_state()) == want
    assert (int, 7) in want and (str, "7") in want and want[(int, 7)] != want[(str, "7")]
    for since in (T0, T0 + 1500, T0 + 1500.5, T0 + 2999, T0 + 3000):
        assert typed(store.load_state(since=since)) == ref_state(ref, since)


@pytest.mark.parametrize("batch", [1, 7, 50, 10_000])
def test_read_filters_and_paging_match_the_reference(store, batch):
    r = random.Random(3)
    ref = append_all(store, [make_event(r, i) for i in range(120)], [3, 11])
    mid = ref[len(ref) // 2][0]
    cases = [dict(), dict(kinds=["click"]), dict(kinds="rating"), dict(kinds=["impression", "conversion"]),
             dict(kinds=[]), dict(since=T0 + 5), dict(until=T0 + 5), dict(since=T0 + 3, until=T0 + 4),
             dict(since=T0 + 3.5, until=T0 + 3.5), dict(after_id=mid), dict(after_id=ref[-1][0])]
    cases += [dict(user=k) for k in KEYS] + [dict(user="nobody"), dict(user=7, kinds=["click"], since=T0 + 2,
                                                                           until=T0 + 15, after_id=ref[10][0])]
    for kw in cases:
        kinds = kw.get("kinds")
        want = ref_read(ref, **{**kw, "kinds": [kinds] if isinstance(kinds, str) else kinds})
        assert_same(stored(store, batch=batch, **kw), want)


def test_read_pages_through_more_rows_than_its_page_and_sees_rows_appended_between_pages(store):
    ref = append_all(store, [Event("click", i % 3, i, ts=T0 + i) for i in range(40)], [40])
    it = store.read(batch=5, user=1)              # 13 rows of user 1: three pages and a short one
    first = [next(it) for _ in range(2)]          # inside the first page
    late = store.append([Event("click", 1, "late", ts=T0)])
    rest = list(it)
    assert [e.id for e in first + rest] == [eid for eid, e in ref if e.user == 1] + late


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 80), sizes=st.lists(st.integers(1, 25), min_size=1, max_size=5),
       kinds=st.none() | st.lists(st.sampled_from(KINDS), unique=True), since=st.none() | st.integers(-1, 21),
       until=st.none() | st.integers(-1, 21), user=st.none() | st.sampled_from(KEYS), after=st.integers(0, 90),
       page=st.integers(1, 30))
def test_random_event_sequences_match_the_reference(seed, n, sizes, kinds, since, until, user, after, page):
    r = random.Random(seed)
    events = [make_event(r, i) for i in range(n)]
    with tempfile.TemporaryDirectory() as d, SqliteEventStore(Path(d) / "e.db") as s:
        ref = append_all(s, events, sizes)
        assert_same(stored(s), ref)
        assert s.count() == n
        assert typed(s.load_state()) == ref_state(ref)
        kw = dict(kinds=kinds, since=None if since is None else T0 + since,
                  until=None if until is None else T0 + until, user=user, after_id=after)
        assert_same(stored(s, batch=page, **kw), ref_read(ref, **kw))
        if since is not None:
            assert typed(s.load_state(since=T0 + since)) == ref_state(ref, T0 + since)


# ---------------------------------------------------------------------------------------- scan
def as_columns(e: Event, cols, decode=False):
    """What scan() must give for the event ``e`` (as read() returns it)."""
    out = []
    for c in cols:
        v = getattr(e, c)
        if c in ("items", "scores") and v is not None:
            v = list(v) if decode else json.dumps(list(v), separators=(",", ":"))
        elif c == "attrs" and v is not None and not decode:
            v = json.dumps(v, separators=(",", ":"))
        out.append(v)
    return tuple(out)


def assert_same_rows(got, want):
    assert got == want
    for g, w in zip(got, want):                   # 7 and "7", 1.0 and 1 stay what they are
        assert [type(x) for x in g] == [type(x) for x in w]


class ReadOnly(EventStore):
    """A store with read() only: scan() is the interface's default, built on read()."""

    def __init__(self, inner):
        self.inner = inner

    def read(self, **kw):
        return self.inner.read(**kw)


SCAN_CASES = [dict(), dict(kinds=["click"]), dict(kinds="rating"), dict(kinds=["impression", "conversion"]),
              dict(kinds=[]), dict(since=T0 + 5), dict(until=T0 + 5), dict(since=T0 + 3, until=T0 + 4),
              dict(since=T0 + 3.5, until=T0 + 3.5), dict(kinds=("impression",), since=T0 + 2, until=T0 + 17)]
ALL_COLUMNS = ("id", "ts", "kind", "user", "item", "request_id", "version", "value", "items", "scores", "attrs")


@pytest.mark.parametrize("batch", [1, 7, 10_000])
def test_scan_gives_the_columns_of_read_for_every_filter(store, batch):
    r = random.Random(5)
    append_all(store, [make_event(r, i) for i in range(150)], [4, 13])
    default = ReadOnly(store)
    for cols in (ALL_COLUMNS, ("items", "ts", "kind"), ("user",), "item", ("value", "value", "id")):
        names = (cols,) if isinstance(cols, str) else cols
        for kw in SCAN_CASES:
            for decode in (False, True):
                want = [as_columns(e, names, decode) for e in store.read(**kw)]
                got = list(store.scan(cols, decode=decode, batch=batch, **kw))
                assert_same_rows(got, want)
                assert_same_rows(list(default.scan(cols, decode=decode, **kw)), want)
    assert all(isinstance(t, str) for (t,) in store.scan(["items"], kinds="impression"))
    assert list(store.scan(["id"])) == [(e.id,) for e in store.read()]


def test_scan_crosses_gaps_in_the_ids_and_sees_rows_appended_while_it_runs(store):
    ids = store.append([Event("click", i % 4, i, ts=T0 + i) for i in range(100)])
    store.forget(1)                                   # every 4th row gone
    store.drop_before(T0 + 20)                        # the first 20 gone
    with sqlite3.connect(store.path) as raw:          # a hole wider than a page in the middle
        raw.execute("DELETE FROM events WHERE id BETWEEN ? AND ?", (ids[40], ids[79]))
    raw.close()
    want = [(e.id, e.item) for e in store.read()]
    assert len(want) == 30 and want[0][0] > 20
    assert list(store.scan(("id", "item"), batch=7)) == want
    assert list(store.scan(("id", "item"), batch=1, kinds="click", since=T0 + 85)) == \
        [w for w in want if w[1] >= 85]
    it = store.scan(("id",), batch=5)
    first = [next(it) for _ in range(3)]
    late = store.append([Event("click", 9, "late", ts=T0)])
    assert first + list(it) == [(i,) for i, _ in want] + [(late[0],)]
    store.drop_before(T0 + 1000)
    assert list(store.scan(("id",))) == [] and list(ReadOnly(store).scan(("id",))) == []


def test_bad_scan_arguments_raise_at_the_call(store):
    for s in (store, ReadOnly(store)):
        with pytest.raises(ValueError, match="columns"):
            s.scan(["ts", "origin"])
        with pytest.raises(ValueError, match="columns"):
            s.scan([])
        with pytest.raises(ValueError, match="kinds"):
            s.scan(["ts"], kinds=["view"])
    with pytest.raises(ValueError, match="batch"):
        store.scan(["ts"], batch=0)


# ---------------------------------------------------------------------------------------- two stores, threads
def test_events_after_between_two_stores_on_one_file_sees_the_others_events_not_its_own(tmp_path):
    path = tmp_path / "shared.db"
    with SqliteEventStore(path) as a, SqliteEventStore(path) as b:
        a.append([Event("click", "before", 1, ts=T0)])
        got, ca = a.events_after(None)
        assert got == []
        got, cb = b.events_after(None)
        assert got == [] and ca == cb == 1
        ids_a, ids_b = [], []
        for i in range(6):                       # interleaved writers
            ids_a += a.append([Event("click", "a", i, ts=T0)] * (i % 3 + 1))
            ids_b += b.append([Event("rating", 5, i, value=i, ts=T0)])
        got_a, ca2 = a.events_after(ca)
        got_b, cb2 = b.events_after(cb)
        assert [e.id for e in got_a] == ids_b and all(e.user == 5 for e in got_a)
        assert [e.id for e in got_b] == ids_a and all(e.user == "a" for e in got_b)
        assert ca2 >= ids_b[-1] and cb2 == ids_a[-1]
        assert a.events_after(ca2)[0] == [] and b.events_after(cb2)[0] == []
        every, _ = a.events_after(ca, exclude_origin=False)
        assert [e.id for e in every] == sorted(ids_a + ids_b)
        # the cursor of a call that found only its own events still lets the next call see the other's
        own = a.append([Event("click", "a", 99, ts=T0)])
        got, ca3 = a.events_after(ca2)
        assert got == [] and ca3 == own[0]
        later = b.append([Event("click", "b", 100, ts=T0)])
        assert [e.id for e in a.events_after(ca3)[0]] == later
        # both see the same data
        assert stored(a) == stored(b) and a.count() == b.count() == 1 + len(ids_a) + len(ids_b) + 2


class _CommitBetweenQueries:
    """Wraps a store's read connection: right after the events_after row query, another store commits."""

    def __init__(self, conn, other):
        self.conn, self.other, self.fired = conn, other, False

    def execute(self, sql, *args):
        cur = self.conn.execute(sql, *args)
        if "origin IS NOT" in sql and not self.fired:
            rows = cur.fetchall()
            self.fired = True
            self.other.append([Event("click", "other", "x", ts=T0)])

            class Done:
                def fetchall(self):
                    return rows

                def fetchone(self):
                    return rows[0] if rows else None
            return Done()
        return cur

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_events_after_does_not_skip_a_commit_made_between_its_queries(tmp_path):
    # regression: events_after read the rows and then MAX(id) in two snapshots; a commit between them moved
    # the cursor past an event it never returned
    path = tmp_path / "shared.db"
    with SqliteEventStore(path) as a, SqliteEventStore(path) as b:
        a.append([Event("click", "a", 1, ts=T0)])
        _, cur = a.events_after(None)
        real = a._rconn
        a._rconn = _CommitBetweenQueries(real, b)
        try:
            got, cur = a.events_after(cur)
        finally:
            a._rconn = real
        assert got == []
        got, _ = a.events_after(cur)
        assert [(e.user, e.item) for e in got] == [("other", "x")]


def test_many_threads_appending_at_once_store_every_event_once_with_unique_ids(store):
    n_threads, per_thread = 8, 40
    results, errors = {}, []
    start = threading.Barrier(n_threads)

    def work(t):
        r = random.Random(t)
        mine = []
        try:
            start.wait()
            for j in range(per_thread):
                batch = [Event("click", t, f"{t}-{j}-{k}", ts=T0 + j, request_id=f"{t}-{j}-{k}")
                         for k in range(r.randint(1, 12))]
                mine += list(zip(store.append(batch), batch))
        except BaseException as e:           # noqa: BLE001 - reported by the main thread
            errors.append(e)
        results[t] = mine

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and len(results) == n_threads
    sent = {eid: e for mine in results.values() for eid, e in mine}
    n_sent = sum(len(m) for m in results.values())
    assert len(sent) == n_sent                        # every id unique
    got = list(store.read())
    assert len(got) == n_sent == store.count()
    assert {e.id: e.request_id for e in got} == {eid: e.request_id for eid, e in sent.items()}
    for t, mine in results.items():                   # each thread's ids increase in its own order
        assert [eid for eid, _ in mine] == sorted(eid for eid, _ in mine)
    state = store.load_state()
    for t, mine in results.items():
        assert state[t] == [e.item for _, e in mine]


def test_append_without_wait_is_stored_after_flush(store):
    assert store.append([Event("click", 1, i, ts=T0) for i in range(50)], wait=False) == []
    store.flush()
    assert store.count() == 50 and [e.item for e in store.read()] == list(range(50))


# ---------------------------------------------------------------------------------------- erasure
def _all_cells(path):
    con = sqlite3.connect(path)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: con.execute(f'SELECT * FROM "{t}"').fetchall() for t in tables}
    finally:
        con.close()


@pytest.mark.parametrize("victim", ["erase-me-🙂-4711", 987654321987])
def test_forget_leaves_no_row_of_the_user_and_remembers_only_a_hash(tmp_path, victim):
    path = tmp_path / "events.db"
    with SqliteEventStore(path) as s:
        r = random.Random(4)
        ref = append_all(s, [Event("click", r.choice([victim, "keep", 5]), i, ts=T0, attrs={"n": i})
                             for i in range(400)], [9])
        ref += append_all(s, [Event("impression", victim, items=(1, 2), ts=T0, request_id="req")], [1])
        n_victim = sum(_same_key(e.user, victim) for _, e in ref)
        assert s.forget(victim) == n_victim > 0
        assert s.forget(victim) == 0
        assert s.forgotten() == {user_hash(victim)}
        assert list(s.read(user=victim)) == [] and victim not in s.load_state()
        assert_same(stored(s), [(eid, e) for eid, e in ref if not _same_key(e.user, victim)])
        cells = _all_cells(path)
        assert cells["forgotten"] and [h for h, _ in cells["forgotten"]] == [user_hash(victim)]
        assert user_hash(victim) != str(victim)
        for table, rows in cells.items():
            for row in rows:
                for cell in row:
                    assert not _same_key(cell, victim), (table, row)
                    if isinstance(victim, str) and isinstance(cell, str):
                        assert victim not in cell, (table, row)
        assert len(cells["events"]) == len(ref) - n_victim
        if isinstance(victim, str):               # and no byte of the key is left in the files (erased pages)
            needle = victim.encode()
            for f in tmp_path.iterdir():
                assert needle not in f.read_bytes(), f.name
    with SqliteEventStore(path) as s:             # remembered across opens
        assert s.forgotten() == {user_hash(victim)} and list(s.read(user=victim)) == []


def test_user_hash_is_type_tagged():
    assert user_hash(7) != user_hash("7") and len(user_hash("x")) == 64


def test_drop_before_erases_exactly_the_older_events(store):
    ref = append_all(store, [Event("click", i % 4, i, ts=T0 + i) for i in range(100)], [13])
    assert store.drop_before(T0 + 40) == 40
    assert store.drop_before(T0 + 40) == 0
    assert_same(stored(store), [(eid, e) for eid, e in ref if e.ts >= T0 + 40])
    assert typed(store.load_state()) == ref_state([(eid, e) for eid, e in ref if e.ts >= T0 + 40])


def _open_within(timeout, *args, **kw):
    """SqliteEventStore(...) in a thread, failing (not hanging) if it does not return in time."""
    got = []
    th = threading.Thread(target=lambda: got.append(SqliteEventStore(*args, **kw)), daemon=True)
    th.start()
    th.join(timeout)
    assert got, f"SqliteEventStore(retention_days=...) did not open within {timeout} s"
    return got[0]


def test_retention_days_at_open_erases_events_older_than_the_window(tmp_path):
    # regression: retention at open flushed through the writer thread before it was started (a hang)
    path = tmp_path / "events.db"
    now = time.time()
    with SqliteEventStore(path) as s:
        s.append([Event("click", 1, "old", ts=now - 10 * 86400), Event("click", 1, "new", ts=now - 86400),
                  Event("click", 2, "older", ts=now - 30 * 86400)])
    s = _open_within(20, path, retention_days=5)
    try:
        assert [e.item for e in s.read()] == ["new"] and s.load_state() == {1: ["new"]}
    finally:
        s.close()
    s = _open_within(20, path, retention_days=0.5)
    try:
        assert s.count() == 0
    finally:
        s.close()


def test_retention_while_writing_runs_on_the_writer_without_waiting_for_itself(tmp_path):
    # regression: the writer applied retention (about once a minute) through drop_before, which flushed
    # through the writer thread itself: the append that triggered it never returned
    now = time.time()
    s = _open_within(20, tmp_path / "events.db", retention_days=1)
    s._last_retention = time.monotonic() - 3600          # as if the last pass was an hour ago
    done = []
    th = threading.Thread(target=lambda: done.append(s.append([Event("click", 1, "old", ts=now - 2 * 86400),
                                                                Event("click", 1, "new", ts=now)])), daemon=True)
    th.start()
    th.join(20)
    assert done, "an append that triggered retention did not return"
    s.flush()
    assert [e.item for e in s.read()] == ["new"]
    s.append([Event("click", 1, "next", ts=now)])
    assert [e.item for e in s.read()] == ["new", "next"]
    s.close()


@pytest.mark.parametrize("bad", [0, -1, True, float("nan")])
def test_retention_days_must_be_positive(tmp_path, bad):
    with pytest.raises(ValueError, match="retention_days"):
        SqliteEventStore(tmp_path / "e.db", retention_days=bad)


# ---------------------------------------------------------------------------------------- bad input
BAD = [
    (Event("view", 1, 2), ValueError, "kind"),
    (Event("click", True, 2), TypeError, "user"),
    (Event("click", 1.0, 2), TypeError, "user"),
    (Event("click", None, 2), TypeError, "user"),
    (Event("click", 2**63, 2), ValueError, "user"),
    (Event("click", 1, False), TypeError, "item"),
    (Event("click", 1, 2.5), TypeError, "item"),
    (Event("click", 1), ValueError, "item"),
    (Event("click", 1, 2, items=(1, 2)), ValueError, "items"),
    (Event("conversion", 1, 2, value=float("nan")), ValueError, "value"),
    (Event("conversion", 1, 2, value=float("inf")), ValueError, "value"),
    (Event("conversion", 1, 2, value="3"), TypeError, "value"),
    (Event("conversion", 1, 2, value=True), TypeError, "value"),
    (Event("rating", 1, 2), ValueError, "value"),
    (Event("impression", 1), ValueError, "items"),
    (Event("impression", 1, 3, items=(1,)), ValueError, "items"),
    (Event("impression", 1, items=(1, 2.0)), TypeError, "item"),
    (Event("impression", 1, items=(1, 2, 3), scores=(0.1, 0.2)), ValueError, "scores"),
    (Event("click", 1, 2, ts=float("nan")), ValueError, "ts"),
    (Event("click", 1, 2, ts="now"), ValueError, "ts"),
    (Event("click", 1, 2, request_id=5), TypeError, "request_id"),
    (Event("click", 1, 2, version=1), TypeError, "version"),
    (Event("click", 1, 2, attrs={"x": object()}), ValueError, "attrs"),
    (Event("click", 1, 2, attrs={"x": float("nan")}), ValueError, "attrs"),
    (Event("click", 1, 2, attrs=[1, 2]), TypeError, "attrs"),
    ("not an event", TypeError, "Event"),
]


@pytest.mark.parametrize("bad,exc,field", BAD, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(BAD)])
def test_bad_input_raises_naming_the_field_and_stores_nothing(store, bad, exc, field):
    good = Event("click", 1, 2, ts=T0)
    with pytest.raises(exc, match=field):
        store.append([good, bad, good])
    store.flush()
    assert store.count() == 0 and list(store.read()) == []


def test_bad_read_arguments_raise(store):
    with pytest.raises(ValueError, match="kinds"):
        list(store.read(kinds=["view"]))
    with pytest.raises(TypeError, match="user"):
        list(store.read(user=1.5))
    with pytest.raises(TypeError, match="user"):
        store.forget(True)


# ---------------------------------------------------------------------------------------- closed, foreign files
def test_append_and_reads_after_close_raise(tmp_path):
    s = SqliteEventStore(tmp_path / "e.db")
    s.append([Event("click", 1, 2)])
    s.close()
    s.close()                                     # twice is fine
    with pytest.raises(EventStoreError, match="closed"):
        s.append([Event("click", 1, 2)])
    with pytest.raises(EventStoreError, match="closed"):
        list(s.read())
    with pytest.raises(EventStoreError, match="closed"):
        s.count()
    with pytest.raises(EventStoreError, match="closed"):
        s.forget(1)
    s.flush()                                     # nothing to wait for
    with SqliteEventStore(tmp_path / "e.db") as again:
        assert again.count() == 1


def test_a_file_that_is_not_sqlite_is_an_event_store_error(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not a database, just some text\n" * 200)
    with pytest.raises(EventStoreError, match="not an event store"):
        SqliteEventStore(path)
    with pytest.raises(EventStoreError):
        open_store(path)
    assert path.read_bytes() == b"this is not a database, just some text\n" * 200


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "e.db"
    SqliteEventStore(path).close()
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE meta SET value='99' WHERE key='schema'")
    con.close()
    with pytest.raises(EventStoreError, match="newer"):
        SqliteEventStore(path)


def test_open_store_paths_and_types(tmp_path):
    with open_store(tmp_path / "sub" / "e.db") as s:
        assert isinstance(s, SqliteEventStore) and (tmp_path / "sub" / "e.db").exists()
        assert open_store(s) is s
    with open_store(str(tmp_path / "x.jsonl")) as s:     # no log yet: an empty store beside it
        assert s.path == tmp_path / "x.db" and s.count() == 0
    with pytest.raises(TypeError, match="event store"):
        open_store(42)


# ---------------------------------------------------------------------------------------- import_jsonl
def _line(ts, user, items, **extra):
    return (json.dumps({"ts": ts, "user": user, "items": items, **extra}) + "\n").encode()


def test_open_store_imports_a_jsonl_log_once_and_later_only_what_was_appended(tmp_path):
    log = tmp_path / "x.jsonl"
    log.write_bytes(_line(T0, "u1", [1, 2]) + _line(T0 + 1, 7, ["a"], src="home") + b"\n" + _line(T0 + 2, "u1", [3]))
    with open_store(log) as s:
        assert (tmp_path / "x.db").exists() and s.path == tmp_path / "x.db"
        got = list(s.read())
        assert [(e.kind, e.user, e.item, e.ts, e.attrs) for e in got] == [
            ("click", "u1", 1, T0, None), ("click", "u1", 2, T0, None), ("click", 7, "a", T0 + 1, {"src": "home"}),
            ("click", "u1", 3, T0 + 2, None)]
        assert s.load_state() == {"u1": [1, 2, 3], 7: ["a"]}
    with open_store(log) as s:                               # a second open imports nothing new
        assert s.count() == 4
        assert s.import_jsonl(log) == 0 and s.count() == 4
    with log.open("ab") as f:
        f.write(_line(T0 + 3, 7, ["b", "c"]))
    with open_store(log) as s:                               # appended lines are imported
        assert s.count() == 6 and s.load_state() == {"u1": [1, 2, 3], 7: ["a", "b", "c"]}


def test_import_skips_a_torn_last_line_and_takes_it_once_it_is_complete(tmp_path):
    log = tmp_path / "x.jsonl"
    full = _line(T0 + 1, "u2", [5])
    log.write_bytes(_line(T0, "u1", [1]) + full[:11])       # a crash mid-write
    with open_store(log) as s:
        assert s.load_state() == {"u1": [1]}
    with log.open("ab") as f:                               # the line completed later
        f.write(full[11:])
    with open_store(log) as s:
        assert s.load_state() == {"u1": [1], "u2": [5]} and s.count() == 2


@pytest.mark.parametrize("bad", [b"{not json\n", b'{"ts": 1, "items": [1]}\n', b'{"user": 1.5, "items": [1]}\n',
                                 b"[1, 2]\n", b'{"user": "u", "items": 3}\n'])
def test_import_of_a_corrupt_middle_line_is_an_error_naming_the_line_and_imports_nothing(tmp_path, bad):
    log = tmp_path / "x.jsonl"
    log.write_bytes(_line(T0, "u1", [1]) + b"\n" + bad + _line(T0, "u2", [2]))
    with pytest.raises(EventStoreError, match=r"x\.jsonl:3: not an event"):
        open_store(log)
    with SqliteEventStore(tmp_path / "x.db") as s:
        assert s.count() == 0
        with pytest.raises(EventStoreError, match=":3:"):
            s.import_jsonl(log)
        assert s.count() == 0


def test_import_refuses_a_log_shorter_than_what_was_imported(tmp_path):
    log = tmp_path / "x.jsonl"
    log.write_bytes(_line(T0, "u1", [1]) + _line(T0, "u1", [2]))
    open_store(log).close()
    log.write_bytes(_line(T0, "u1", [1]))
    with pytest.raises(EventStoreError, match="shorter"):
        open_store(log)


def test_forget_never_erases_catalogue_events(tmp_path):
    with SqliteEventStore(tmp_path / "e.db") as s:
        s.append([Event("item_added", "", 5, attrs={"vector": [1.0]}), Event("click", "", 5),
                  Event("item_removed", "", 6)])
        assert s.forget("") == 1
        assert [e.kind for e in s.read()] == ["item_added", "item_removed"]
