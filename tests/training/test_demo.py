"""The demo (`rec-engine demo`) end to end on a small synthetic world: it serves the shop's own keys."""
from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the demo trains models (train extra)")


def test_demo_serves_string_keys_and_beats_popularity(tmp_path, capsys):
    from rec_engine_train.demo import run

    out = run(str(tmp_path), n_users=300, n_items=150, requests=20)
    text = capsys.readouterr().out
    assert "user u-0: items ['sku-" in text and "unknown user (cold start" in text
    assert out["retrieval"]["recall@20"] > out["popularity"]["recall@20"]
    assert all(p50 <= p99 for p50, p99 in out["latency"].values())
    from rec_engine.events import SqliteEventStore

    with SqliteEventStore(tmp_path / "events.db") as store:
        clicks = list(store.read(kinds=["click"]))
        shown = {e.request_id: e for e in store.read(kinds=["impression"])}
    assert [c.user for c in clicks] == ["u-0", "u-0"]           # the demo's two clicks, on what it was shown
    assert all(c.item in shown[c.request_id].items for c in clicks)
    assert len(shown) == 3 + 2 + 1 + 20                          # one impression per recommend call
    assert "2 clicks" in text
