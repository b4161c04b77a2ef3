"""`rec-engine simulate` with new items arriving each simulated day, exploration off and on: the new items are
held out of version 1 and added while serving; with exploration they are shown and clicked, without it (and
without a vector that retrieves them) they are not; exploration fills at most its share of the slots; a seed
gives the same run; and the items added before the update are the new version's own items."""
from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch", reason="the simulation trains models (train extra)")

SMALL = {"n_users": 200, "n_items": 120, "days": 3, "update_after": 2, "users_per_day": 100, "k": 10,
         "seed": 0, "ctr_examples": 2000, "v1_retrieval_epochs": 2, "v1_ranking_epochs": 1, "update_epochs": 2,
         "n_candidates": 20, "new_items_per_day": 5, "tolerance": 1.0}
EXPLORE = 0.2       # k * EXPLORE = 2 slots a request, exactly


def _quiet(s: str) -> None:
    pass


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Exploration off and on over the small world; new items get the global mean vector (nothing known about
    them), so without exploration nothing brings them up."""
    from rec_engine_train.simulate import compare_exploration

    root = tmp_path_factory.mktemp("explore")
    return root, compare_exploration(root, explore=EXPLORE, new_item_vector="global", log=_quiet, **SMALL)


def _total(run: dict, field: str) -> int:
    return sum(d[field] for d in run["days"])


def test_the_world_holds_out_its_last_items_from_every_data_set():
    from rec_engine_train.data.synthetic import make_synthetic

    full = make_synthetic(n_users=50, n_items=40, seed=3, string_keys=True)
    held = make_synthetic(n_users=50, n_items=40, seed=3, string_keys=True, held_out_items=8)
    assert held.n_data_items == 32 and len(held.keys["item"]) == 40           # the truth keeps every item
    np.testing.assert_array_equal(held.item_factors, full.item_factors)
    split = held.implicit()
    assert split.train.n_items == 32 and len(split.keys["item"]) == 32
    for part in (split.train, split.valid, split.test):
        assert part.items.max() < 32
    ctr = held.ctr(n_examples=600)
    assert ctr.extra["rows_train"]["items"].max() < 32 and ctr.extra["rows_test"]["items"].max() < 32
    assert len(ctr.extra["entity_features"]["item"]["price"]) == 32 and len(ctr.keys["item"]) == 32
    seq = held.sequences()
    assert max(int(s.max()) for s in seq.train) < 32 and seq.n_items == 32
    # without held-out items the draws are the ones the world always made
    none = make_synthetic(n_users=50, n_items=40, seed=3, held_out_items=0)
    np.testing.assert_array_equal(none.implicit().train.items, full.implicit().train.items)
    with pytest.raises(ValueError, match="held_out_items"):
        make_synthetic(n_users=5, n_items=30, held_out_items=29)


def test_with_exploration_new_items_are_shown_and_clicked_and_without_it_they_are_not(compared):
    _, result = compared
    off, on = result["off"], result["on"]
    shown = _total(on, "shown")
    assert [d["new_items"] for d in on["days"]] == [5, 10, 15]
    assert _total(off, "explored") == 0 and _total(off, "new_shown") <= 0.005 * shown
    assert _total(on, "new_shown") >= 0.01 * shown and _total(on, "new_clicks") > 0
    assert _total(on, "explored_new") > 0
    assert all(d["new_shown"] > 0 for d in on["days"])
    # their clicks reach the update: it trains on the items added online, with logged interactions on them
    assert on["update"]["retrieval"]["items_added"] == off["update"]["retrieval"]["items_added"] == 10
    assert on["update"]["retrieval"]["events_on_added_items"] > 3 * off["update"]["retrieval"]["events_on_added_items"]
    # the comparison rows: one per day, then the periods before and after the update
    rows = result["rows"]
    assert [r["day"] for r in rows] == ["1", "2", "3", "1-2", "3-3"]
    assert rows[3]["on"]["new_shown"] == sum(d["new_shown"] for d in on["days"][:2])
    assert rows[0]["off"]["new_shown"] == 0 and rows[0]["off"]["new_ctr"] is None      # nothing shown: no CTR
    assert rows[3]["on"]["new_ctr"] == pytest.approx(
        rows[3]["on"]["new_clicks"] / rows[3]["on"]["new_shown"])


def test_exploration_fills_at_most_its_share_of_the_slots(compared):
    _, result = compared
    per_request = math.ceil(SMALL["k"] * EXPLORE)
    for d in result["on"]["days"]:
        assert 0 < d["explored_max"] <= per_request
        assert 0 < d["explored"] <= per_request * d["requests"]
        assert d["explored_share"] <= EXPLORE + 1e-9
        assert d["explored_new"] <= d["explored"] and d["explored_new"] <= d["new_shown"]


def test_a_seed_gives_the_same_run(compared, tmp_path):
    from pathlib import Path

    from rec_engine_train.simulate import run

    _, result = compared
    on = result["on"]
    again = run(tmp_path / "again", explore=EXPLORE, new_item_vector="global", v1_from=Path(on["home"]) / "v1",
                log=_quiet, **SMALL)
    assert again["days"] == on["days"]
    assert again["update"]["new"] == on["update"]["new"]


def test_items_added_before_the_update_are_the_new_versions_own_items(compared):
    from rec_engine.bundle import open_bundle
    from rec_engine.engine import Engine
    from rec_engine_train.pipeline import pipeline_stages

    root, result = compared
    on = result["on"]
    home = root / "on" / "models"
    assert on["update"]["gate"]["promoted"] and on["days"][-1]["version"] == on["update"]["name"]
    n_base = SMALL["n_items"] - SMALL["days"] * SMALL["new_items_per_day"]
    added = [f"sku-{i:04d}" for i in range(n_base, n_base + 10)]         # days 1 and 2
    later = [f"sku-{i:04d}" for i in range(n_base + 10, SMALL["n_items"])]
    v1 = Engine.load(home / "v1", ort_threads=1, num_threads=1)
    try:
        assert v1.n_items == n_base and v1._version.item_keys.lookup(added).tolist() == [-1] * 10
    finally:
        v1.close()
    stages = pipeline_stages(open_bundle(home / on["update"]["name"]))
    assert int(stages["retrieval"].meta["n_items"]) == n_base + 10
    assert stages["retrieval"].key_map("item", n_base + 10).lookup(added).tolist() == list(range(n_base, n_base + 10))
    kb = stages["ranking"]
    n_fields = len(kb.meta["entity_fields"]["item"])
    assert (len(kb.array("item_features_offsets")) - 1) // n_fields == n_base + 10
    engine = Engine.load(home, ort_threads=1, num_threads=1)       # no event store: no catalogue replay
    try:
        v = engine._version
        assert v.item_keys.lookup(added).tolist() == list(range(n_base, n_base + 10))
        assert v.item_keys.lookup(later).tolist() == [-1] * len(later)
    finally:
        engine.close()


def test_new_items_get_the_mean_vector_of_their_category(tmp_path):
    from rec_engine.engine import Engine
    from rec_engine_train.data.synthetic import make_synthetic
    from rec_engine_train.simulate import add_new_items, arriving_items, train_v1

    home = tmp_path / "models"
    home.mkdir()
    train_v1(home, n_users=80, n_items=60, seed=1, ctr_examples=500, retrieval_epochs=1, ranking_epochs=1,
             n_candidates=20, held_out_items=6, log=_quiet)
    world = make_synthetic(n_users=80, n_items=60, seed=1, string_keys=True, held_out_items=6)
    engine = Engine.load(home, ort_threads=1, num_threads=1)
    try:
        table = np.asarray(engine._version.retrieval.items, np.float32).copy()
        assert len(table) == 54
        ids = arriving_items(world, 2, 3)
        assert ids.tolist() == [57, 58, 59]
        keys = add_new_items(engine, world, ids, np.arange(54))
        v = engine._version
        assert v.n_items == 57 and v.item_keys.lookup(keys).tolist() == [54, 55, 56]
        for j, i in enumerate(ids.tolist()):
            same = np.flatnonzero(world.category[:54] == world.category[i])
            want = table[same].mean(axis=0) if len(same) else table.mean(axis=0)
            np.testing.assert_allclose(np.asarray(v.retrieval.items[54 + j]), want, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="vector"):
            add_new_items(engine, world, arriving_items(world, 1, 3), np.arange(54), vector="text")
    finally:
        engine.close()


def test_simulate_command_passes_new_items_and_exploration(monkeypatch, tmp_path):
    from rec_engine.cli import main
    from rec_engine_train import simulate

    calls = []
    monkeypatch.setattr(simulate, "run", lambda out, **kw: calls.append(("run", out, kw)))
    monkeypatch.setattr(simulate, "compare_exploration", lambda out, **kw: calls.append(("compare", out, kw)))
    assert main(["simulate", "--out", str(tmp_path), "--new-items-per-day", "4", "--explore", "0.3"]) == 0
    assert main(["simulate", "--compare-explore", "--new-item-vector", "global", "--days", "5"]) == 0
    assert main(["simulate"]) == 0
    (k1, out1, kw1), (k2, out2, kw2), (k3, _, kw3) = calls
    assert (k1, out1, kw1["new_items_per_day"], kw1["explore"]) == ("run", str(tmp_path), 4, 0.3)
    assert (k2, out2, kw2["new_items_per_day"], kw2["explore"]) == ("compare", None, 10, 0.1)
    assert kw2["new_item_vector"] == "global" and kw2["days"] == 5
    assert (k3, kw3["new_items_per_day"], kw3["explore"]) == ("run", 0, 0.0)     # today's run, unchanged
