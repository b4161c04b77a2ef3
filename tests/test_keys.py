"""The user's own keys: KeyMap against a dict reference, bundles with key maps, Engine and HTTP by key
against the dense-id path."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rec_engine import KeyMap, UnknownKeyError
from rec_engine.bundle import BundleError, _manifest_digest, open_bundle, write_bundle

TRICKY = ["café-☕", "007", "7", "", " 7", "sku-1837", "u-22", "🙂" * 30, "a\x00b", "NaN", "-1", "1e3"]


# ---------------------------------------------------------------------------------------- KeyMap
def _check_against_dict(keys, probes):
    km = KeyMap.from_keys(keys)
    ref = {k: i for i, k in enumerate(keys)}
    assert len(km) == len(keys)
    np.testing.assert_array_equal(km.lookup(probes), [ref.get(p, -1) for p in probes])
    assert [km.id(p) for p in probes] == [ref.get(p, -1) for p in probes]
    ids = np.arange(len(keys), dtype=np.int64)[::-1].copy()
    back = km.keys(ids)
    assert [k.item() if isinstance(k, np.generic) else k for k in back] == [keys[i] for i in ids]
    return km


def test_string_keys_round_trip_unicode_and_numeric_looking():
    km = _check_against_dict(TRICKY, TRICKY + ["07", "x", "café"])
    assert km.kind == "str" and km.key(0) == "café-☕"
    assert km.id("007") != km.id("7")


def test_integer_keys_beyond_int32_and_negative():
    keys = [2**40 + 3, -7, 0, 2**63 - 1, -2**63, 5]
    km = _check_against_dict(keys, keys + [1, 2**31, -8])
    assert km.kind == "int"
    assert km.lookup([2**64]).tolist() == [-1]              # outside int64: simply unknown
    np.testing.assert_array_equal(km.lookup(np.array(keys, np.int64)), np.arange(len(keys)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=12), unique=True, min_size=1, max_size=200), st.lists(st.text(max_size=12), max_size=50))
def test_random_string_keys_match_a_dict(keys, extra):
    _check_against_dict(keys, keys + extra)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-2**63, 2**63 - 1), unique=True, max_size=300),
       st.lists(st.integers(-2**63, 2**63 - 1), max_size=50))
def test_random_integer_keys_match_a_dict(keys, extra):
    _check_against_dict(keys, keys + extra)


@pytest.mark.parametrize("keys, exc, match", [
    (["a", "b", "a"], ValueError, "duplicate key 'a' at positions 0 and 2"),
    ([1, 2, 3, 2], ValueError, "duplicate key 2 at positions 1 and 3"),
    ([1, "1"], TypeError, "not a mix"),
    ([1.0, 2.0], TypeError, "got a float"),
    ([True, False], TypeError, "got a bool"),
    ([None], TypeError, "got a NoneType"),
    ([2**64], ValueError, "int64"),
])
def test_bad_key_lists_are_refused(keys, exc, match):
    with pytest.raises(exc, match=match):
        KeyMap.from_keys(keys)


def test_lookups_of_the_wrong_type_and_unknown_keys():
    s, i = KeyMap.from_keys(["a", "b"]), KeyMap.from_keys([10, 20])
    with pytest.raises(TypeError, match="strings, got int at position 1"):
        s.lookup(["a", 3])
    with pytest.raises(TypeError, match="integers, got str"):
        i.lookup(["10"])
    with pytest.raises(TypeError, match="integers, got bool"):
        i.id(True)
    with pytest.raises(UnknownKeyError, match="unknown item key 'zz' \\(position 1\\)"):
        s.ids(["a", "zz"])
    with pytest.raises(IndexError):
        s.keys([2])
    d = KeyMap.dense(5)
    assert d.lookup([0, 4, 5, -1]).tolist() == [0, 4, -1, -1] and d == KeyMap.from_keys(range(5))
    assert isinstance(UnknownKeyError("x"), KeyError)


def test_duplicate_keys_are_refused_at_export(tmp_path):
    with pytest.raises(ValueError, match="duplicate key 'sku-1'"):
        write_bundle(tmp_path / "b", kind="mf", keys={"item": ["sku-1", "sku-2", "sku-1"]})
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="reserved"):
        write_bundle(tmp_path / "c", kind="mf", arrays={"item_keys": np.arange(3)}, keys={"item": [1, 2, 3]})


def test_bundle_key_maps_are_memory_mapped_and_checked(tmp_path):
    p = write_bundle(tmp_path / "b", kind="x", keys={"user": ["u1", "ü2"], "item": [10, 2**40]})
    b = open_bundle(p)
    assert b.key_map("user", 2).keys(np.array([1, 0])) == ["ü2", "u1"]
    assert b.key_map("item", 2).lookup([2**40]).tolist() == [1]
    assert b.key_map("other", 3) == KeyMap.dense(3)
    with pytest.raises(BundleError, match="holds 2 keys, the model has 3"):
        b.key_map("user", 3)


def test_import_does_not_load_onnxruntime_or_torch():
    code = ("import sys; from rec_engine import Engine, KeyMap, topk; "
            "print('onnxruntime' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------- engine by key
def _rehash(bundle: Path) -> None:
    """Recompute the sizes and sha256 of every file listed in ``bundle``'s manifest."""
    m = json.loads((bundle / "manifest.json").read_text())
    for rel in m["files"]:
        data = (bundle / rel).read_bytes()
        m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    m["digest"] = _manifest_digest(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _add_keys(bundle: Path, user_keys, item_keys) -> None:
    """Add key maps to an existing (single-model) bundle in place."""
    m = json.loads((bundle / "manifest.json").read_text())
    for entity, keys in (("user", user_keys), ("item", item_keys)):
        if keys is None:
            continue
        for name, a in KeyMap.from_keys(keys).to_arrays(entity).items():
            np.save(bundle / "arrays" / f"{name}.npy", a, allow_pickle=False)
            m["files"][f"arrays/{name}.npy"] = {}
    m.pop("digest", None)
    (bundle / "manifest.json").write_text(json.dumps(m))
    _rehash(bundle)


@pytest.fixture(scope="module")
def keyed(trained, tmp_path_factory):
    """The test pipeline twice: with dense ids, and with string user keys and string item keys."""
    from rec_engine.bundle import write_pipeline

    root = tmp_path_factory.mktemp("keyed")
    n_users, n_items = trained.graph_data.train.n_users, trained.graph_data.train.n_items
    rng = np.random.default_rng(3)
    ukeys = [f"u-{k}-ü" for k in rng.permutation(10 * n_users)[:n_users]]
    ikeys = [f"sku-{k:05d}" for k in rng.permutation(10 * n_items)[:n_items]]
    shutil.copytree(trained.bundle("lightgcn"), root / "lightgcn")
    shutil.copytree(trained.bundle("deepfm"), root / "deepfm")
    _add_keys(root / "lightgcn", ukeys, ikeys)
    _add_keys(root / "deepfm", None, ikeys)
    write_pipeline(root / "pipe", retrieval=root / "lightgcn", ranking=root / "deepfm", n_candidates=50)
    return root / "pipe", ukeys, ikeys


CTX = {"hour": 9.0, "device": "android"}


@pytest.mark.parametrize("user", [0, 17, 399])
def test_recommend_by_key_equals_the_dense_path(trained, keyed, user):
    from rec_engine import Engine

    path, ukeys, ikeys = keyed
    with Engine.load(trained.bundle("pipe_a")) as dense, Engine.load(path) as e:
        ref = dense.recommend(user, k=10, context=CTX)
        rec = e.recommend(ukeys[user], k=10, context=CTX)
        np.testing.assert_array_equal(rec.ids, ref.ids)
        np.testing.assert_allclose(rec.scores, ref.scores, atol=1e-6)
        assert list(rec.items) == [ikeys[i] for i in ref.ids] and rec.user == ukeys[user]
        cands = [int(i) for i in ref.ids[[5, 1, 7]]] + [3]
        r1 = dense.recommend(user, k=3, candidates=cands, context=CTX, exclude=[cands[1]])
        r2 = e.recommend(ukeys[user], k=3, candidates=[ikeys[i] for i in cands], context=CTX,
                         exclude=[ikeys[cands[1]]])
        np.testing.assert_array_equal(r2.ids, r1.ids)
        assert ikeys[cands[1]] not in list(r2.items)


def test_observe_by_key_equals_the_dense_path_and_new_users_fold_in(trained, keyed, tmp_path):
    from rec_engine import Engine

    path, ukeys, ikeys = keyed
    log = tmp_path / "events.db"
    with Engine.load(trained.bundle("pipe_a")) as dense, Engine.load(path, events=log) as e:
        first = dense.recommend(8, k=4, context=CTX).ids[:2].tolist()
        dense.observe(8, first)
        e.observe(ukeys[8], [ikeys[i] for i in first])
        np.testing.assert_array_equal(e.recommend(ukeys[8], k=10, context=CTX).ids,
                                      dense.recommend(8, k=10, context=CTX).ids)
        # a user no model knows: the cold-start answer, then folded in from what it touched
        new = "nouvel-utilisateur-✓"
        cold = e.recommend(new, k=5, context=CTX)
        assert cold.fallback and dense.recommend(10**6, k=5, context=CTX).ids.tolist() == cold.ids.tolist()
        e.observe(new, [ikeys[3], ikeys[9]])
        dense.observe(10**6, [3, 9])
        warm = e.recommend(new, k=5, context=CTX)
        assert not warm.fallback and {ikeys[3], ikeys[9]}.isdisjoint(warm.items)
        np.testing.assert_array_equal(warm.ids, dense.recommend(10**6, k=5, context=CTX).ids)
        with pytest.raises(UnknownKeyError, match="items: unknown item key 'sku-nope'"):
            e.observe(ukeys[1], [ikeys[0], "sku-nope"])
        with pytest.raises(TypeError, match="user must be a string key"):
            e.recommend(5)
        with pytest.raises(TypeError, match="candidates: keys of this map are strings"):
            e.recommend(ukeys[1], candidates=[1, 2])
    with Engine.load(path, events=log) as again:        # read back by key
        clicks = list(again.events.read(kinds=["click"]))
        assert clicks[0].user == ukeys[8] and [(c.user, c.item) for c in clicks[-2:]] == [(new, ikeys[3]),
                                                                                          (new, ikeys[9])]
        assert again.online.items(new) == (ikeys[3], ikeys[9])
        np.testing.assert_array_equal(again.recommend(new, k=5, context=CTX).ids, warm.ids)


def test_online_state_follows_keys_across_a_swap_to_other_dense_ids(trained, keyed, tmp_path):
    """A second version whose items are numbered differently: what was observed still excludes the
    same items (matched by key), and padding is -1 / None."""
    from rec_engine import Engine

    path, ukeys, ikeys = keyed
    other = tmp_path / "lgcn_keys_reversed"
    shutil.copytree(trained.bundle("lightgcn"), other)
    _add_keys(other, ukeys, ikeys)
    with Engine.load(path) as e:
        top = e.recommend(ukeys[2], k=3, context=CTX).items[:2].tolist()
        e.observe(ukeys[2], top)
        e.swap(other)
        after = e.recommend(ukeys[2], k=300)
        assert set(top).isdisjoint(x for x in after.items if x is not None)
        assert after.items[-1] is None and after.ids[-1] == -1


def test_http_speaks_string_keys(keyed):
    pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
    from test_service import running

    from rec_engine import Engine
    from rec_engine.service import create_app

    path, ukeys, ikeys = keyed
    with Engine.load(path) as e, running(create_app(e)) as client:
        status, body = client.request("POST", "/recommend", {"user": ukeys[4], "k": 5, "context": CTX,
                                                             "return_ids": True})
        assert status == 200 and body["items"] == [ikeys[i] for i in body["ids"]]
        assert body["items"] == e.recommend(ukeys[4], k=5, context=CTX).items.tolist()
        status, ob = client.request("POST", "/observe", {"user": ukeys[4], "items": body["items"][:1]})
        assert status == 200
        _, again = client.request("POST", "/recommend", {"user": ukeys[4], "k": 5, "context": CTX})
        assert body["items"][0] not in again["items"]
        status, err = client.request("POST", "/observe", {"user": ukeys[4], "items": ["sku-missing"]})
        assert status == 400 and "unknown item key 'sku-missing'" in err["detail"]
        status, err = client.request("POST", "/recommend", {"user": 4})
        assert status == 400 and "user must be a string key" in err["detail"]
