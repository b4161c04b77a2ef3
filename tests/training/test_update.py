"""The offline update (`rec-engine update`) and the closed loop on the synthetic world: a version trained on the
logged events serves a higher CTR and passes the gate, a broken one is refused, forgotten users leave the
training data, and rollback returns to version 1."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("torch", reason="the update trains models (train extra)")

WORLD = {"n_users": 300, "n_items": 150, "seed": 0}
FORGOTTEN = "u-7"


def _served(root, days: int = 2):
    """Version 1 in a model home, served for ``days`` simulated days into an event store."""
    from rec_engine.engine import Engine
    from rec_engine.events import SqliteEventStore
    from rec_engine_train.data.synthetic import make_synthetic
    from rec_engine_train.simulate import SimClock, serve_day, train_v1

    home = root / "models"
    home.mkdir(parents=True)
    train_v1(home, n_users=WORLD["n_users"], n_items=WORLD["n_items"], seed=WORLD["seed"], ctr_examples=2000,
             retrieval_epochs=2, ranking_epochs=1, n_candidates=60, log=lambda s: None)
    world = make_synthetic(**WORLD, string_keys=True)
    store = SqliteEventStore(root / "events.db")
    clock = SimClock()
    engine = Engine.load(home, events=store, ort_threads=1, num_threads=1, clock=clock)
    rng = np.random.default_rng(1)
    try:
        for day in range(1, days + 1):
            serve_day(engine, world, rng, 200, clock=clock, day=day)
    finally:
        engine.close()
        store.close()
    return home, root / "events.db", world


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return _served(tmp_path_factory.mktemp("served"))


@pytest.fixture
def copy(served, tmp_path):
    """A private copy of the served home and its event store."""
    home, events, world = served
    shutil.copytree(home, tmp_path / "models")
    shutil.copy(events, tmp_path / "events.db")
    return tmp_path / "models", tmp_path / "events.db", world


def _expected_ctr(path, events, world, tmp_path, seed: int = 5) -> float:
    """Mean true click probability of what the bundle at ``path`` shows to one simulated day of users, served
    with (a copy of) the event store, so the users' earlier clicks are excluded as in the closed loop."""
    from rec_engine.engine import Engine
    from rec_engine_train.simulate import serve_day

    store = tmp_path / f"events-{path.name}.db"
    shutil.copy(events, store)
    engine = Engine.load(path, events=store, ort_threads=1, num_threads=1)
    try:
        s = serve_day(engine, world, np.random.default_rng(seed), 200)
    finally:
        engine.close()
    return s["expected"] / s["shown"]


def test_update_promotes_a_version_with_higher_ctr_and_rollback_returns_to_v1(copy, tmp_path):
    from rec_engine import versions
    from rec_engine_train.update import update

    home, events, world = copy
    report = update(home, events, epochs=8, log=lambda s: None)
    assert report["name"] == "v2" and report["gate"]["promoted"], report["gate"]
    assert versions.current(home) == "v2" and versions.resolve(home) == home / "v2"
    assert report["new"]["ranking"]["auc"] > report["current"]["ranking"]["auc"]
    assert report["ranking"]["examples_logged"] > 0 and report["retrieval"]["events_added"] > 0
    assert report["retrieval"]["warm_start"] and report["ranking"]["warm_start"] == "tables and dense part"
    assert (home / "v2.update.json").is_file()
    # the simulated users click more of what version 2 shows (same users, contexts and draws for both)
    v1, v2 = (_expected_ctr(home / v, events, world, tmp_path) for v in ("v1", "v2"))
    assert v2 > v1 + 0.01, (v1, v2)
    print(f"expected CTR v1 {v1:.4f} v2 {v2:.4f}")
    assert versions.rollback(home) == "v1" and versions.resolve(home) == home / "v1"


def test_update_with_shuffled_labels_is_refused_by_the_gate(copy):
    from rec_engine import versions
    from rec_engine_train.update import update

    home, events, _ = copy
    report = update(home, events, epochs=3, shuffle_labels=True, log=lambda s: None)
    assert not report["gate"]["promoted"]
    assert report["new"]["ranking"]["auc"] < report["current"]["ranking"]["auc"] - report["tolerance"]
    assert versions.current(home) == "v1" and versions.history(home) == ["v1"]


def test_forgotten_users_are_not_in_the_updates_training_data(copy, monkeypatch):
    from rec_engine.bundle import open_bundle
    from rec_engine.events import SqliteEventStore
    from rec_engine.features import Schema
    from rec_engine_train.models import ctr as ctr_models
    from rec_engine_train.update import update

    home, events, _ = copy
    with SqliteEventStore(events) as store:
        assert store.count() > 0
        store.forget(FORGOTTEN)
    seen = {}
    train_ctr = ctr_models.train_ctr

    def spy(kind, data, config, log=print, *, model=None):
        seen["data"] = data
        seen["model"] = model
        return train_ctr(kind, data, config, log, model=model)

    monkeypatch.setattr(ctr_models, "train_ctr", spy)
    report = update(home, events, epochs=1, tolerance=1.0, log=lambda s: None)
    assert report["retrieval"]["users_forgotten"] == 1 and report["ranking"]["users_forgotten"] == 1
    retrieval = open_bundle(home / "v2" / "retrieval")
    users = retrieval.key_map("user", retrieval.meta["n_users"])
    assert users.id(FORGOTTEN) == -1 and users.id("u-8") >= 0
    ranking = open_bundle(home / "v1" / "ranking")
    schema = Schema.from_dict(ranking.meta["schema"])
    row = int(schema.encode({"user_id": [int(FORGOTTEN[2:])]}, fields=["user_id"]).indices[0])
    data = seen["data"]
    for part in (data.train, data.valid, data.test):
        assert row not in set(part.indices.tolist())
    other = int(schema.encode({"user_id": [8]}, fields=["user_id"]).indices[0])
    assert other in set(data.train.indices.tolist())


def test_update_command_refuses_a_broken_model_and_writes_the_comparison(copy, capsys):
    import json

    from rec_engine import versions
    from rec_engine.cli import main

    home, events, _ = copy
    rc = main(["update", str(home), "--events", str(events), "--epochs", "2", "--shuffle-labels", "--name", "broken"])
    out = capsys.readouterr().out
    assert rc == 0 and "gate: REFUSED" in out and "ranking AUC" in out and "retrieval recall@60" in out
    report = json.loads((home / "broken.update.json").read_text())
    assert report["gate"]["promoted"] is False and report["ranking"]["shuffled_labels"] is True
    assert versions.current(home) == "v1" and (home / "broken" / "manifest.json").is_file()


def test_simulate_command_prints_ctr_per_day_and_version_and_the_gate(tmp_path, capsys):
    from rec_engine import versions
    from rec_engine.cli import main

    rc = main(["simulate", "--out", str(tmp_path), "--users", "200", "--items", "100", "--days", "2",
               "--update-after", "1", "--users-per-day", "100", "--update-epochs", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "day 1: version v1" in out and "offline update after day 1" in out and "gate: " in out
    assert "expected CTR" in out and "rec-engine report" in out
    assert "| v1 | 2026-01-01 |" in out and "| v2 | 2026-01-02 |" in out    # simulated days are days in the store
    current = versions.current(tmp_path / "models")
    assert f"day 2: version {current}" in out


def test_a_promoted_update_asks_the_server_to_swap_with_the_bearer_token(copy, monkeypatch):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from rec_engine_train.update import update

    got = {}

    class Swap(BaseHTTPRequestHandler):
        def do_POST(self):
            got["path"], got["auth"] = self.path, self.headers.get("Authorization")
            got["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"version": "abc"}')

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Swap)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SWAP_TOKEN", "s3cret")
    home, events, _ = copy
    try:
        report = update(home, events, epochs=1, tolerance=1.0, server=f"http://127.0.0.1:{server.server_port}",
                        token_env="SWAP_TOKEN", log=lambda s: None)
    finally:
        server.shutdown()
        server.server_close()
    assert report["gate"]["promoted"] and report["server"] == {"version": "abc"}
    assert got == {"path": "/swap", "auth": "Bearer s3cret", "body": {"bundle": str((home / "v2").resolve())}}
