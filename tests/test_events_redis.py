"""The Redis Streams event store (:class:`RedisEventStore`) against a real ``redis-server`` on loopback, checked
against a brute-force reference: the list of events appended, filtered in Python."""
from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest

redis = pytest.importorskip("redis", reason="the Redis event store needs the redis package (pip install redis)")

from rec_engine.events import INTERACTIONS, Event, EventStoreError, open_store, user_hash  # noqa: E402
from rec_engine.events_redis import RedisEventStore  # noqa: E402

from redis_fixture import REDIS_SERVER, free_port as _free_port, redis_url  # noqa: E402,F401


@pytest.fixture
def raw(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def stream():
    """A stream key of its own per test."""
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(redis_url, stream):
    s = RedisEventStore(redis_url, stream=stream, page=7)    # a small page: every scan crosses pages
    yield s
    s.close()


def _events(rng, n: int, t0: float = 1_700_000_000.0) -> list[Event]:
    """A mix of every kind, int and str keys (negative and int64-sized ints, unicode strings)."""
    users = [3, -7, 2**62, "u1", "ü-é", "7"]          # "7" (str) and 7-like ints must stay apart
    items = [0, 1, -2, 2**40, "sku-1", "sku-2", "1"]
    out = []
    for i in range(n):
        kind = ("impression", "click", "conversion", "rating")[int(rng.integers(4))]
        user = users[int(rng.integers(len(users)))]
        ts = t0 + float(rng.integers(0, 1000)) + 0.125
        rid = None if i % 3 else f"req-{i}"
        if kind == "impression":
            shown = [items[int(j)] for j in rng.choice(len(items), 3, replace=False)]
            out.append(Event(kind, user, items=shown, scores=[0.5, 0.25, -1.0], ts=ts, request_id=rid,
                             version="v1", attrs={"pos": i, "page": "home"} if i % 2 else None))
        else:
            value = 4.5 if kind == "rating" else (9.99 if kind == "conversion" and i % 2 else None)
            out.append(Event(kind, user, items[int(rng.integers(len(items)))], ts=ts, request_id=rid,
                             value=value))
    return out


def _same(got: Event, want: Event) -> None:
    want = want.checked()
    for f in ("kind", "user", "item", "ts", "request_id", "version", "value", "items", "scores", "attrs"):
        g, w = getattr(got, f), getattr(want, f)
        assert g == w and type(g) is type(w), (f, g, w)


def _reference_state(events, since=None) -> dict:
    state: dict = {}
    for e in events:
        if e.kind in INTERACTIONS and (since is None or e.ts >= since):
            state.setdefault(e.user, []).append(e.item)
    return state


# ---------------------------------------------------------------------------------- append, read, state
def test_append_returns_stream_ids_and_read_returns_the_events_with_key_types(store, rng):
    events = _events(rng, 60)
    ids = store.append(events[:1]) + store.append(events[1:])
    assert len(ids) == 60 and all(isinstance(i, str) and "-" in i for i in ids)
    assert ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-"))))
    got = list(store.read())
    assert [g.id for g in got] == ids
    for g, w in zip(got, events):
        _same(g, w)
    assert store.count() == 60
    for kind in ("impression", "click", "conversion", "rating"):
        assert store.count(kind) == sum(e.kind == kind for e in events)
    assert store.count("nonsense") == 0


def test_read_filters_match_the_brute_force_reference(store, rng):
    events = _events(rng, 80)
    ids = store.append(events)
    checked = [e.checked() for e in events]
    cases = [dict(kinds="click"), dict(kinds=["rating", "conversion"]), dict(user=3), dict(user="7"),
             dict(user=np.int64(-7)), dict(since=1_700_000_300.125), dict(until=1_700_000_500.0),
             dict(since=1_700_000_100.0, until=1_700_000_900.0, kinds=["impression"], user="u1"),
             dict(after_id=ids[29]), dict(after_id=ids[29], kinds="click"), dict(after_id=0), dict(after_id="0")]
    for kw in cases:
        kinds = kw.get("kinds")
        kinds = None if kinds is None else ([kinds] if isinstance(kinds, str) else kinds)
        user = kw.get("user")
        user = user.item() if isinstance(user, np.generic) else user
        start = ids.index(kw["after_id"]) + 1 if kw.get("after_id") not in (None, 0, "0") else 0
        want = [(i, e) for i, e in zip(ids, checked)][start:]
        want = [(i, e) for i, e in want if (kinds is None or e.kind in kinds)
                and (user is None or (e.user == user and type(e.user) is type(user)))
                and ("since" not in kw or e.ts >= kw["since"]) and ("until" not in kw or e.ts < kw["until"])]
        got = list(store.read(**kw))
        assert [g.id for g in got] == [i for i, _ in want], kw
        for g, (_, w) in zip(got, want):
            _same(g, w)


SCAN_COLUMNS = ("id", "ts", "kind", "user", "item", "request_id", "version", "value", "items", "scores", "attrs")


def _as_columns(e: Event, cols, decode: bool) -> tuple:
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


@pytest.mark.parametrize("batch", [None, 1, 1000])
def test_scan_gives_the_columns_of_read_for_every_filter(store, rng, batch):
    events = _events(rng, 70)
    store.append(events[:30])
    store.append(events[30:])
    cases = [dict(), dict(kinds="click"), dict(kinds=["rating", "conversion"]), dict(kinds=[]),
             dict(since=1_700_000_300.125), dict(until=1_700_000_500.0),
             dict(since=1_700_000_100.0, until=1_700_000_900.0, kinds=["impression"])]
    for cols in (SCAN_COLUMNS, ("items", "ts", "kind"), ("user",), "item", ("value", "value", "id")):
        names = (cols,) if isinstance(cols, str) else cols
        for kw in cases:
            for decode in (False, True):
                want = [_as_columns(e, names, decode) for e in store.read(**kw)]
                got = list(store.scan(cols, decode=decode, batch=batch, **kw))
                assert got == want, (cols, kw, decode)
                for g, w in zip(got, want):      # keys keep their type: 1 and "1", 7 and "7" stay apart
                    assert [type(x) for x in g] == [type(x) for x in w]
    assert all(isinstance(i, str) and "-" in i for (i,) in store.scan(["id"]))


def test_scan_of_an_empty_stream_and_bad_arguments(store):
    assert list(store.scan(("ts", "kind"))) == []
    with pytest.raises(ValueError, match="columns"):
        store.scan(["ts", "origin"])
    with pytest.raises(ValueError, match="kinds"):
        store.scan(["ts"], kinds=["like"])
    with pytest.raises(ValueError, match="batch"):
        store.scan(["ts"], batch=0)


def test_scan_sees_events_appended_between_pages(store, rng):
    ids = store.append(_events(rng, 20))
    it = store.scan(("id",))                          # page=7: three pages
    first = [next(it) for _ in range(3)]
    late = store.append(_events(rng, 2))
    assert first + list(it) == [(i,) for i in ids + late]


def test_load_state_matches_the_reference_oldest_first(store, rng):
    events = _events(rng, 90)
    store.append(events)
    checked = [e.checked() for e in events]
    assert store.load_state() == _reference_state(checked)
    state = store.load_state(since=1_700_000_400.125)
    assert state == _reference_state(checked, since=1_700_000_400.125)
    assert all(type(u) in (int, str) for u in state)
    assert {type(i) for items in state.values() for i in items} <= {int, str}
    assert store.load_state(since=2e9) == {}


@pytest.mark.parametrize("kw", [{}, {"kinds": "click"}], ids=["plain", "filtered"])
def test_read_pages_and_sees_events_appended_between_pages(store, kw):
    store.append([Event("click", 1, i) for i in range(10)])
    it = store.read(batch=3, **kw)
    first = [next(it).item for _ in range(3)]
    store.append([Event("click", 2, 10)])
    rest = [e.item for e in it]
    assert first + rest == list(range(11))
    with pytest.raises(ValueError, match="batch"):
        store.read(batch=0)


def test_empty_stream_reads_nothing(store):
    assert list(store.read()) == [] and store.load_state() == {} and store.count() == 0
    assert store.count("click") == 0 and store.forget("nobody") == 0
    assert store.append([]) == []


def test_append_without_wait_is_stored_by_flush(store, rng):
    events = _events(rng, 25)
    for e in events:
        assert store.append([e], wait=False) == []
    store.flush()
    got = list(store.read())
    assert len(got) == 25
    for g, w in zip(got, events):
        _same(g, w)


def test_threads_appending_together_lose_nothing(store):
    def work(t):
        for i in range(20):
            store.append([Event("click", t, i, ts=1.0)], wait=bool(i % 2))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.flush()
    state = store.load_state()
    assert {u: sorted(v) for u, v in state.items()} == {t: list(range(20)) for t in range(4)}


# ---------------------------------------------------------------------------------- replicas
@pytest.mark.parametrize("protocol", ["", "?protocol=3"], ids=["resp2", "resp3"])
def test_events_after_sees_the_other_replicas_events_not_its_own(redis_url, stream, rng, protocol):
    if protocol and tuple(int(x) for x in redis.__version__.split(".")[:2]) < (5, 0):
        pytest.skip(f"redis-py {redis.__version__} has no RESP3")
    a = RedisEventStore(redis_url + protocol, stream=stream)
    b = RedisEventStore(redis_url + protocol, stream=stream)
    try:
        a.append([Event("click", 1, 1)])                 # before b's cursor: never seen by b
        ca, cb = a.events_after(None)[1], b.events_after(None)[1]
        assert isinstance(cb, str)
        mine, theirs = _events(rng, 10), _events(rng, 12)
        a.append(mine[:4])
        b.append(theirs)
        a.append(mine[4:])
        got_b, cb2 = b.events_after(cb)
        assert len(got_b) == 10
        for g, w in zip(got_b, mine):
            _same(g, w)
        got_a, ca2 = a.events_after(ca)
        assert len(got_a) == 12
        for g, w in zip(got_a, theirs):
            _same(g, w)
        assert b.events_after(cb2) == ([], cb2) and a.events_after(ca2) == ([], ca2)
        everything, _ = a.events_after(ca, exclude_origin=False)
        assert len(everything) == 22
        # a blocking wait returns as soon as the other replica appends
        timer = threading.Timer(0.2, lambda: b.append([Event("rating", "x", "y", value=5.0)]))
        timer.start()
        t0 = time.monotonic()
        got, ca3 = a.events_after(ca2, wait_s=5.0)
        timer.join()
        assert [(e.kind, e.user, e.item) for e in got] == [("rating", "x", "y")]
        assert time.monotonic() - t0 < 4.0
        t0 = time.monotonic()
        assert a.events_after(ca3, wait_s=0.1) == ([], ca3)
        assert 0.05 < time.monotonic() - t0 < 3.0
    finally:
        a.close()
        b.close()


def test_events_after_from_a_stream_not_yet_created(redis_url, stream):
    a = RedisEventStore(redis_url, stream=stream)
    b = RedisEventStore(redis_url, stream=stream)
    try:
        cur = b.events_after(None)[1]
        a.append([Event("click", 1, 2)])
        got, _ = b.events_after(cur)
        assert [(e.user, e.item) for e in got] == [(1, 2)]
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------- erasure
def test_forget_erases_every_entry_of_the_user_and_only_those(store, raw, stream, rng):
    events = _events(rng, 70)
    store.append(events)
    checked = [e.checked() for e in events]
    n_u1 = sum(e.user == "u1" for e in checked)
    assert n_u1 > 0
    assert store.forget("u1") == n_u1
    entries = raw.xrange(stream)                       # the stream itself, not through the store
    assert len(entries) == 70 - n_u1
    assert all(f[b"user"] != b"s:u1" for _, f in entries)
    assert not any(b"u1" in v for _, f in entries for k, v in f.items() if k == b"user")
    assert store.forgotten() == {user_hash("u1")}
    rest = [e for e in checked if e.user != "u1"]
    assert store.load_state() == _reference_state(rest)
    got = list(store.read())
    assert len(got) == len(rest)
    for g, w in zip(got, rest):
        _same(g, w)
    # an int key and the str of it are different users
    n3 = sum(e.user == 3 and type(e.user) is int for e in checked)
    assert store.forget("3") == 0 and store.forget(3) == n3
    assert store.forgotten() == {user_hash("u1"), user_hash("3"), user_hash(3)}
    assert store.forget("u1") == 0


def test_drop_before_trims_by_arrival_time(store, raw, stream):
    store.append([Event("click", 1, 1, ts=5.0)])       # an old ts, but it arrived now: kept
    assert store.drop_before(time.time() - 3600) == 0
    time.sleep(0.01)
    cut = time.time()
    time.sleep(0.01)
    store.append([Event("click", 2, 2, ts=5.0)])
    assert store.drop_before(cut) == 1
    assert [(e.user, e.item) for e in store.read()] == [(2, 2)]
    assert raw.xlen(stream) == 1


def test_retention_days_trims_at_open(redis_url, stream, raw):
    old_ms = int((time.time() - 10 * 86400) * 1000)
    raw.xadd(stream, {"kind": "click", "user": "i:1", "ts": "1.0", "item": "i:1", "origin": "x"}, id=f"{old_ms}-0")
    raw.xadd(stream, {"kind": "click", "user": "i:2", "ts": "1.0", "item": "i:2", "origin": "x"})
    with RedisEventStore(redis_url, stream=stream, retention_days=1) as s:
        assert s.load_state() == {2: [2]}


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad, exc, fragment", [
    (Event("like", 1, 2), ValueError, "kind"),
    (Event("click", 1.5, 2), TypeError, "user"),
    (Event("click", 1, None), ValueError, "item="),
    (Event("impression", 1), ValueError, "items"),
    (Event("rating", 1, 2), ValueError, "value="),
    (Event("click", 1, 2, ts=float("nan")), ValueError, "ts"),
    (Event("click", 2**63, 2), ValueError, "int64"),
    (Event("click", 1, 2, attrs={"x": object()}), ValueError, "attrs"),
    (Event("click", "\ud800", 2), ValueError, "UTF-8"),
    ("click", TypeError, "Event"),
])
def test_bad_events_raise_and_nothing_of_the_batch_is_stored(store, bad, exc, fragment):
    with pytest.raises(exc, match=fragment):
        store.append([Event("click", 1, 1), bad])
    assert store.count() == 0


def test_bad_arguments_raise(store, redis_url):
    store.append([Event("click", 1, 1)])
    with pytest.raises(ValueError, match="unknown event kinds"):
        list(store.read(kinds=["click", "like"]))
    with pytest.raises(ValueError, match="after_id"):
        list(store.read(after_id=5))
    with pytest.raises(ValueError, match="after_id"):
        list(store.read(after_id="abc"))
    with pytest.raises(ValueError, match="cursor"):
        store.events_after(-1)
    with pytest.raises(ValueError, match="wait_s"):
        store.events_after("0", wait_s=-1)
    with pytest.raises(ValueError, match="socket_timeout"):
        store.events_after("0", wait_s=60)
    with pytest.raises(TypeError, match="user"):
        store.forget(1.5)
    with pytest.raises(TypeError, match="user"):
        list(store.read(user=[1]))
    with pytest.raises(ValueError, match="retention_days"):
        RedisEventStore(redis_url, retention_days=0)


def test_connection_refused_names_the_url():
    url = f"redis://127.0.0.1:{_free_port()}/0"
    t0 = time.monotonic()
    with pytest.raises(EventStoreError, match=f"redis://127.0.0.1:{url.split(':')[2]}"):
        RedisEventStore(url)
    assert time.monotonic() - t0 < 10


def test_password_is_not_in_errors():
    with pytest.raises(EventStoreError) as err:
        RedisEventStore(f"redis://me:s3cret@127.0.0.1:{_free_port()}/0")
    assert "s3cret" not in str(err.value) and "me:***@127.0.0.1" in str(err.value)


def test_a_key_that_is_not_a_stream_is_refused(redis_url, raw, stream):
    raw.set(stream, "hello")
    with pytest.raises(EventStoreError, match="not an event stream"):
        RedisEventStore(redis_url, stream=stream)


def test_a_newer_schema_is_refused(redis_url, raw, stream):
    raw.hset(f"{stream}:meta", "schema", "99")
    with pytest.raises(EventStoreError, match="newer"):
        RedisEventStore(redis_url, stream=stream)


def test_closed_store_raises(redis_url, stream):
    s = RedisEventStore(redis_url, stream=stream)
    s.close()
    s.close()
    s.flush()
    with pytest.raises(EventStoreError, match="closed"):
        s.append([Event("click", 1, 1)])
    with pytest.raises(EventStoreError, match="closed"):
        list(s.read())


def test_server_gone_mid_use_is_an_event_store_error(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                s = RedisEventStore(f"redis://127.0.0.1:{port}/0", connect_timeout=1.0)
                break
            except EventStoreError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        s.append([Event("click", 1, 1)], wait=False)
        s.flush()
        proc.terminate()
        proc.wait(timeout=10)
        with pytest.raises(EventStoreError, match=f"127.0.0.1:{port}"):
            s.append([Event("click", 1, 2)])
        s.append([Event("click", 1, 3)], wait=False)
        with pytest.raises(EventStoreError, match="1 events appended without wait were not stored"):
            s.flush()
        s.flush()                                        # reported once
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_open_store_returns_the_redis_store(redis_url, raw):
    with open_store(redis_url) as s:
        assert isinstance(s, RedisEventStore) and s.stream == "rec_engine:events"
        s.append([Event("click", "a", "b")])
        assert s.load_state()["a"] == ["b"]
    raw.delete("rec_engine:events", "rec_engine:events:meta", "rec_engine:events:forgotten")


# ------------------------------------------------------------------ engines as replicas
from serving_fixtures import trained  # noqa: E402,F401 (fixture)


def test_replicas_on_a_redis_stream_see_each_others_events(trained, tmp_path, request):  # noqa: F811
    import time
    import uuid

    from rec_engine.engine import Engine

    url = request.getfixturevalue("redis_url")
    CTX = {"hour": 12.0, "device": "web"}
    stream = f"test:{uuid.uuid4().hex[:12]}"
    sa, sb = RedisEventStore(url, stream=stream), RedisEventStore(url, stream=stream)
    with sa, sb, Engine.load(trained.bundle("pipe_a"), events=sa, follow_events_s=0.5) as a, \
            Engine.load(trained.bundle("pipe_a"), events=sb, follow_events_s=0.5) as b:
        delays = []
        for j in range(20):
            t0 = time.perf_counter()
            a.observe(100 + j, [j, j + 1])
            while b.online.items(100 + j) != (j, j + 1):
                assert time.perf_counter() - t0 < 10, "replica b never saw replica a's event"
                time.sleep(0.0005)
            delays.append(time.perf_counter() - t0)
        # b waits on the stream (XREAD BLOCK), so an event arrives long before the 0.5 s poll period
        assert float(np.median(delays)) < 0.25, delays
        rec = b.recommend(100, k=50, context=CTX)
        assert not {0, 1} & set(rec.items.tolist())
        b.feedback(100, int(rec.items[0]), request_id=rec.request_id)
        deadline = time.time() + 10
        while len(a.online.items(100)) != 3 and time.time() < deadline:
            time.sleep(0.005)
        assert a.online.items(100) == (0, 1, int(rec.items[0]))
