"""What profiles cost the engine: ``Engine.observe`` with and without ``profiles=True`` (the event store's commit
plus the profile update), the profile read, ``recommend(explain=True)``, the build at load and the memory per
profile, in one run.

    PYTHONPATH=python:.devpath .venv/bin/python bench/bench_engine_profiles.py [--users 2000] [--items 1000]
        [--events 20000] [--calls 3000] [--json bench/results/engine_profiles.json]

The pipeline is the synthetic world's (LightGCN + DeepFM, trained briefly by ``rec_engine_train.simulate``);
tags come from the ranking model's item fields (category, brand, tags). The store is pre-filled with
``--events`` clicks, so the load builds that many events' profiles in bulk. Each ``observe`` is one click of a
random user on a random item, committed before it returns (``SqliteEventStore``, ``durable=False``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def stats(lat):
    a = np.asarray(lat) * 1e6
    return {"n": len(a), "p50_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99)),
            "per_s": float(len(a) / (a.sum() / 1e6))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "engine_profiles.json"))
    args = ap.parse_args()

    from rec_engine.engine import Engine
    from rec_engine.events import Event, SqliteEventStore
    from rec_engine_train.simulate import train_v1

    rng = np.random.default_rng(0)
    out = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "models"
        home.mkdir()
        train_v1(home, n_users=args.users, n_items=args.items, seed=0, ctr_examples=5000, retrieval_epochs=2,
                 ranking_epochs=1, n_candidates=200, log=lambda s: None)
        users = [f"u-{u}" for u in range(args.users)]
        with Engine.load(home, num_threads=1) as probe:
            keys = probe._version.item_keys.key_array().tolist()
        db = Path(tmp) / "events.db"
        store = SqliteEventStore(db)
        t = 1.7e9
        store.append([Event("click", users[int(u)], keys[int(i)], ts=t + j)
                      for j, (u, i) in enumerate(zip(rng.integers(0, args.users, args.events),
                                                     rng.integers(0, len(keys), args.events)))])
        store.close()
        rows = []
        for profiles in (False, True):
            t0 = time.perf_counter()
            e = Engine.load(home, num_threads=1, events=db, profiles=profiles or None)
            load_s = time.perf_counter() - t0
            lat = []
            for u, i in zip(rng.integers(0, args.users, args.calls), rng.integers(0, len(keys), args.calls)):
                s = time.perf_counter()
                e.observe(users[int(u)], [keys[int(i)]])
                lat.append(time.perf_counter() - s)
            row = {"profiles": profiles, "load_s": load_s, "observe": stats(lat)}
            rec_lat = []
            for u in rng.integers(0, args.users, 300):
                s = time.perf_counter()
                e.recommend(users[int(u)], k=10, context={"hour": 12.0, "device": "web"}, explain=profiles)
                rec_lat.append(time.perf_counter() - s)
            row["recommend" + (" explain" if profiles else "")] = stats(rec_lat)
            if profiles:
                sp = e._version.profiles
                rd = []
                for u in rng.integers(0, args.users, 1000):
                    s = time.perf_counter()
                    e.profile(users[int(u)])
                    rd.append(time.perf_counter() - s)
                row["profile read"] = stats(rd)
                mem = sp.memory()
                row["memory"] = mem
                row["bytes_per_profile"] = (sp.profiles.nbytes() / max(len(sp.profiles), 1))
                row["n_profiles"] = len(sp.profiles)
            e.close()
            rows.append(row)
        out["rows"] = rows
    base, prof = rows
    print("| case | without profiles | with profiles |")
    print("|---|---:|---:|")
    print(f"| load (build from {args.events:,} events) | {base['load_s']:.2f} s | {prof['load_s']:.2f} s |")
    for key, name in (("observe", "observe (1 click, committed)"),):
        b, p = base[key], prof[key]
        print(f"| {name} p50 / p99 us | {b['p50_us']:.0f} / {b['p99_us']:.0f} | {p['p50_us']:.0f} / {p['p99_us']:.0f} |")
        print(f"| {name} events/s (one thread) | {b['per_s']:,.0f} | {p['per_s']:,.0f} |")
    b, p = base["recommend"], prof["recommend explain"]
    print(f"| recommend k=10 (with explain) p50 / p99 us | {b['p50_us']:.0f} / {b['p99_us']:.0f} | "
          f"{p['p50_us']:.0f} / {p['p99_us']:.0f} |")
    print(f"| profile read p50 / p99 us | | {prof['profile read']['p50_us']:.0f} / {prof['profile read']['p99_us']:.0f} |")
    print(f"| memory per profile | | {prof['bytes_per_profile']:,.0f} bytes ({prof['n_profiles']:,} profiles) |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
