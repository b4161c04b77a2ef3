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

New items and exploration (``new_items_per_day``, ``explore``): the last ``days * new_items_per_day`` items of
the world are held out of version 1's data entirely (the world's ``held_out_items``: no interactions, no CTR
examples, not in either stage's item store). At the start of each day that day's items arrive through
``engine.add_items``: with the world's ranking features (category, brand, tags, price; no ``item_id``) and, as
their retrieval vector, the mean vector of the served version's trained items of the same category (a
content-like guess: the synthetic world has no text; ``new_item_vector="global"``: the mean of all of them,
nothing known about the item, a cold start that only exploration brings up). ``explore`` is the engine's share of slots given to
little-shown items by Thompson sampling (every item added online is in its pool). The day's figures then also
count the new items' impressions, clicks and expected clicks, and the slots exploration filled. The offline
update trains on the items added so far (their logged clicks are interactions), so a promoted version holds
them as its own. :func:`compare_exploration` runs the loop with exploration off and on (same seed, same
version 1, same users and contexts) and prints the two side by side per day.
"""
from __future__ import annotations

import json
import math
import shutil
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
             ranking_epochs: int, n_candidates: int, held_out_items: int = 0,
             log: Callable[[str], None] = print) -> Path:
    """Version 1 into ``home/v1`` (promoted): LightGCN and DeepFM trained briefly on the synthetic world. With
    ``held_out_items``, the world's last items are in neither stage (nor in their training data); the training
    record says so, so the offline update rebuilds the same base data."""
    from rec_engine import versions
    from rec_engine.bundle import write_pipeline

    from . import pipeline
    from .data.synthetic import make_synthetic
    from .loop import TrainConfig
    from .update import training_record

    syn = {"n_users": n_users, "n_items": n_items, "seed": seed, "string_keys": True}
    if held_out_items:
        syn["held_out_items"] = int(held_out_items)
    world = make_synthetic(**syn)
    graph = world.implicit()
    lg_cfg = TrainConfig(epochs=retrieval_epochs, lr=0.02, dim=32, batch_size=4096, seed=seed, patience=0,
                         num_threads=1, progress=False, params={"n_layers": 2})
    lg = pipeline.train("lightgcn", graph, lg_cfg, log=lambda s: None)
    ctr = world.ctr(n_examples=ctr_examples)
    dfm_cfg = TrainConfig(epochs=ranking_epochs, lr=3e-3, dim=8, batch_size=512, seed=seed, patience=0,
                          num_threads=1, progress=False, params={"mlp": [32, 16], "emb_l2": 1e-5})
    dfm = pipeline.train("deepfm", ctr, dfm_cfg, log=lambda s: None)
    log(f"version 1: {graph.train.n_items} items; LightGCN {retrieval_epochs} epochs on {len(graph.train)} "
        f"interactions (recall@20 {lg.metrics['recall@20']:.4f}), DeepFM {ranking_epochs} epochs on {len(ctr.train)} impressions "
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
              clock: SimClock | None = None, day: int = 1, new_from: int | None = None) -> dict:
    """One simulated day: ``n_users`` distinct users of ``world`` (drawn by ``rng``) each ask ``engine`` for ``k``
    items in a random context (hour, device); each shown item is clicked with its true probability and the
    clicks are fed back with the request id. Returns ``requests``, ``shown``, ``clicks`` and ``expected`` (the
    sum of the shown items' true click probabilities); ``new_shown``, ``new_clicks`` and ``new_expected``, the
    same of the items with world id ``>= new_from`` (the items that arrived while serving; 0 without
    ``new_from``); ``explored`` (slots exploration filled), ``explored_new`` (of them on new items) and
    ``explored_max`` (the most in one answer). With ``clock``, the requests are spread over simulated day
    ``day``."""
    from .data.synthetic import DEVICES

    item_of = {key: i for i, key in enumerate(world.keys["item"].tolist())}
    users = rng.choice(world.n_users, size=min(n_users, world.n_users), replace=False)
    shown = clicks = 0
    expected = 0.0
    new_shown = new_clicks = explored = explored_new = explored_max = 0
    new_expected = 0.0
    for j, u in enumerate(users.tolist()):
        hour, device = int(rng.integers(0, 24)), int(rng.integers(0, len(DEVICES)))
        context = {"hour": float(hour), "device": DEVICES[device]}
        if clock is not None:
            clock.now = SIM_START + (day - 1) * 86400.0 + 86400.0 * j / len(users)
        rec = engine.recommend(f"u-{u}", k=k, context=context)
        real = np.array([x is not None for x in rec.items.tolist()], bool)
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
        new = ids >= new_from if new_from is not None else np.zeros(n, bool)
        new_shown, new_clicks = new_shown + int(new.sum()), new_clicks + int(hit[new].sum())
        new_expected += float(p[new].sum())
        if rec.explored is not None:
            ex = np.asarray(rec.explored, bool)[real]
            explored, explored_new = explored + int(ex.sum()), explored_new + int((ex & new).sum())
            explored_max = max(explored_max, int(ex.sum()))
    return {"requests": len(users), "shown": shown, "clicks": clicks, "expected": expected,
            "new_shown": new_shown, "new_clicks": new_clicks, "new_expected": new_expected, "explored": explored,
            "explored_new": explored_new, "explored_max": explored_max}


def arriving_items(world, day: int, per_day: int) -> np.ndarray:
    """The world ids of the items that arrive at the start of ``day`` (1-based) when ``per_day`` items arrive
    each day: the held-out items (the world's last ``held_out_items``) in id order, ``per_day`` a day."""
    start = world.n_data_items + (day - 1) * per_day
    return np.arange(start, min(start + per_day, world.n_items), dtype=np.int64)


NEW_ITEM_VECTORS = ("category", "global")


def add_new_items(engine, world, item_ids, trained, vector: str = "category") -> list:
    """Add the world's items ``item_ids`` to ``engine`` while it serves (:meth:`~rec_engine.engine.Engine.
    add_items`): features from the world (category, brand, tags, price; no item_id: the ranking model has
    never seen them), and as retrieval vector the mean of the served version's vectors of the ``trained`` items
    (world ids the version was trained with): ``vector="category"``, those of the same category (all of them
    for a category without one), a content-like guess; ``"global"``, all of them (nothing known about the
    item: every new item gets the same vector). Returns the keys added."""
    if vector not in NEW_ITEM_VECTORS:
        raise ValueError(f"vector must be one of {NEW_ITEM_VECTORS}, got {vector!r}")
    keys_all = world.keys["item"]
    v = engine._version
    trained = np.asarray(trained, np.int64)
    rows = v.item_keys.lookup([keys_all[i] for i in trained.tolist()])
    if (rows < 0).any():
        raise ValueError(f"{int((rows < 0).sum())} trained items are not in the served version")
    table = np.asarray(v.retrieval.items[rows], np.float32)
    cats = world.category[trained]
    vecs = np.empty((len(item_ids), table.shape[1]), np.float32)
    for j, i in enumerate(np.asarray(item_ids).tolist()):
        same = cats == world.category[i] if vector == "category" else np.ones(len(cats), bool)
        vecs[j] = table[same].mean(axis=0) if same.any() else table.mean(axis=0)
    feats = [{"category": int(world.category[i]), "brand": int(world.brand[i]),
              "tags": [int(t) for t in world.tags[i]], "price": float(world.price[i])}
             for i in np.asarray(item_ids).tolist()]
    keys = [keys_all[i] for i in np.asarray(item_ids).tolist()]
    engine.add_items(keys, vectors=vecs, features=feats)
    return keys


def run(out: str | None = None, *, n_users: int = 1000, n_items: int = 500, days: int = 4, users_per_day: int = 400,
        k: int = 10, update_after: int = 2, seed: int = 0, ctr_examples: int = 4000, v1_retrieval_epochs: int = 3,
        v1_ranking_epochs: int = 1, update_epochs: int = 10, n_candidates: int = 100,
        tolerance: float = 0.005, shuffle_labels: bool = False, new_items_per_day: int = 0, explore: float = 0.0,
        explore_max_impressions: int = 100, new_item_vector: str = "category", v1_from: str | Path | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Run the closed loop (see the module doc); returns ``{"days": [...], "versions": {...}, "update": report,
    "home": ...}``. ``shuffle_labels`` makes the update train a broken ranking model (shuffled labels),
    which the gate should refuse. ``new_items_per_day``: items that arrive each day (held out of version 1);
    ``new_item_vector``: their retrieval vector, "category" or "global" (see :func:`add_new_items`);
    ``explore``, ``explore_max_impressions``: the engine's exploration (share of slots; 0 off). Each day's
    entry also holds ``new_items`` (arrived so far), ``new_shown``, ``new_clicks``, ``new_ctr``,
    ``new_expected_ctr``, ``new_share`` (of the shown items) and ``explored`` / ``explored_share`` (slots).
    ``v1_from``: a version 1 bundle trained with the same settings, copied instead of training one (what
    :func:`compare_exploration` does for its second run). With ``out``, the result is also written to
    ``out/simulation.json``."""
    import torch

    from rec_engine import versions
    from rec_engine.engine import Engine
    from rec_engine.events import SqliteEventStore

    from .data.synthetic import make_synthetic
    from .update import update

    if not 1 <= update_after <= days:
        raise ValueError(f"update_after must be in [1, days], got {update_after} for {days} days")
    if isinstance(new_items_per_day, bool) or not isinstance(new_items_per_day, int) or new_items_per_day < 0:
        raise ValueError(f"new_items_per_day must be an integer >= 0, got {new_items_per_day!r}")
    held_out = days * new_items_per_day
    if held_out > n_items // 2:
        raise ValueError(f"{days} days of {new_items_per_day} new items hold out {held_out} of the {n_items} items: "
                         "at most half")
    if new_item_vector not in NEW_ITEM_VECTORS:
        raise ValueError(f"new_item_vector must be one of {NEW_ITEM_VECTORS}, got {new_item_vector!r}")
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore must be in [0, 1], got {explore}")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="rec_engine_simulate_"))
    home = root / "models"
    home.mkdir(parents=True, exist_ok=True)
    log(f"closed-loop simulation: {n_users} users x {n_items} items (seed {seed}), {days} days of "
        f"{users_per_day} users, update after day {update_after}; model home {home}")
    if new_items_per_day or explore:
        log(f"new items: {new_items_per_day} a day (the last {held_out} items, held out of version 1; vector: "
            f"{new_item_vector} mean); "
            f"exploration: " + (f"{explore:g} of the slots (items shown < {explore_max_impressions} times)"
                                if explore else "off"))
    if v1_from is not None:
        shutil.copytree(v1_from, home / "v1")
        versions.promote(home, "v1")
        log(f"version 1: copied from {v1_from}")
    else:
        train_v1(home, n_users=n_users, n_items=n_items, seed=seed, ctr_examples=ctr_examples,
                 retrieval_epochs=v1_retrieval_epochs, ranking_epochs=v1_ranking_epochs, n_candidates=n_candidates,
                 held_out_items=held_out, log=log)
    world = make_synthetic(n_users=n_users, n_items=n_items, seed=seed, string_keys=True, held_out_items=held_out)
    store = SqliteEventStore(root / "events.db")
    clock = SimClock()
    engine = Engine.load(home, events=store, ort_threads=1, num_threads=1, clock=clock, explore=explore,
                         explore_max_impressions=explore_max_impressions, seed=seed)
    names = {engine.version: versions.current(home)}
    rng = np.random.default_rng(seed + 1)
    days_out, report = [], None
    n_base = world.n_data_items
    trained = n_base               # world ids below this are the served version's own (trained) items
    arrived = n_base               # ... below this have arrived
    try:
        for day in range(1, days + 1):
            version = names.get(engine.version, engine.version)
            if new_items_per_day:
                clock.now = SIM_START + (day - 1) * 86400.0
                ids = arriving_items(world, day, new_items_per_day)
                if len(ids):
                    add_new_items(engine, world, ids, np.arange(trained), new_item_vector)
                    arrived = int(ids[-1]) + 1
            stats = serve_day(engine, world, rng, users_per_day, k=k, clock=clock, day=day,
                              new_from=n_base if new_items_per_day else None)
            store.flush()
            shown, clicks, expected = stats["shown"], stats["clicks"], stats["expected"]
            ns, nc = stats["new_shown"], stats["new_clicks"]
            days_out.append({"day": day, "version": version, "requests": stats["requests"], "shown": shown,
                             "clicks": clicks, "ctr": clicks / max(shown, 1), "expected_ctr": expected / max(shown, 1),
                             "new_items": arrived - n_base, "new_shown": ns, "new_clicks": nc,
                             "new_share": ns / max(shown, 1), "new_ctr": nc / ns if ns else None,
                             "new_expected_ctr": stats["new_expected"] / ns if ns else None,
                             "explored": stats["explored"], "explored_new": stats["explored_new"],
                             "explored_max": stats["explored_max"],
                             "explored_share": stats["explored"] / max(shown, 1)})
            log(f"day {day}: version {version}, {stats['requests']} requests, {shown} shown, {clicks} clicks, "
                f"CTR {clicks / max(shown, 1):.4f} (expected {expected / max(shown, 1):.4f})"
                + (f"; new items ({arrived - n_base} so far): {ns} shown, {nc} clicks, {stats['explored']} slots "
                   f"explored" if new_items_per_day else ""))
            if day == update_after:
                log(f"\n== offline update after day {day}" + (" (shuffled CTR labels)" if shuffle_labels else ""))
                report = update(home, store, data="synthetic", epochs=update_epochs, tolerance=tolerance,
                                shuffle_labels=shuffle_labels, seed=seed, log=log)
                if report["gate"]["promoted"]:
                    vid = engine.swap(versions.resolve(home))
                    names[vid] = report["name"]
                    trained = n_base + int((report.get("retrieval") or {}).get("items_added", 0))
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
    result = {"days": days_out, "versions": per_version, "update": report, "home": str(home), "seconds": total,
              "settings": {"n_users": n_users, "n_items": n_items, "days": days, "users_per_day": users_per_day,
                           "k": k, "update_after": update_after, "seed": seed, "new_items_per_day": new_items_per_day,
                           "explore": explore, "explore_max_impressions": explore_max_impressions,
                           "new_item_vector": new_item_vector}}
    if out:
        (root / "simulation.json").write_text(json.dumps(result, indent=1, default=_json_default))
    return result


def compare_exploration(out: str | None = None, *, explore: float = 0.1, new_items_per_day: int = 10,
                        days: int = 6, update_after: int = 3, log: Callable[[str], None] = print,
                        **options) -> dict:
    """The closed loop with new items arriving each day, run with exploration off and with ``explore`` (same
    seed: the same version 1, users, contexts and click draws up to where the answers differ); prints per day
    the CTR and expected CTR, the new items' impressions, clicks and CTR, off beside on, with totals before and
    after the update. ``options``: :func:`run`'s other arguments. Returns ``{"off": run, "on": run, "rows":
    [...]}``, also written to ``out/explore_comparison.json`` with ``out`` (the runs in ``out/off``,
    ``out/on``)."""
    if not explore > 0:
        raise ValueError(f"explore must be > 0 to compare with off, got {explore}")
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="rec_engine_explore_"))
    common = dict(new_items_per_day=new_items_per_day, days=days, update_after=update_after, **options)
    log("== exploration off")
    off = run(root / "off", explore=0.0, log=log, **common)
    log("\n== exploration on")
    on = run(root / "on", explore=explore, v1_from=Path(off["home"]) / "v1", log=log, **common)
    rows = comparison_rows(off, on, update_after)
    log(f"\nexploration off vs on ({explore:g} of the slots), {new_items_per_day} new items a day, update after day "
        f"{update_after} (CTR: clicks / shown; exp: mean true click probability; new: the items that arrived)")
    log(format_comparison(rows))
    result = {"off": off, "on": on, "rows": rows, "explore": explore}
    (root / "explore_comparison.json").write_text(json.dumps(result, indent=1, default=_json_default))
    return result


def comparison_rows(off: dict, on: dict, update_after: int) -> list[dict]:
    """One row per day and one per period (before and after the update) of two runs' day figures."""
    def pair(days):
        d = {}
        for name, run_ in (("off", off), ("on", on)):
            sel = [x for x in run_["days"] if x["day"] in days]
            shown, ns = sum(x["shown"] for x in sel), sum(x["new_shown"] for x in sel)
            d[name] = {"version": "/".join(dict.fromkeys(x["version"] for x in sel)), "shown": shown,
                       "clicks": sum(x["clicks"] for x in sel), "new_shown": ns,
                       "new_clicks": sum(x["new_clicks"] for x in sel),
                       "expected": sum(x["expected_ctr"] * x["shown"] for x in sel),
                       "new_expected": sum(x["new_expected_ctr"] * x["new_shown"] for x in sel if x["new_shown"]),
                       "explored": sum(x["explored"] for x in sel)}
            d[name]["ctr"] = d[name]["clicks"] / max(shown, 1)
            d[name]["expected_ctr"] = d[name]["expected"] / max(shown, 1)
            d[name]["new_ctr"] = d[name]["new_clicks"] / ns if ns else None
            d[name]["new_expected_ctr"] = d[name]["new_expected"] / ns if ns else None
            d[name]["new_share"] = ns / max(shown, 1)
        return d

    n = len(off["days"])
    rows = [{"day": str(x["day"]), **pair({x["day"]})} for x in off["days"]]
    rows.append({"day": f"1-{update_after}", **pair(set(range(1, update_after + 1)))})
    if update_after < n:
        rows.append({"day": f"{update_after + 1}-{n}", **pair(set(range(update_after + 1, n + 1)))})
    return rows


def format_comparison(rows: list[dict]) -> str:
    def f(x, spec=".4f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    return _table([(r["day"], r["off"]["version"] + " / " + r["on"]["version"],
                    f(r["off"]["ctr"]), f(r["on"]["ctr"]), f(r["off"]["expected_ctr"]), f(r["on"]["expected_ctr"]),
                    f"{r['off']['new_shown']} / {r['on']['new_shown']}",
                    f"{f(r['off']['new_share'], '.3f')} / {f(r['on']['new_share'], '.3f')}",
                    f"{r['off']['new_clicks']} / {r['on']['new_clicks']}",
                    f"{f(r['off']['new_ctr'], '.3f')} / {f(r['on']['new_ctr'], '.3f')}",
                    f"{f(r['off']['new_expected_ctr'], '.3f')} / {f(r['on']['new_expected_ctr'], '.3f')}")
                   for r in rows],
                  ("day", "version off / on", "CTR off", "CTR on", "exp off", "exp on", "new shown off / on",
                   "new share off / on", "new clicks off / on", "new CTR off / on", "new exp off / on"))


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])
