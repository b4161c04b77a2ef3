"""The end-to-end demonstration (``rec-engine demo``): train, export, serve, learn online, measure.

On the built-in synthetic data: train LightGCN (retrieval) and DeepFM (ranking), export both as bundles
and a pipeline, load the Engine, print recommendations for a few users before and after ``observe``
calls, and print per-stage latency (p50 / p99) and quality metrics beside simple baselines.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def _table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def _probs(scores) -> str:
    return "[" + ", ".join(f"{s:.3f}" for s in scores) + "]"


def run(out: str | None = None, *, n_users: int = 2000, n_items: int = 1000, seed: int = 0,
        requests: int = 500) -> dict:
    import torch

    from rec_engine import simd_level
    from rec_engine.bundle import write_pipeline
    from rec_engine.engine import Engine

    from . import evaluate as ev
    from . import pipeline
    from .data.synthetic import make_synthetic
    from .loop import TrainConfig

    torch.set_num_threads(1)   # small models: one thread is fastest, and leaves a core to the engine
    t_start = time.perf_counter()
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="rec_engine_demo_"))
    syn = {"n_users": n_users, "n_items": n_items}
    print(f"rec_engine demo: synthetic world of {n_users} users x {n_items} items (seed {seed}), "
          f"SIMD {simd_level()}, bundles in {root}\n")

    # ---------------------------------------------------------------- train
    # the interactions carry a shop's own keys ("u-17", "sku-0042"): the bundle, the Engine and the event log
    # speak them; the CTR examples use the same dense numbering underneath
    graph = pipeline.load_data("synthetic", "graph", seed=seed, synthetic={**syn, "string_keys": True})
    print("== training LightGCN (retrieval) on", len(graph.train), "interactions")
    lg = pipeline.train("lightgcn", graph, TrainConfig(epochs=15, lr=0.02, dim=32, batch_size=4096, seed=seed,
                                                       patience=3, progress=False))
    pop = pipeline.evaluate_model("popularity", graph.train.item_counts(), graph)
    ctr = make_synthetic(seed=seed, **syn).ctr(n_examples=100_000)
    print(f"\n== training DeepFM (ranking) on {len(ctr.train)} impressions")
    dfm = pipeline.train("deepfm", ctr, TrainConfig(epochs=8, lr=5e-3, dim=8, batch_size=1024, seed=seed, patience=2,
                                                    progress=False, params={"mlp": [64, 32], "emb_l2": 1e-5}))
    truth = ev.evaluate_ctr(ctr.test.labels, ctr.extra["true_prob_test"])

    # ---------------------------------------------------------------- export
    pipeline.export(lg, graph, root / "lightgcn", overwrite=True)
    pipeline.export(dfm, ctr, root / "deepfm", overwrite=True)
    pipe = write_pipeline(root / "pipeline", retrieval=root / "lightgcn", ranking=root / "deepfm", n_candidates=200,
                          overwrite=True)
    print(f"\n== bundles written: {root / 'lightgcn'}, {root / 'deepfm'}, pipeline {pipe}")

    # ---------------------------------------------------------------- serve
    db = root / "events.db"
    for leftover in (db, db.with_name("events.db-wal"), db.with_name("events.db-shm")):
        leftover.unlink(missing_ok=True)
    engine = Engine.load(pipe, events=db, num_threads=1)
    ctx = {"hour": 20.0, "device": "ios"}
    print(f"engine version {engine.version}; context {ctx}\n")
    users = [str(k) for k in graph.keys["user"][:3]]
    for u in users:
        rec = engine.recommend(u, k=5, context=ctx)
        print(f"user {u}: items {rec.items.tolist()}  p(click) {_probs(rec.scores)}")
    u = users[0]
    first = engine.recommend(u, k=5, context=ctx)
    clicked = first.items[:2].tolist()
    for item in clicked:                     # clicks on what was shown, tied to the answer by its request id
        engine.feedback(u, item, kind="click", request_id=first.request_id)
    after = engine.recommend(u, k=5, context=ctx)
    print(f"\nfeedback(user {u}, clicks on {clicked}) -> seen items excluded, user vector folded in:")
    print(f"user {u}: items {after.items.tolist()}  p(click) {_probs(after.scores)}")
    cold = engine.recommend("u-new", k=5, context={**ctx, "age": "25-34", "country": "de"})
    print(f"unknown user (cold start, popular items ranked by context): {cold.items.tolist()}")

    # ---------------------------------------------------------------- latency
    rng = np.random.default_rng(seed)
    stages = {"retrieval_ms": [], "ranking_ms": [], "total_ms": []}
    for uid in rng.integers(0, n_users, requests):
        rec = engine.recommend(str(graph.keys["user"][uid]), k=10, context=ctx)
        for s in stages:
            stages[s].append(rec.timings[s])
    lat_rows = [(s.removesuffix("_ms"), f"{np.percentile(v, 50):.3f}", f"{np.percentile(v, 99):.3f}")
                for s, v in stages.items()]
    print(f"\n== latency of recommend (k=10, 200 candidates ranked by DeepFM), {requests} requests, ms")
    print(_table(lat_rows, ("stage", "p50", "p99")))
    engine.close()
    from rec_engine.events import SqliteEventStore

    with SqliteEventStore(db) as store:
        print(f"\n== event store {db}: {store.count('impression')} impressions (one per recommend, with its "
              f"request id), {store.count('click')} clicks; `rec-engine report --events {db}` summarizes them, "
              f"`rec-engine simulate` runs the whole loop (serve, click, retrain, gate, promote)")

    # ---------------------------------------------------------------- quality
    m = lg.metrics
    rows = [("LightGCN recall@20", f"{m['recall@20']:.4f}", f"popularity {pop['recall@20']:.4f}"),
            ("LightGCN ndcg@20", f"{m['ndcg@20']:.4f}", f"popularity {pop['ndcg@20']:.4f}"),
            ("LightGCN coverage@20", f"{m['coverage@20']:.4f}", f"popularity {pop['coverage@20']:.4f}"),
            ("DeepFM AUC", f"{dfm.metrics['auc']:.4f}", f"ground truth {truth['auc']:.4f}"),
            ("DeepFM logloss", f"{dfm.metrics['logloss']:.4f}", f"ground truth {truth['logloss']:.4f}")]
    print("\n== quality on the test split")
    print(_table(rows, ("metric", "model", "baseline")))
    total = time.perf_counter() - t_start
    print(f"\ndemo finished in {total:.1f}s")
    return {"retrieval": m, "ranking": dfm.metrics, "popularity": pop, "truth": truth,
            "latency": {s: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for s, v in stages.items()},
            "seconds": total, "root": str(root)}
