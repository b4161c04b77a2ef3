"""A closed loop on the synthetic world (``rec-engine simulate``): serve, log, update, gate, swap, serve on.

Version 1 (LightGCN retrieval, DeepFM ranking) is trained briefly on the world's data and promoted in a model
home; the :class:`~rec_engine.engine.Engine` serves it from the home with an event store. Each simulated day
``users_per_day`` users (drawn at random) ask for ``k`` items with a context (an hour and a device drawn at
random, the ranking model's context fields); each shown item is clicked with its true probability
``sigmoid(world.ctr_logit(user, item, hour, device))``, and clicks go back through
``engine.feedback(..., request_id=...)``. After day ``update_after`` the offline update
(:func:`rec_engine_train.update.update`) retrains on the logged events, its gate decides, and a promoted
version is swapped in. The printout: clicks over shown items (CTR) and the mean true click probability of the
shown items (expected CTR: the same quantity without the click noise) per day and per version, and the gate's
comparison. Every draw comes from one seeded generator and training runs on one thread, so a seed gives
the same run.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np



SIM_START = 1767225600.0      # 2026-01-01 00:00 UTC: simulated day d runs from SIM_START + (d - 1) days


class SimClock:
    """The simulation's time (seconds since the epoch), which the engine stamps its events with, so the
    simulated days are days in the event store (its report per day, the update's split by time)."""

    def __init__(self, start: float = SIM_START):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now


def train_v1(home: Path, *, n_users: int, n_items: int, seed: int, ctr_examples: int, retrieval_epochs: int,
             ranking_epochs: int, n_candidates: int, log: Callable[[str], None] = print) -> Path:
    """Version 1 into ``home/v1`` (promoted): LightGCN and DeepFM trained briefly on the synthetic world."""
    from rec_engine import versions
    from rec_engine.bundle import write_pipeline

    from . import pipeline
    from .data.synthetic import make_synthetic
    from .loop import TrainConfig
    from .update import training_record

    syn = {"n_users": n_users, "n_items": n_items, "seed": seed, "string_keys": True}
    world = make_synthetic(**syn)
    graph = world.implicit()
    lg_cfg = TrainConfig(epochs=retrieval_epochs, lr=0.02, dim=32, batch_size=4096, seed=seed, patience=0,
                         num_threads=1, progress=False, params={"n_layers": 2})
    lg = pipeline.train("lightgcn", graph, lg_cfg, log=lambda s: None)
    ctr = world.ctr(n_examples=ctr_examples)
    dfm_cfg = TrainConfig(epochs=ranking_epochs, lr=3e-3, dim=8, batch_size=512, seed=seed, patience=0,
                          num_threads=1, progress=False, params={"mlp": [32, 16], "emb_l2": 1e-5})
    dfm = pipeline.train("deepfm", ctr, dfm_cfg, log=lambda s: None)
    log(f"version 1: LightGCN {retrieval_epochs} epochs on {len(graph.train)} interactions (recall@20 "
        f"{lg.metrics['recall@20']:.4f}), DeepFM {ranking_epochs} epochs on {len(ctr.train)} impressions "
        f"(AUC {dfm.metrics['auc']:.4f})")
    with tempfile.TemporaryDirectory(prefix=".v1.", dir=home) as tmp:
        tmp = Path(tmp)
        pipeline.export(lg, graph, tmp / "retrieval", training=training_record("synthetic", seed=seed, config=lg_cfg,
                                                                               synthetic=syn))
        pipeline.export(dfm, ctr, tmp / "ranking", training=training_record(
            "synthetic", seed=seed, config=dfm_cfg, synthetic={**syn, "n_examples": ctr_examples}))
        path = write_pipeline(home / "v1", retrieval=tmp / "retrieval", ranking=tmp / "ranking",
                              n_candidates=n_candidates)
    versions.promote(home, "v1")
    return path


def serve_day(engine, world, rng: np.random.Generator, n_users: int, *, k: int = 10,
              clock: SimClock | None = None, day: int = 1) -> dict:
    """One simulated day: ``n_users`` distinct users of ``world`` (drawn by ``rng``) each ask ``engine`` for ``k``
    items in a random context (hour, device); each shown item is clicked with its true probability and the
    clicks are fed back with the request id. Returns ``requests``, ``shown``, ``clicks`` and ``expected`` (the
    sum of the shown items' true click probabilities). With ``clock``, the requests are spread over
    simulated day ``day``."""
    from .data.synthetic import DEVICES

    item_of = {key: i for i, key in enumerate(world.keys["item"].tolist())}
    users = rng.choice(world.n_users, size=min(n_users, world.n_users), replace=False)
    shown = clicks = 0
    expected = 0.0
    for j, u in enumerate(users.tolist()):
        hour, device = int(rng.integers(0, 24)), int(rng.integers(0, len(DEVICES)))
        context = {"hour": float(hour), "device": DEVICES[device]}
        if clock is not None:
            clock.now = SIM_START + (day - 1) * 86400.0 + 86400.0 * j / len(users)
        rec = engine.recommend(f"u-{u}", k=k, context=context)
        keys = [x for x in rec.items.tolist() if x is not None]
        if not keys:
            continue
        ids = np.array([item_of[x] for x in keys], np.int64)
        n = len(ids)
        p = 1.0 / (1.0 + np.exp(-world.ctr_logit(np.full(n, u), ids, np.full(n, hour), np.full(n, device))))
        hit = rng.random(n) < p
        for key in np.asarray(keys, dtype=object)[hit].tolist():
            engine.feedback(f"u-{u}", key, kind="click", request_id=rec.request_id)
        shown, clicks, expected = shown + n, clicks + int(hit.sum()), expected + float(p.sum())
    return {"requests": len(users), "shown": shown, "clicks": clicks, "expected": expected}


def run(out: str | None = None, *, n_users: int = 1000, n_items: int = 500, days: int = 4, users_per_day: int = 400,
        k: int = 10, update_after: int = 2, seed: int = 0, ctr_examples: int = 4000, v1_retrieval_epochs: int = 3,
        v1_ranking_epochs: int = 1, update_epochs: int = 10, n_candidates: int = 100,
        tolerance: float = 0.005, shuffle_labels: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the closed loop (see the module doc); returns ``{"days": [...], "versions": {...}, "update": report,
    "home": ...}``. ``shuffle_labels`` makes the update train a broken ranking model (shuffled labels),
    which the gate should refuse."""
    import torch

    from rec_engine import versions
    from rec_engine.engine import Engine
    from rec_engine.events import SqliteEventStore

    from .data.synthetic import make_synthetic
    from .update import update

    if not 1 <= update_after <= days:
        raise ValueError(f"update_after must be in [1, days], got {update_after} for {days} days")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="rec_engine_simulate_"))
    home = root / "models"
    home.mkdir(parents=True, exist_ok=True)
    log(f"closed-loop simulation: {n_users} users x {n_items} items (seed {seed}), {days} days of "
        f"{users_per_day} users, update after day {update_after}; model home {home}")
    train_v1(home, n_users=n_users, n_items=n_items, seed=seed, ctr_examples=ctr_examples,
             retrieval_epochs=v1_retrieval_epochs, ranking_epochs=v1_ranking_epochs, n_candidates=n_candidates,
             log=log)
    world = make_synthetic(n_users=n_users, n_items=n_items, seed=seed, string_keys=True)
    store = SqliteEventStore(root / "events.db")
    clock = SimClock()
    engine = Engine.load(home, events=store, ort_threads=1, num_threads=1, clock=clock)
    names = {engine.version: versions.current(home)}
    rng = np.random.default_rng(seed + 1)
    days_out, report = [], None
    try:
        for day in range(1, days + 1):
            version = names.get(engine.version, engine.version)
            stats = serve_day(engine, world, rng, users_per_day, k=k, clock=clock, day=day)
            store.flush()
            shown, clicks, expected = stats["shown"], stats["clicks"], stats["expected"]
            days_out.append({"day": day, "version": version, "requests": stats["requests"], "shown": shown,
                             "clicks": clicks, "ctr": clicks / max(shown, 1), "expected_ctr": expected / max(shown, 1)})
            log(f"day {day}: version {version}, {stats['requests']} requests, {shown} shown, {clicks} clicks, "
                f"CTR {clicks / max(shown, 1):.4f} (expected {expected / max(shown, 1):.4f})")
            if day == update_after:
                log(f"\n== offline update after day {day}" + (" (shuffled CTR labels)" if shuffle_labels else ""))
                report = update(home, store, data="synthetic", epochs=update_epochs, tolerance=tolerance,
                                shuffle_labels=shuffle_labels, seed=seed, log=log)
                if report["gate"]["promoted"]:
                    vid = engine.swap(versions.resolve(home))
                    names[vid] = report["name"]
                    log(f"swapped to {report['name']} (version id {vid})\n")
                else:
                    log(f"kept {versions.current(home)}\n")
    finally:
        engine.close()
        store.close()
    per_version: dict = {}
    for d in days_out:
        v = per_version.setdefault(d["version"], {"days": 0, "shown": 0, "clicks": 0, "expected": 0.0})
        v["days"] += 1
        v["shown"] += d["shown"]
        v["clicks"] += d["clicks"]
        v["expected"] += d["expected_ctr"] * d["shown"]
    for v in per_version.values():
        v["ctr"] = v["clicks"] / max(v["shown"], 1)
        v["expected_ctr"] = v.pop("expected") / max(v["shown"], 1)
    log(_table([(d["day"], d["version"], d["requests"], d["shown"], d["clicks"], f"{d['ctr']:.4f}",
                 f"{d['expected_ctr']:.4f}") for d in days_out],
               ("day", "version", "requests", "shown", "clicks", "CTR", "expected CTR")))
    log("")
    log(_table([(name, v["days"], v["shown"], v["clicks"], f"{v['ctr']:.4f}", f"{v['expected_ctr']:.4f}")
                for name, v in per_version.items()], ("version", "days", "shown", "clicks", "CTR", "expected CTR")))
    try:
        from rec_engine.report import feedback_metrics, format_table
    except ImportError:      # an older serving package: the tables above are the whole report
        pass
    else:
        rows = [{**r, "version": names.get(r["version"], r["version"])}
                for r in feedback_metrics(root / "events.db", n_items=n_items)]
        log("\nthe event store's view (rec-engine report: per version and simulated day):")
        log(format_table(rows))
    total = time.perf_counter() - t_start
    log(f"\nsimulation finished in {total:.1f}s; CURRENT = {versions.current(home)}")
    return {"days": days_out, "versions": per_version, "update": report, "home": str(home), "seconds": total}


def _table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])
