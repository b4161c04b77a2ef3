"""`rec-engine update` trains on the items added online: they join both stages of the new version (after the
items it was trained with, in the order they were added, with the features they were added with), their logged
clicks are training interactions instead of being dropped, and an item removed since is left out."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the update trains models (train extra)")

WORLD = {"n_users": 300, "n_items": 150, "seed": 0}
NEW = [f"new-{j}" for j in range(5)]
GONE = "new-gone"            # added, then removed: not in the next version


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Version 1 in a model home; an engine over an event store adds items, shows them and logs clicks on them."""
    from rec_engine.engine import Engine
    from rec_engine.events import SqliteEventStore
    from rec_engine_train.data.synthetic import make_synthetic
    from rec_engine_train.simulate import SimClock, train_v1

    root = tmp_path_factory.mktemp("update_catalogue")
    home = root / "models"
    home.mkdir()
    train_v1(home, n_users=WORLD["n_users"], n_items=WORLD["n_items"], seed=WORLD["seed"], ctr_examples=2000,
             retrieval_epochs=2, ranking_epochs=1, n_candidates=60, log=lambda s: None)
    world = make_synthetic(**WORLD, string_keys=True)
    store = SqliteEventStore(root / "events.db")
    clock = SimClock()
    engine = Engine.load(home, events=store, ort_threads=1, num_threads=1, clock=clock)
    v = engine._version
    src = [3, 40, 41, 90, 120, 7]                          # the world items the new ones copy
    vecs = np.asarray(v.retrieval.items[src], np.float32)
    feats = [{"category": int(world.category[i]), "brand": int(world.brand[i]),
              "tags": [int(t) for t in world.tags[i]], "price": float(world.price[i])} for i in src]
    feats[2] = {"category": int(world.category[41])}          # a partly described item: the rest is missing
    engine.add_items(NEW + [GONE], vectors=vecs, features=feats)
    engine.remove_items([GONE])
    rng = np.random.default_rng(0)
    clicks = {k: 0 for k in NEW}
    old_keys = world.keys["item"].tolist()
    for j in range(120):
        clock.now += 60.0
        user = f"u-{int(rng.integers(0, WORLD['n_users']))}"
        cands = NEW + [old_keys[int(i)] for i in rng.choice(WORLD["n_items"], 10, replace=False)]
        rec = engine.recommend(user, k=8, candidates=cands, context={"hour": 12.0, "device": "web"})
        for key in rec.items.tolist():
            if key in clicks and rng.random() < 0.5:
                engine.feedback(user, key, kind="click", request_id=rec.request_id)
                clicks[key] += 1
    engine.close()
    store.close()
    return home, root / "events.db", feats, clicks


def test_the_update_trains_on_items_added_online_and_both_stages_hold_them(served, tmp_path):
    import shutil

    from rec_engine.bundle import open_bundle
    from rec_engine.engine import Engine
    from rec_engine.events import SqliteEventStore
    from rec_engine.features import Schema
    from rec_engine_train.pipeline import pipeline_stages
    from rec_engine_train.update import update

    home0, events0, feats, clicks = served
    home, events = tmp_path / "models", tmp_path / "events.db"
    shutil.copytree(home0, home)
    shutil.copy(events0, events)
    report = update(home, events, data="synthetic", epochs=1, holdout=0.0, tolerance=1.0, name="v2",
                    log=lambda s: None)
    r = report["retrieval"]
    assert r["items_added"] == len(NEW)
    assert r["events_on_added_items"] == sum(clicks.values()) > 0
    assert report["ranking"]["items_added"] == len(NEW)

    stages = pipeline_stages(open_bundle(home / "v2"))
    rb, kb = stages["retrieval"], stages["ranking"]
    n_old = WORLD["n_items"]
    n = int(rb.meta["n_items"])
    assert n == n_old + len(NEW)
    keys = rb.key_map("item", n)
    assert keys.lookup(NEW).tolist() == list(range(n_old, n))
    assert keys.lookup([GONE]).tolist() == [-1]
    # the ranking stage's item store: the same items, the new ones encoded from the features they came with
    schema = Schema.from_dict(kb.meta["schema"])
    fields = [f for f in schema.names if f in set(kb.meta["entity_fields"]["item"])]
    off = kb.array("item_features_offsets")
    assert (len(off) - 1) // len(fields) == n
    want = schema.encode({f: [feats[j].get(f) for j in range(len(NEW))] for f in fields}, fields=fields)
    F = len(fields)
    got_off = np.asarray(off[n_old * F:]) - off[n_old * F]
    assert np.array_equal(got_off, want.offsets)
    idx = np.asarray(kb.array("item_features_indices"))[off[n_old * F]:]
    assert np.array_equal(idx, want.indices)

    # served from the new version: the added items are its own (no catalogue replay needed), the removed one
    # stays out, and the items' trained vectors differ from the ones they were added with
    store = SqliteEventStore(events)
    engine = Engine.load(home / "v2", events=store, ort_threads=1, num_threads=1)
    try:
        v = engine._version
        assert v.catalogue_skipped == 0
        assert v.item_keys.lookup(NEW).tolist() == list(range(n_old, n))     # the version's own rows
        rec = engine.recommend("u-1", k=n, exclude_seen=False)
        assert GONE not in rec.items.tolist()
        assert set(NEW) <= set(rec.items.tolist())
    finally:
        engine.close()
        store.close()


def test_read_catalogue_keeps_the_order_of_first_addition_and_drops_removed_items(tmp_path):
    from rec_engine.events import Event, SqliteEventStore
    from rec_engine_train.update import read_catalogue, retrieval_data, LoggedEvents, Shown
    from rec_engine_train.data.containers import ImplicitSplit, Interactions

    store = SqliteEventStore(tmp_path / "e.db")
    store.append([Event("item_added", "", "b", ts=1, attrs={"vector": [1.0]}),
                  Event("item_added", "", "a", ts=2), Event("item_removed", "", "b", ts=3),
                  Event("item_added", "", "c", ts=4), Event("item_added", "", "b", ts=5, attrs={"vector": [2.0]}),
                  Event("item_added", "", "x0", ts=6)])
    added = read_catalogue(store)
    store.close()
    assert list(added) == ["a", "c", "b", "x0"] and added["b"]["vector"] == [2.0]
    # x0 is a base item: not added again; a click on a new item is kept, one on an unknown item dropped
    base = ImplicitSplit(train=Interactions(np.array([0, 1]), np.array([0, 1]), 2, 2), test=None, valid=None,
                         name="t", keys={"user": np.array(["u0", "u1"], object), "item": np.array(["x0", "x1"], object)})
    logged = LoggedEvents(Shown(), Shown(), [("u0", "c", 10.0), ("u1", "zz", 11.0)], [], None)
    split, info = retrieval_data(base, logged, set(), added)
    assert split.keys["item"].tolist() == ["x0", "x1", "a", "c", "b"]
    assert split.train.n_items == 5 and info["items_added"] == 3
    assert info["events_added"] == 1 and info["events_dropped"] == 1 and info["events_on_added_items"] == 1
    assert split.train.items.tolist()[-1] == 3
