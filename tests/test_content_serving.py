"""Content at serving time: similar items by text vectors (and blended), hybrid retrieval for users with few
events, and items added with text mapped into the item space. The bundles are the serving fixtures' pipelines
with content arrays written into their retrieval stage (the format training writes: arrays/content_vectors.npy
[n_items, c] and arrays/content_map.npy [c + 1, d]), checked against brute-force references."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rec_engine.bundle import _manifest_digest
from rec_engine.engine import Engine

from serving_fixtures import trained  # noqa: F401 (fixture)

CTX = {"hour": 12.0, "device": "web"}
C = 8


def _sha(p: Path) -> dict:
    return {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}


def _with_content(src: Path, dst: Path, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """A copy of pipeline ``src`` whose retrieval stage stores content vectors and a content map."""
    shutil.copytree(src, dst)
    stage = dst / "retrieval"
    m = json.loads((stage / "manifest.json").read_text())
    items = np.load(stage / "tables" / "items.npy") if (stage / "tables" / "items.npy").exists() else None
    n, d = m["meta"]["n_items"], (items.shape[1] if items is not None else 16)
    rng = np.random.default_rng(seed)
    cv = rng.normal(size=(n, C)).astype(np.float32)
    cv /= np.linalg.norm(cv, axis=1, keepdims=True)
    cmap = rng.normal(size=(C + 1, d)).astype(np.float32)
    for name, a in (("content_vectors", cv), ("content_map", cmap)):
        np.save(stage / "arrays" / f"{name}.npy", a)
        m["files"][f"arrays/{name}.npy"] = _sha(stage / "arrays" / f"{name}.npy")
    m["meta"]["content"] = {"dim": C}
    m["digest"] = _manifest_digest(m)
    (stage / "manifest.json").write_text(json.dumps(m))
    top = json.loads((dst / "manifest.json").read_text())
    top["files"]["retrieval/manifest.json"] = _sha(stage / "manifest.json")
    top["digest"] = _manifest_digest(top)
    (dst / "manifest.json").write_text(json.dumps(top))
    return dst, cv, cmap


@pytest.fixture(scope="module")
def content_a(trained, tmp_path_factory):  # noqa: F811
    return _with_content(trained.bundle("pipe_a"), tmp_path_factory.mktemp("content") / "pipe_a", 1)


def _top(scores: np.ndarray, k: int, drop=()) -> list:
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [int(i) for i in order if i not in set(drop)][:k]


def test_similar_items_by_content_and_blend_match_brute_force(content_a):
    path, cv, _ = content_a
    with Engine.load(path, num_threads=1) as e:
        unit = e._version.unit_table("item").astype(np.float64)
        for q in (0, 7, 123):
            got = e.similar_items(q, k=6, by="content")
            assert got.ids.tolist() == _top(cv.astype(np.float64) @ cv[q], 6, drop=[q])
            np.testing.assert_allclose(got.scores, np.sort(cv @ cv[q])[::-1][1:7], rtol=1e-5, atol=1e-6)
            blend = e.similar_items(q, k=6, by="blend", alpha=0.3)
            ref = 0.3 * (unit @ unit[q]) + 0.7 * (cv.astype(np.float64) @ cv[q])
            assert blend.ids.tolist() == _top(ref, 6, drop=[q])
        with pytest.raises(ValueError, match="by must be"):
            e.similar_items(1, by="colour")
        with pytest.raises(ValueError, match="alpha"):
            e.similar_items(1, by="blend", alpha=2)


def test_users_with_few_events_get_content_fused_with_collaborative(content_a, trained):  # noqa: F811
    path, cv, _ = content_a
    with Engine.load(path, num_threads=1, hybrid_max_events=3) as e, \
            Engine.load(path, num_threads=1, hybrid_max_events=0) as plain:
        user = 10**6                              # unknown to the model: folded in from its observed items
        for x in (e, plain):
            x.observe(user, [4, 9])
        v = e._version
        n = 50
        st = v.user_state(user, e.online)
        seen = v.retrieval.seen(st)
        collab = v.retrieval.retrieve(st, n, exclude=seen)
        prof = cv[seen].sum(axis=0)
        content_ids = _top(cv @ (prof / np.linalg.norm(prof)), n, drop=seen.tolist())
        fused: dict = {}
        for ranked in (content_ids, collab.ids.tolist()):
            for r, i in enumerate(ranked):
                fused[i] = fused.get(i, 0.0) + 1.0 / (60 + r + 1)
        want = sorted(fused, key=lambda i: (-fused[i], i))[:n]
        got = v.retrieval.retrieve(st, n, exclude=seen)          # the plain retrieval is unchanged...
        np.testing.assert_array_equal(got.ids, collab.ids)
        hyb = e._hybrid(v, st, n, seen, collab)                  # ...and the hybrid answer is the fusion
        assert hyb.ids.tolist() == want
        rec = e.recommend(user, k=10, context=CTX)
        assert set(rec.ids.tolist()) <= set(want) and not {4, 9} & set(rec.items.tolist())
        batch = e.recommend_batch([user, 3], k=10, context=CTX)
        np.testing.assert_array_equal(batch[0].ids, rec.ids)
        # a user with more events than the threshold: exactly the plain engine's answer
        np.testing.assert_array_equal(e.recommend(3, k=10, context=CTX).ids, plain.recommend(3, k=10, context=CTX).ids)


def test_with_profiles_the_content_half_follows_the_decayed_profile_vector(content_a, tmp_path):
    """With profiles, a user with few events is retrieved by its profile's preference vector: the decayed,
    event-weighted mean of its items' text vectors (a conversion weighs 3 clicks), not their plain mean."""
    path, cv, _ = content_a
    with Engine.load(path, num_threads=1, hybrid_max_events=3, events=tmp_path / "ev.db",
                     profiles={"min_events": 1}) as e:
        user = 10**6
        e.observe(user, [4], kind="click")
        e.observe(user, [9], kind="conversion")
        v = e._version
        st = v.user_state(user, e.online)
        seen = v.retrieval.seen(st)
        prof = (cv[4] / np.linalg.norm(cv[4]) * 1.0 + cv[9] / np.linalg.norm(cv[9]) * 3.0) / 4.0
        got = np.asarray(v.profiles.profiles.get(user).vectors["content"])
        np.testing.assert_allclose(got, prof, rtol=1e-4, atol=1e-6)
        n = 50
        content_ids = _top(cv @ (prof / np.linalg.norm(prof)), n, drop=seen.tolist())
        collab = v.retrieval.retrieve(st, n, exclude=seen)
        fused: dict = {}
        for ranked in (content_ids, collab.ids.tolist()):
            for r, i in enumerate(ranked):
                fused[i] = fused.get(i, 0.0) + 1.0 / (60 + r + 1)
        want = sorted(fused, key=lambda i: (-fused[i], i))[:n]
        assert e._hybrid(v, st, n, seen, collab).ids.tolist() == want


class _StubEncoder:
    """Stands in for the ONNX encoder: a fixed unit vector per text (tests of the encoder are test_content.py)."""

    def encode(self, texts):
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=C) for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_items_added_with_text_get_mapped_vectors_and_keep_them_across_restart_and_swap(content_a, trained,
                                                                                         tmp_path):  # noqa: F811
    path, cv, cmap = content_a
    path_b, _, cmap_b = _with_content(trained.bundle("pipe_b"), tmp_path / "pipe_b", 2)
    db = tmp_path / "ev.db"
    texts = ["Space opera. Genres: Sci-Fi", "A quiet drama. Genres: Drama"]
    with Engine.load(path, events=db, num_threads=1) as e:
        with pytest.raises(ValueError, match="content encoder"):
            e.add_items([9001], text=texts[:1])
        e._encoder = _StubEncoder()
        e._encoder.meta = {"weights_sha256": "f" * 64}
        e._version.content_meta["encoder_weights_sha256"] = "0" * 64
        with pytest.raises(ValueError, match="other weights"):
            e.add_items([9001], text=texts[:1])
        e._version.content_meta["encoder_weights_sha256"] = "f" * 64
        c = e._encoder.encode(texts)
        ids = e.add_items([9001, 9002], text=texts, features=[{"category": 1}, None])
        r = e._version.retrieval
        np.testing.assert_allclose(r.items[ids], c @ cmap[:-1] + cmap[-1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(e._version.content_vectors[ids], c, rtol=1e-6)
        got = e.similar_items(9001, k=3, by="content")      # an item added a second ago has neighbours
        assert got.ids.tolist() == _top(e._version.content_vectors @ c[0], 3, drop=[int(ids[0])])
        e.swap(path_b)                                        # re-mapped by the new version's content map
        rb = e._version.retrieval
        idb = e.item_keys.ids([9001, 9002])
        np.testing.assert_allclose(rb.items[idb], c @ cmap_b[:-1] + cmap_b[-1], rtol=1e-5, atol=1e-5)
    with Engine.load(path, events=db, num_threads=1) as again:   # replayed from the store: same vectors
        ida = again.item_keys.ids([9001, 9002])
        np.testing.assert_allclose(again._version.retrieval.items[ida], c @ cmap[:-1] + cmap[-1], rtol=1e-5,
                                   atol=1e-5)


fastapi = pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
from test_service import TOKEN, running  # noqa: E402

from rec_engine.service import create_app  # noqa: E402


def test_text_items_and_content_neighbours_over_http(content_a):
    path, cv, cmap = content_a
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Engine.load(path, num_threads=1) as e, running(create_app(e, token=TOKEN)) as client:
        e._encoder = _StubEncoder()
        st, _ = client.request("POST", "/items", {"items": [{"key": 9101, "text": "Noir. Genres: Crime"}]}, headers=auth)
        assert st == 200
        st, body = client.request("POST", "/similar_items", {"item": 9101, "k": 4, "by": "content"})
        assert st == 200 and body["items"] == e.similar_items(9101, k=4, by="content").items.tolist()
        mixed = {"items": [{"key": 9102, "text": "x"}, {"key": 9103}]}
        assert client.request("POST", "/items", mixed, headers=auth)[0] == 422
        assert client.request("POST", "/similar_items", {"item": 1, "by": "colour"})[0] == 422
