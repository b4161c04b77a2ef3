"""The serving side of the feedback loop: impressions and feedback in the event store, A/B serving, model
homes (CURRENT pointer, rollback), forget, and the HTTP endpoints and metrics for them."""
from __future__ import annotations

import json
import logging
import shutil
import sqlite3

import numpy as np
import pytest

from rec_engine import versions
from rec_engine.bundle import BundleError
from rec_engine.engine import Engine, version_tag

from serving_fixtures import trained  # noqa: F401 (fixture)

CTX = {"hour": 12.0, "device": "web"}


@pytest.fixture()
def home(trained, tmp_path):  # noqa: F811
    h = tmp_path / "models"
    h.mkdir()
    for name, src in (("v1", "pipe_a"), ("v2", "pipe_b")):
        shutil.copytree(trained.bundle(src), h / name)
    versions.promote(h, "v1")
    return h


def test_a_model_home_is_followed_promoted_and_rolled_back(home, trained):  # noqa: F811
    with Engine.load(home) as e, Engine.load(trained.bundle("pipe_a")) as a:
        assert e.version == a.version
    versions.promote(home, "v2")
    assert versions.current(home) == "v2" and versions.history(home) == ["v1", "v2"]
    with Engine.load(home) as e, Engine.load(trained.bundle("pipe_b")) as b:
        assert e.version == b.version
    assert versions.rollback(home) == "v1" and versions.current(home) == "v1"
    with pytest.raises(BundleError, match="no version before"):
        versions.rollback(home)
    with pytest.raises(ValueError, match="folder name"):
        versions.promote(home, "../v1")
    with pytest.raises(BundleError, match="not a bundle"):
        versions.promote(home, "v9")
    (home / "CURRENT").write_text("gone\n")
    with pytest.raises(BundleError, match="not a bundle"):
        Engine.load(home)


def test_rollback_command(home, capsys):
    from rec_engine.cli import main

    versions.promote(home, "v2")
    assert main(["rollback", str(home)]) == 0
    assert versions.current(home) == "v1" and "CURRENT -> v1" in capsys.readouterr().out
    assert main(["rollback", str(home)]) == 2
    assert "no version before" in capsys.readouterr().err


def test_ab_serving_splits_users_stably_and_impressions_record_the_version(trained, tmp_path):  # noqa: F811
    users = list(range(300))
    with Engine.load(trained.bundle("pipe_a"), events=tmp_path / "ev.db", candidate=trained.bundle("pipe_b"),
                     candidate_fraction=0.3) as e, \
            Engine.load(trained.bundle("pipe_a")) as a, Engine.load(trained.bundle("pipe_b")) as b:
        assert e.ab == {"control": a.version, "candidate": b.version, "fraction": 0.3}
        recs = [e.recommend(u, k=5, context=CTX) for u in users]
        on_b = [r.version == b.version for r in recs]
        assert 0.2 < np.mean(on_b) < 0.4                       # the stated share, by a hash of the key
        assert on_b == [e.recommend(u, k=5, context=CTX).version == b.version for u in users]   # stable
        for u, r in zip(users[:40], recs[:40]):                 # each answer is its version's own answer
            want = (b if r.version == b.version else a).recommend(u, k=5, context=CTX)
            np.testing.assert_array_equal(r.ids, want.ids)
        batch = e.recommend_batch(users[:40], k=5, context=CTX)
        assert [r.version for r in batch] == [r.version for r in recs[:40]]
        for r, single in zip(batch, recs[:40]):
            np.testing.assert_array_equal(r.ids, single.ids)
        shown = {ev.request_id: ev for ev in e.events.read(kinds=["impression"])}
        assert len(shown) == 2 * len(users) + 40
        for r in recs:
            ev = shown[r.request_id]
            assert ev.version == r.version and ev.user == r.user and list(ev.items) == r.items.tolist()
            assert ev.attrs == {"context": CTX}
        e.clear_candidate()
        assert e.ab is None and all(e.recommend(u, k=5, context=CTX).version == a.version for u in users[:50])
        e.set_candidate(trained.bundle("pipe_b"), 1.0)
        assert e.promote_candidate() == b.version and e.version == b.version and e.ab is None
    with pytest.raises(ValueError, match="candidate_fraction"):
        Engine.load(trained.bundle("pipe_a"), candidate=trained.bundle("pipe_b"), candidate_fraction=1.5)
    with pytest.raises(ValueError, match="needs a candidate"):
        Engine.load(trained.bundle("pipe_a"), candidate_fraction=0.5)
    with pytest.raises(TypeError, match="unknown Engine options: colour"):
        Engine.check_options(colour="red")


def test_forget_leaves_no_trace_in_the_database(trained, tmp_path):  # noqa: F811
    db = tmp_path / "ev.db"
    secret = 271
    with Engine.load(trained.bundle("pipe_a"), events=db) as e:
        for u in (secret, 5, secret):
            rec = e.recommend(u, k=5, context=CTX)
            e.feedback(u, int(rec.items[0]), request_id=rec.request_id)
            e.feedback(u, int(rec.items[1]), kind="conversion", value=3.0, request_id=rec.request_id)
        e.observe(secret, [7, 8], kind="rating", value=5.0)
        assert e.forget(secret) == 2 * 3 + 2
        assert e.online.items(secret) is None
        assert e.online.items(5) is not None
    conn = sqlite3.connect(db)
    tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for t in tables:
        for row in conn.execute(f"SELECT * FROM {t}"):
            assert secret not in row and str(secret) not in [str(x) for x in row], (t, row)
    assert conn.execute("SELECT COUNT(*) FROM events WHERE user = 5").fetchone()[0] == 3   # an impression, a click, a conversion
    conn.close()
    with Engine.load(trained.bundle("pipe_a"), events=db) as again:        # and it stays forgotten
        assert again.online.items(secret) is None


def test_window_days_reads_only_recent_interactions(trained, tmp_path):  # noqa: F811
    import time
    db = tmp_path / "ev.db"
    with Engine.load(trained.bundle("pipe_a"), events=db) as e:
        e.observe(1, [3], ts=time.time() - 10 * 86400)
        e.observe(1, [4])
    with Engine.load(trained.bundle("pipe_a"), events=db, window_days=2) as e:
        assert e.online.items(1) == (4,)
    with Engine.load(trained.bundle("pipe_a"), events=db, retention_days=5) as e:
        assert e.events.count() == 1 and e.online.items(1) == (4,)


def test_two_engines_on_one_store_follow_each_other(trained, tmp_path):  # noqa: F811
    import time
    db = tmp_path / "ev.db"
    with Engine.load(trained.bundle("pipe_a"), events=db, follow_events_s=0.02) as a, \
            Engine.load(trained.bundle("pipe_a"), events=db, follow_events_s=0.02) as b:
        a.observe(9, [1, 2])
        deadline = time.time() + 10
        while b.online.items(9) != (1, 2) and time.time() < deadline:
            time.sleep(0.01)
        assert b.online.items(9) == (1, 2) and a.online.items(9) == (1, 2)
        assert not {1, 2} & set(b.recommend(9, k=50, context=CTX).items.tolist())
        assert b.forget(9) == 3                  # two clicks and an impression; a user forgotten by one leaves the other's state too
        deadline = time.time() + 10
        while a.online.items(9) is not None and time.time() < deadline:
            time.sleep(0.01)
        assert a.online.items(9) is None


# ---------------------------------------------------------------------------------------------- HTTP
fastapi = pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
from test_service import AUTH, TOKEN, running  # noqa: E402

from rec_engine.service import create_app  # noqa: E402


def _metric(text: str, prefix: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def test_http_feedback_forget_ab_and_metrics(trained, tmp_path, caplog):  # noqa: F811
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Engine.load(trained.bundle("pipe_a"), events=tmp_path / "ev.db") as e, \
            running(create_app(e, token=TOKEN)) as client, caplog.at_level(logging.DEBUG):
        st, rec = client.request("POST", "/recommend", {"user": 3, "k": 4, "context": CTX})
        assert st == 200 and len(rec["request_id"]) == 32 and rec["version"] == e.version
        st, _ = client.request("POST", "/feedback", {"user": 3, "item": rec["items"][0], "request_id": rec["request_id"]},
                               headers=AUTH)
        assert st == 200
        st, _ = client.request("POST", "/feedback", {"user": 3, "item": rec["items"][1], "kind": "conversion",
                                                     "value": 19.5, "request_id": rec["request_id"]}, headers=AUTH)
        assert st == 200
        st, _ = client.request("POST", "/observe", {"user": 3, "items": [rec["items"][2]], "kind": "click"},
                               headers=AUTH)
        assert st == 200
        for bad in ({"user": 3, "item": 1, "kind": "impression"}, {"user": 3, "item": 1, "value": "x"},
                    {"user": 3, "item": 1, "request_id": ""}, {"user": 3}):
            assert client.request("POST", "/feedback", bad, headers=AUTH)[0] == 422, bad
        assert client.request("POST", "/feedback", {"user": 3, "item": 10**7}, headers=AUTH)[0] == 400
        assert client.request("POST", "/feedback", {"user": 3, "item": 1, "kind": "rating"}, headers=AUTH)[0] == 400
        st, text = client.request("GET", "/metrics")
        v = e.version
        assert _metric(text, f'rec_engine_recommendations_total{{version="{v}"}}') == 1
        assert _metric(text, f'rec_engine_items_shown_total{{version="{v}"}}') == 4
        assert _metric(text, f'rec_engine_feedback_total{{kind="click",version="{v}"}}') == 1
        assert _metric(text, f'rec_engine_feedback_total{{kind="conversion",version="{v}"}}') == 1
        assert _metric(text, 'rec_engine_feedback_total{kind="click",version="unknown"}') == 1
        assert _metric(text, f'rec_engine_coverage{{version="{v}"}}') == pytest.approx(4 / e.n_items)
        info = e._version.self_information()
        ids = np.asarray(e.item_keys.ids(rec["items"]))
        assert _metric(text, f'rec_engine_novelty_bits_total{{version="{v}"}}') == pytest.approx(info[ids].sum())
        # forget and A/B are behind the token
        assert client.request("POST", "/forget", {"user": 3})[0] == 401
        st, body = client.request("POST", "/forget", {"user": 3}, headers=auth)
        assert st == 200 and body["events_erased"] == 4
        assert list(e.events.read(user=3)) == []
        assert client.request("POST", "/ab", {"bundle": str(trained.bundle("pipe_b")), "fraction": 0.5})[0] == 401
        st, body = client.request("POST", "/ab", {"bundle": str(trained.bundle("pipe_b")), "fraction": 0.5},
                                  headers=auth)
        assert st == 200 and body["ab"]["fraction"] == 0.5
        got = {client.request("POST", "/recommend", {"user": u, "k": 2, "context": CTX})[1]["version"]
               for u in range(40)}
        assert got == {body["ab"]["control"], body["ab"]["candidate"]}
        # feedback is tied to the version whose tag ends its request id, the candidate's included
        by_version = {}
        for u in range(40):
            r = client.request("POST", "/recommend", {"user": u, "k": 2, "context": CTX})[1]
            assert r["request_id"].endswith(version_tag(r["version"])) and len(r["request_id"]) == 32
            by_version.setdefault(r["version"], r)
        cand = body["ab"]["candidate"]
        r = by_version[cand]
        clicks = f'rec_engine_feedback_total{{kind="click",version="{cand}"}}'
        before = _metric(client.request("GET", "/metrics")[1], clicks)
        assert client.request("POST", "/feedback", {"user": r["user"], "item": r["items"][0],
                                                    "request_id": r["request_id"]}, headers=auth)[0] == 200
        text = client.request("GET", "/metrics")[1]
        assert _metric(text, clicks) == before + 1
        assert client.request("POST", "/ab", {"bundle": str(tmp_path / "nope"), "fraction": 0.5},
                              headers=auth)[0] == 422
        assert client.request("GET", "/healthz")[1]["ab"]["fraction"] == 0.5
        st, body = client.request("POST", "/ab", {"bundle": None}, headers=auth)
        assert st == 200 and body["ab"] is None
        client.request("POST", "/recommend", {"user": "secret-user-key-%%", "k": 2})
    # request bodies never reach the logs
    assert all("secret-user-key" not in r.getMessage() for r in caplog.records)



def test_swap_to_a_bundle_with_a_truncated_onnx_or_bad_meta_is_422_and_keeps_serving(trained, tmp_path):  # noqa: F811
    import hashlib
    import json as _json

    from rec_engine.bundle import _manifest_digest

    def corrupt(name, change):
        dst = tmp_path / name
        shutil.copytree(trained.bundle("pipe_a"), dst)
        stage = dst / "ranking"
        m = _json.loads((stage / "manifest.json").read_text())
        change(stage, m)
        m["digest"] = _manifest_digest(m)
        (stage / "manifest.json").write_text(_json.dumps(m))
        top = _json.loads((dst / "manifest.json").read_text())
        mf = (stage / "manifest.json").read_bytes()
        top["files"]["ranking/manifest.json"] = {"sha256": hashlib.sha256(mf).hexdigest(), "bytes": len(mf)}
        top["digest"] = _manifest_digest(top)
        (dst / "manifest.json").write_text(_json.dumps(top))
        return dst

    def truncate(stage, m):
        onnx = next(p for p in stage.glob("*.onnx"))
        data = onnx.read_bytes()[:200]
        onnx.write_bytes(data)
        m["files"][onnx.name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def bad_meta(stage, m):
        m["meta"]["dim"] = "sixteen"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e, running(create_app(e, token=TOKEN)) as client:
        before = e.version
        for bundle in (corrupt("truncated", truncate), corrupt("badmeta", bad_meta)):
            st, body = client.request("POST", "/swap", {"bundle": str(bundle)}, headers=auth)
            assert st == 422 and "still serving" in body["detail"], body
            assert client.request("POST", "/ab", {"bundle": str(bundle), "fraction": 0.5}, headers=auth)[0] == 422
            assert e.version == before
            assert client.request("POST", "/recommend", {"user": 3, "k": 3, "context": CTX})[0] == 200
