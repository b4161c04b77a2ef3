"""Item cold start on MovieLens (ml-latest-small): new items ranked from their text alone.

    python -m rec_engine_train.experiments.coldstart --data ../shared/data/movielens-small --out coldstart.json

Protocol (the standard item cold-start split): a seeded 10% of the rated movies are held out of training
entirely (every interaction with them removed); every rating counts as an interaction. The other interactions
are split per user at random (80% train, 10% validation for early stopping, 10% warm test) and LightGCN (or MF,
``--model``) is trained on the train part. Each movie's text is ``item_text(title, genres=genres)`` (tags are
left out: MovieLens tags are applied by users who watched the movie, so a new movie has none; ``--with-tags``
adds them to every movie anyway, which leaks), encoded by the content encoder. For every user with an
interaction with a held-out movie, the held-out movies (and only they) are ranked, and Recall@20 / NDCG@20 are
taken against the user's held-out movies (:func:`rec_engine_train.metrics.ranking_metrics`). Methods:

- **content map** (the project's method, through serving): the trained model is exported as a retrieval bundle
  with its movies' content (what ``rec-engine train --items`` writes: the content vectors and the ridge map from
  them to the trained item vectors, fitted on the warm movies with a train interaction), loaded by
  ``Engine.load(bundle, content_encoder=DIR)``; the new movies are added online with
  ``engine.add_items(keys, text=texts)`` (encoded, then ``[c, 1] @ W``) and each user's answer is
  ``engine.recommend(user, k=20, candidates=new_keys, exclude_seen=False)`` (inner product with the user's
  trained vector). The run checks that the engine's vectors of the new movies equal the map computed here
  (max abs diff < 1e-4) and records the metrics of that direct computation too (``served.direct_map``);
- **MiniLM content kNN**: the user's profile is the mean content vector of their train movies, new movies
  scored by cosine (the same vectors, no collaborative signal);
- **TF-IDF content kNN**: the same with TF-IDF vectors of the texts' words (NumPy / SciPy only);
- **genre popularity**: a new movie scores the largest mean train count of warm movies among its genres
  (popularity cannot be known for a new movie; this is the non-leaking version);
- **random**: the floor (mean of 20 seeded shuffles);
- **popularity among the new items (leaks)**: the new movies' counts in the held-out interactions themselves,
  shown only as a reference: no real system knows them.

The content vectors are cached beside ``--out`` (``coldstart_cache/``), keyed by the texts and the encoder.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import rec_engine
from rec_engine import IdLists

from ..content_map import (ItemContent, default_encoder_dir, encode_texts, encoder_info, fit_content_map,
                           load_encoder, read_items, texts_sha256)
from ..data.containers import Interactions
from ..data.loaders import load_interactions, split_ratio
from ..metrics import ranking_metrics

K = 20
_WORD = re.compile(r"[^\W_]+")


def _topk_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """Best-first ids of the ``k`` highest scores per row (ties: lower id first)."""
    scores = np.ascontiguousarray(scores, np.float32)
    return rec_engine.topk(scores, np.eye(scores.shape[1], dtype=np.float32), k).ids


def tfidf(texts: list[str]):
    """L2-normalized TF-IDF rows (scipy.sparse CSR ``[n, vocab]``) of the texts' lowercased words
    (smooth idf: ``log((1 + n) / (1 + df)) + 1``)."""
    import scipy.sparse as sp

    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, t in enumerate(texts):
        for w in _WORD.findall(t.lower()):
            rows.append(i)
            cols.append(vocab.setdefault(w, len(vocab)))
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(texts), len(vocab)))
    m.sum_duplicates()
    df = np.bincount(m.indices, minlength=len(vocab))
    idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
    m = m @ sp.diags(idf)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
    return sp.csr_matrix(sp.diags(1 / np.maximum(norms, 1e-12)) @ m)


def _profile_scores(user_lists: IdLists, users: np.ndarray, warm, cold) -> np.ndarray:
    """Content kNN: each user's mean warm vector (rows of ``warm``, dense or sparse) dotted with ``cold``'s rows,
    divided by the profile's norm (cosine when the rows are unit vectors)."""
    import scipy.sparse as sp

    counts = np.diff(user_lists.indptr)[users]
    r = np.repeat(np.arange(len(users)), counts)
    c = np.concatenate([user_lists.ids[user_lists.indptr[u]:user_lists.indptr[u + 1]] for u in users])
    avg = sp.csr_matrix((np.repeat(1 / np.maximum(counts, 1), counts).astype(np.float32), (r, c)),
                        shape=(len(users), warm.shape[0]))
    prof = avg @ warm
    prof = prof.toarray() if sp.issparse(prof) else np.asarray(prof)
    scores = prof @ (cold.T.toarray() if sp.issparse(cold) else cold.T)
    return scores / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)


def _cached_vectors(texts: list[str], cache: Path, encoder_dir, log) -> tuple[np.ndarray, dict]:
    enc = load_encoder(encoder_dir, log=log)
    info = encoder_info(enc)
    cache.mkdir(parents=True, exist_ok=True)
    f = cache / f"content_{texts_sha256(texts)[:16]}_{(info['encoder_sha256'] or 'x')[:12]}.npy"
    if f.is_file():
        v = np.load(f)
        if v.shape == (len(texts), enc.dim):
            log(f"content vectors: {f} (cached)")
            return v, {**info, "encode_seconds": 0.0, "cached": True}
    t0 = time.perf_counter()
    v = encode_texts(enc, texts)
    secs = time.perf_counter() - t0
    np.save(f, v)
    log(f"content vectors: {len(texts)} texts encoded in {secs:.1f}s ({len(texts) / secs:.0f}/s), cached at {f}")
    return v, {**info, "encode_seconds": secs, "cached": False}


def _served_ranking(trained, train: Interactions, keys: dict, C_warm: np.ndarray, enc_info: dict, encoder_dir,
                    new_keys: list, new_texts: list, user_keys: list, map_min_count: int, direct: np.ndarray,
                    source: dict, log) -> tuple[np.ndarray, dict]:
    """The project's method through serving: the trained model exported as a retrieval bundle with its items'
    content (what ``rec-engine train --items`` writes), loaded by :class:`rec_engine.engine.Engine` with the
    content encoder, the new items added online with ``add_items(keys, text=...)``, and each user's
    ``recommend(user, k=K, candidates=new_keys, exclude_seen=False)``. Returns the answers as indices into
    ``new_keys`` (``[len(user_keys), K]``, -1 padded) and what was checked and timed.

    ``direct``: the map's vectors of the new items computed here (``ContentMap.predict``); the engine's must
    equal them (max abs diff < 1e-4). Hybrid retrieval (``hybrid_max_events``) is left at its default (5): the
    engine blends only answers without ``candidates`` (:meth:`Engine._recommend`); MovieLens users all have
    more than 5 train events anyway. Checked here: 50 users answered again with ``hybrid_max_events`` so large
    that every one of them would be blended get the same answers."""
    from rec_engine.engine import Engine

    from ..export_graph import export_graph

    has = np.ones(len(C_warm), bool)
    if map_min_count > 1:          # export fits on items with >= 1 train interaction; the others are left out
        has &= train.item_counts() >= map_min_count   # here by marking them text-less (their vectors are kept)
    content = ItemContent(C_warm, has, {**{k: enc_info.get(k) for k in ("encoder_sha256", "encoder_weights_sha256",
                                                                          "encoder_model")},
                                        "text": {"key": "movieId", "title": "title", "genres": "genres"},
                                        "source": source})
    info: dict = {}
    with tempfile.TemporaryDirectory(prefix="coldstart_bundle.") as tmp:
        t0 = time.perf_counter()
        bundle = export_graph(trained, train, Path(tmp) / "retrieval", keys=keys, content=content)
        engine = Engine.load(bundle, content_encoder=encoder_dir, num_threads=1)
        info["export_load_seconds"] = time.perf_counter() - t0
        try:
            ranked = _answers(engine, new_keys, new_texts, user_keys, direct, info, log)
        finally:
            engine.close()
    return ranked, info


def _answers(engine, new_keys: list, new_texts: list, user_keys: list, direct: np.ndarray, info: dict,
             log) -> np.ndarray:
    """:func:`_served_ranking`'s requests to the loaded ``engine``."""
    t0 = time.perf_counter()
    ids = engine.add_items(new_keys, text=new_texts)
    info["add_items_seconds"] = time.perf_counter() - t0
    v = engine._version
    served = np.asarray(v.retrieval.items[ids], np.float32)
    diff = float(np.abs(served - direct).max())
    info["max_abs_diff_vs_direct_map"] = diff
    log(f"engine: {len(new_keys)} items added with their text in {info['add_items_seconds']:.1f}s; their "
        f"vectors vs the direct map: max abs diff {diff:.2e}")
    if not diff < 1e-4:
        raise AssertionError(f"the engine's vectors of the added items differ from the content map's "
                             f"(max abs diff {diff:.3g} >= 1e-4)")
    pos = {int(i): j for j, i in enumerate(np.asarray(ids).tolist())}

    def answer(u) -> np.ndarray:
        rec = engine.recommend(u, k=K, candidates=new_keys, exclude_seen=False)
        return np.array([pos.get(int(i), -1) for i in rec.ids], np.int64)

    t0 = time.perf_counter()
    ranked = np.stack([answer(u) for u in user_keys])
    info["recommend_seconds"] = time.perf_counter() - t0
    h = engine.hybrid_max_events
    few = sum(0 < len(v.retrieval.seen(v.user_state(u, engine.online))) <= h for u in user_keys)
    checked = list(range(0, len(user_keys), max(1, len(user_keys) // 50)))
    engine.hybrid_max_events = 1 << 30          # every user with events would be blended, were it applied
    try:
        same = all(np.array_equal(answer(user_keys[j]), ranked[j]) for j in checked)
    finally:
        engine.hybrid_max_events = h
    info["hybrid_check"] = {"hybrid_max_events": h, "users_within": int(few), "users_checked": len(checked),
                            "same_answers": same}
    if not same:
        raise AssertionError("hybrid retrieval changed candidate-restricted answers")
    return ranked


def run(data, *, model: str = "lightgcn", holdout: float = 0.1, seed: int = 0, epochs: int | None = None,
        time_limit: float | None = 150.0, encoder=None, cache_dir=None, with_tags: bool = False,
        num_threads: int | None = None, map_min_count: int = 1, log=print) -> dict:
    """The cold-start evaluation on the MovieLens folder ``data``; returns the result dict (see the module doc)."""
    from ..defaults import resolve_config
    from ..models.graph import final_embeddings, train_graph

    data = Path(data)
    t_start = time.perf_counter()
    inter = load_interactions(data / "ratings.csv")
    item_keys = inter.keys["item"] if inter.keys is not None else np.arange(inter.n_items)
    opts = {"key": "movieId", "title": "title", "genres": "genres"}
    if with_tags:
        opts["tags_file"] = str(data / "tags.csv")
    items = read_items(data / "movies.csv", opts)
    fields = [items.get(str(k)) for k in item_keys.tolist()]
    if any(f is None for f in fields):
        raise ValueError(f"{data}/movies.csv does not describe every rated movie")
    texts = [f.text() for f in fields]

    rng = np.random.default_rng(seed)
    n_items = inter.n_items
    cold = np.sort(rng.choice(n_items, int(round(holdout * n_items)), replace=False))
    is_cold = np.zeros(n_items, bool)
    is_cold[cold] = True
    warm = np.flatnonzero(~is_cold)
    local = np.full(n_items, -1, np.int64)
    local[warm] = np.arange(len(warm))
    local[cold] = np.arange(len(cold))
    ev_cold = is_cold[inter.items]
    warm_inter = Interactions(inter.users[~ev_cold], local[inter.items[~ev_cold]], inter.n_users, len(warm))
    split = split_ratio(warm_inter, test=0.1, valid=0.1, seed=seed, by_time=False)
    t_load = time.perf_counter() - t_start

    vectors, enc_info = _cached_vectors(texts, Path(cache_dir or "."), encoder, log)
    C_warm, C_cold = vectors[warm], vectors[cold]

    # ---- train on the warm part
    t0 = time.perf_counter()
    config = resolve_config(model, split, {"epochs": epochs}, {}, seed=seed, num_threads=num_threads,
                            time_limit=time_limit, progress=False)
    trained, hist = train_graph(model, split, config, log=log)
    U, V = final_embeddings(trained)
    t_train = time.perf_counter() - t0
    from ..evaluate import evaluate_retrieval

    warm_metrics = evaluate_retrieval(U, V, split.train.by_user(), split.test.by_user(), ks=(K,))

    t0 = time.perf_counter()
    fit_rows = np.flatnonzero(split.train.item_counts() >= map_min_count)
    cmap = fit_content_map(C_warm[fit_rows], V[fit_rows])
    V_cold = cmap.predict(C_cold)
    t_map = time.perf_counter() - t0

    # ---- the cold test: each user's held-out movies
    cu, ci = inter.users[ev_cold], local[inter.items[ev_cold]]
    truth_all = Interactions(cu, ci, inter.n_users, len(cold)).by_user()
    users = np.flatnonzero(np.diff(truth_all.indptr) > 0)
    truth = [np.unique(truth_all.ids[truth_all.indptr[u]:truth_all.indptr[u + 1]]) for u in users]
    train_lists = split.train.by_user()
    no_history = int((np.diff(train_lists.indptr)[users] == 0).sum())

    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def score(name, fn):
        t = time.perf_counter()
        ranked = fn()
        seconds[name] = time.perf_counter() - t
        m = ranking_metrics(ranked, truth, (K,))
        results[name] = {f"recall@{K}": m[f"recall@{K}"], f"ndcg@{K}": m[f"ndcg@{K}"]}

    user_keys = (inter.keys["user"] if inter.keys is not None else np.arange(inter.n_users)).tolist()
    served: dict = {}

    def through_engine():
        ranked, info = _served_ranking(
            trained, split.train, {"user": inter.keys["user"] if inter.keys is not None else np.arange(inter.n_users),
                                   "item": item_keys[warm]}, C_warm, enc_info,
            Path(encoder) if encoder is not None else default_encoder_dir(), item_keys[cold].tolist(),
            [texts[i] for i in cold], [user_keys[u] for u in users], map_min_count, V_cold,
            {"items": str(data / "movies.csv"), **({"tags_file": str(data / "tags.csv")} if with_tags else {})}, log)
        served.update(info)
        return ranked

    score("content map (LightGCN + ridge)" if model == "lightgcn" else f"content map ({model} + ridge)",
          through_engine)
    direct = ranking_metrics(rec_engine.topk(np.ascontiguousarray(U[users]), np.ascontiguousarray(V_cold, np.float32),
                                             K).ids, truth, (K,))
    served["direct_map"] = {f"recall@{K}": direct[f"recall@{K}"], f"ndcg@{K}": direct[f"ndcg@{K}"]}
    score("MiniLM content kNN", lambda: _topk_ids(_profile_scores(train_lists, users, C_warm, C_cold), K))
    T = tfidf(texts)
    score("TF-IDF content kNN", lambda: _topk_ids(_profile_scores(train_lists, users, T[warm], T[cold]), K))

    def genre_pop():
        counts = split.train.item_counts().astype(np.float64)
        total: dict[str, list] = {}
        for j, i in enumerate(warm):
            for g in fields[i].genres:
                total.setdefault(g, []).append(counts[j])
        mean = {g: float(np.mean(v)) for g, v in total.items()}
        s = np.array([max((mean.get(g, 0.0) for g in fields[i].genres), default=0.0) for i in cold], np.float32)
        return _topk_ids(np.broadcast_to(s, (len(users), len(cold))), K)

    score("genre popularity (train counts)", genre_pop)
    rand = []
    t = time.perf_counter()
    for r in range(20):
        perm = np.random.default_rng(1000 + r).random((len(users), len(cold))).astype(np.float32)
        m = ranking_metrics(_topk_ids(perm, K), truth, (K,))
        rand.append((m[f"recall@{K}"], m[f"ndcg@{K}"]))
    seconds["random (mean of 20)"] = time.perf_counter() - t
    results["random (mean of 20)"] = {f"recall@{K}": float(np.mean([a for a, _ in rand])),
                                      f"ndcg@{K}": float(np.mean([b for _, b in rand]))}
    leak = np.bincount(ci, minlength=len(cold)).astype(np.float32)
    score("popularity among the new items (leaks: held-out counts)",
          lambda: _topk_ids(np.broadcast_to(leak, (len(users), len(cold))), K))

    return {"data": str(data), "model": model, "protocol": "item cold start: a seeded share of the items held out "
            "of training entirely; per user with held-out interactions, only the held-out items are ranked",
            "holdout": holdout, "seed": seed, "text": "title + genres" + (" + tags (leaks)" if with_tags else ""),
            "n_users": inter.n_users, "n_items": n_items, "n_warm_items": int(len(warm)),
            "n_cold_items": int(len(cold)),
            "n_train": len(split.train), "n_cold_interactions": int(ev_cold.sum()), "n_eval_users": int(len(users)),
            "n_eval_users_without_train": no_history,
            "config": {"epochs": config.epochs, "dim": config.dim, "lr": config.lr, "batch_size": config.batch_size,
                       "params": config.params, "time_limit": time_limit},
            "best_epoch": getattr(hist, "best_epoch", None), "warm_test": warm_metrics,
            "served": served,
            "content_map": {"min_count": map_min_count, "ridge": cmap.ridge, "fit_r2": cmap.fit_r2, "cv_r2": cmap.cv_r2, "n_fit": cmap.n_fit},
            "encoder": enc_info, "results": results,
            "seconds": {"load": t_load, "encode": enc_info["encode_seconds"], "train": t_train, "fit_map": t_map,
                        **{f"score: {k}": v for k, v in seconds.items()},
                        "total": time.perf_counter() - t_start},
            "threads": num_threads or rec_engine.default_num_threads()}


def table(res: dict) -> str:
    lines = [f"| method | Recall@{K} | NDCG@{K} |", "|---|---|---|"]
    for name, m in res["results"].items():
        lines.append(f"| {name} | {m[f'recall@{K}']:.4f} | {m[f'ndcg@{K}']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the ml-latest-small folder (ratings.csv, movies.csv, tags.csv)")
    p.add_argument("--out", required=True, help="JSON file to write (the vector cache goes beside it)")
    p.add_argument("--model", choices=("lightgcn", "mf", "ngcf"), default="lightgcn")
    p.add_argument("--holdout", type=float, default=0.1, help="share of the items held out (0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="(default: the model's, bounded by --time-limit)")
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds of training at most (150)")
    p.add_argument("--content-encoder", default=None, metavar="DIR",
                   help="the content encoder bundle (default: the cached export, see rec-engine train --items)")
    p.add_argument("--with-tags", action="store_true", help="add MovieLens user tags to every text (leaks)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "ratings.csv").is_file() or not (data / "movies.csv").is_file():
        print(f"skipped: {data} has no ratings.csv / movies.csv (MovieLens ml-latest-small is not shipped: see "
              f"../shared/data/README.md)", file=sys.stderr)
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    res = run(data, model=args.model, holdout=args.holdout, seed=args.seed, epochs=args.epochs,
              time_limit=args.time_limit, encoder=args.content_encoder, cache_dir=out.parent / "coldstart_cache",
              with_tags=args.with_tags, num_threads=args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"\n{res['n_cold_items']} new movies ({res['n_cold_interactions']} interactions, {res['n_eval_users']} "
          f"users); {res['model']} warm test recall@{K} {res['warm_test'][f'recall@{K}']:.4f}; content map R^2 "
          f"{res['content_map']['fit_r2']:.3f} (leave-one-out {res['content_map']['cv_r2']:.3f})\n")
    print(table(res))
    sv = res["served"]
    print(f"\ncontent map row served by the engine (add_items {sv['add_items_seconds']:.1f}s, recommend "
          f"{sv['recommend_seconds']:.1f}s); its vectors vs the direct map: max abs diff "
          f"{sv['max_abs_diff_vs_direct_map']:.1e}; direct map {sv['direct_map'][f'recall@{K}']:.4f} / "
          f"{sv['direct_map'][f'ndcg@{K}']:.4f}; hybrid retrieval forced on for "
          f"{sv['hybrid_check']['users_checked']} users: same answers "
          f"({sv['hybrid_check']['users_within']} users within hybrid_max_events="
          f"{sv['hybrid_check']['hybrid_max_events']})")
    print(f"\nwall {res['seconds']['total']:.1f}s (encode {res['seconds']['encode']:.1f}s, train "
          f"{res['seconds']['train']:.1f}s); {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
