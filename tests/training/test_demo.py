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
    assert (tmp_path / "events.jsonl").read_text().count('"user": "u-0"') == 1
