"""User profiles (rec_engine.profiles): online update, bulk build, reads, features and memory, in one run.

A script, not a pytest-benchmark suite (it holds no ``bench_*`` functions, so pytest collects nothing):

    PYTHONPATH=python:.devpath .venv/bin/python bench/bench_profiles.py [--items 50000] [--tags 1000]
        [--users 50000] [--events 1000000] [--observe 200000] [--reads 5000] [--candidates 100]
        [--json bench/results/profiles.json]

Items are MovieLens-like: 1-5 tags each out of ``--tags``, a 384-d unit "content" vector and a 64-d
"collaborative" vector. Events: clicks 70%, ratings 20% (0.5-5 stars), conversions 10% over ``--users``
users (a Zipf-ish user popularity) within 90 days; half-life 14 days, ``min_events`` 3.

- ``build``: :meth:`Profiles.build` of ``--events`` events (vectorized; a Python loop per user only);
- ``observe``: :meth:`Profiles.observe` of ``--observe`` further events on the built profiles, one thread,
  per-event latency (``perf_counter_ns`` around each call) and events/s (a loop without timers), with the
  two vector spaces and with tags only (an :class:`ItemInfo` without vectors), and 2 threads together;
- ``profile``, ``features`` (``--candidates`` candidates), ``explain``: per-call latency over ``--reads`` users;
- ``asof_features``: the training-time replay (events/s of the replay, examples/s);
- memory: :meth:`Profiles.memory` (bytes per stored profile as the module counts them) and the process's
  after the observe cases and after :meth:`Profiles.compact`; allocations still traced (tracemalloc) after a
  build per profile, and the resident-set growth.

Prints a Markdown table; the JSON (default ``bench/results/profiles.json``, git-ignored) holds every row
and the run conditions (CPU, cores, Python, NumPy, load).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import threading
import time
import tracemalloc

import numpy as np

from rec_engine.events import KINDS
from rec_engine.profiles import ItemInfo, ProfileConfig, Profiles, asof_features

T0 = 1_700_000_000.0
DAY = 86400.0


def make_items(n_items, n_tags, seed=0, vectors=True):
    r = np.random.default_rng(seed)
    lens = r.integers(1, 6, n_items)
    pop = 1.0 / np.arange(1, n_tags + 1) ** 0.8                     # some tags (genres) far more common
    pop /= pop.sum()
    tag_lists = [[f"tag-{j}" for j in r.choice(n_tags, k, replace=False, p=pop)] for k in lens]
    vecs = None
    if vectors:
        c = r.normal(size=(n_items, 384)).astype(np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        vecs = {"content": c, "collaborative": r.normal(size=(n_items, 64)).astype(np.float32)}
    return ItemInfo.from_tag_lists(tag_lists, vecs)


def make_events(n, n_users, n_items, seed=1, t0=T0, span=90 * DAY):
    r = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_users + 1) ** 0.6
    users = r.choice(n_users, n, p=p / p.sum()).astype(np.int64)
    items = r.integers(0, n_items, n).astype(np.int64)
    kinds = r.choice(np.array([KINDS.index("click"), KINDS.index("rating"), KINDS.index("conversion")], np.int8),
                     n, p=[0.7, 0.2, 0.1])
    ts = t0 + np.sort(r.uniform(0, span, n))
    values = np.where(kinds == KINDS.index("rating"), r.integers(1, 11, n) / 2.0, np.nan)
    return users, items, kinds, ts, values


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def lat_stats(ns):
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return float(np.median(a)), float(np.percentile(a, 99)), float(a.mean())


def observe_case(prof, ev, name, threads=1):
    users, items, kinds, ts, values = ev
    rows = list(zip(users.tolist(), items.tolist(), [KINDS[k] for k in kinds.tolist()], ts.tolist(),
                    [None if v != v else v for v in values.tolist()]))
    half = len(rows) // 2
    timed_rows, fast_rows = rows[:half], rows[half:]
    obs = prof.observe
    clock = time.perf_counter_ns
    lat = []
    for u, i, k, t, v in timed_rows:                    # latency of each call
        t1 = clock()
        obs(u, i, k, t, v)
        lat.append(clock() - t1)
    if threads == 1:                                    # throughput: no timer in the loop
        t1 = time.perf_counter()
        for u, i, k, t, v in fast_rows:
            obs(u, i, k, t, v)
        wall = time.perf_counter() - t1
    else:
        parts = [fast_rows[j::threads] for j in range(threads)]
        barrier = threading.Barrier(threads + 1)

        def work(part):
            barrier.wait()
            for u, i, k, t, v in part:
                obs(u, i, k, t, v)

        ths = [threading.Thread(target=work, args=(p,)) for p in parts]
        for th in ths:
            th.start()
        barrier.wait()
        t1 = time.perf_counter()
        for th in ths:
            th.join()
        wall = time.perf_counter() - t1
    med, p99, mean = lat_stats(lat)
    return dict(case=name, threads=threads, events_per_s=len(fast_rows) / wall, median_us=med, p99_us=p99,
                mean_us=mean, calls=len(lat))


def read_case(name, fn, users, reps=1):
    clock = time.perf_counter_ns
    lat = []
    for u in users:
        t1 = clock()
        for _ in range(reps):
            fn(u)
        lat.append((clock() - t1) / reps)
    med, p99, mean = lat_stats(lat)
    return dict(case=name, median_us=med, p99_us=p99, mean_us=mean, calls=len(lat))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--tags", type=int, default=1_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--events", type=int, default=1_000_000, help="events for build()")
    ap.add_argument("--observe", type=int, default=200_000, help="events for observe() (half timed per call)")
    ap.add_argument("--reads", type=int, default=5_000, help="users read per read case")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--asof-events", type=int, default=100_000)
    ap.add_argument("--asof-examples", type=int, default=20_000)
    ap.add_argument("--json", metavar="PATH",
                    default=os.path.join(os.path.dirname(__file__), "results", "profiles.json"),
                    help="where the JSON goes ('' for none)")
    args = ap.parse_args()
    t_run = time.perf_counter()
    cfg = ProfileConfig(half_life_days=14.0, min_events=3, ttl_s=None)

    info = make_items(args.items, args.tags)
    info_tags = make_items(args.items, args.tags, vectors=False)
    ev = make_events(args.events, args.users, args.items)
    rows = []

    # ---- build
    gc.collect()
    rss0 = rss_bytes()
    prof = Profiles(info, cfg)
    t1 = time.perf_counter()
    n_prof = prof.build(*ev)
    build_s = time.perf_counter() - t1
    gc.collect()
    rss_growth = rss_bytes() - rss0
    mem = prof.memory()
    n_tags = [prof.get(u).tag_ids.size for u in prof.users()]
    rows.append(dict(case=f"build(): {args.events:,} events, {args.users:,} users", seconds=build_s,
                     events_per_s=args.events / build_s, profiles=n_prof, pending=mem["pending"]))
    prof_t = Profiles(info_tags, cfg)
    t1 = time.perf_counter()
    prof_t.build(*ev)
    build_t = time.perf_counter() - t1
    rows.append(dict(case="build(), tags only (no vectors)", seconds=build_t, events_per_s=args.events / build_t,
                     profiles=len(prof_t), pending=prof_t.n_pending))
    mem_t = prof_t.memory()
    # an independent count: what the Python allocator and NumPy hold after a build, traced
    del prof_t
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    traced = Profiles(info, cfg)
    traced.build(*ev)
    gc.collect()
    traced_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del traced
    gc.collect()
    prof_t = Profiles(info_tags, cfg)
    prof_t.build(*ev)

    # ---- observe (continuing after the built history)
    later = make_events(args.observe, args.users, args.items, seed=2, t0=float(ev[3].max()), span=7 * DAY)
    obs_rows = [observe_case(prof, later, "observe(), tags + content 384-d + collaborative 64-d"),
                observe_case(prof_t, later, "observe(), tags only"),
                observe_case(prof, make_events(args.observe, args.users, args.items, seed=3,
                                               t0=float(later[3].max()), span=DAY),
                             "observe(), tags + vectors, 2 threads", threads=2)]
    hot = Profiles(info, cfg)
    u0 = int(ev[0][0])
    for j in range(5):
        hot.observe(u0, j, "click", T0)
    clock = time.perf_counter_ns
    lat = []
    for j in range(20_000):
        t1 = clock()
        hot.observe(u0, 7, "click", T0 + j)
        lat.append(clock() - t1)
    med, p99, mean = lat_stats(lat)
    obs_rows.append(dict(case="observe(), one user and item again (warm caches)", threads=1,
                         events_per_s=1e6 / mean, median_us=med, p99_us=p99, mean_us=mean, calls=len(lat)))

    mem_updated = prof.memory()
    t1 = time.perf_counter()
    n_compacted = prof.compact()
    compact_s = time.perf_counter() - t1
    mem_compacted = prof.memory()

    # ---- reads
    r = np.random.default_rng(4)
    users = r.choice(np.array(prof.users()), min(args.reads, len(prof)), replace=False).tolist()
    now = float(later[3].max())
    cand = [r.integers(0, args.items, args.candidates) for _ in range(len(users))]
    it = iter(cand)
    read_rows = [read_case("profile(user, top=10)", lambda u: prof.profile(u, now=now, top=10), users),
                 read_case("get(user) (snapshot)", prof.get, users),
                 read_case(f"features(user, {args.candidates} candidates)",
                           lambda u: prof.features(u, next(it), now=now), users)]
    it = iter(cand)
    read_rows.append(read_case(f"explain(user, {args.candidates} candidates, top=3)",
                               lambda u: prof.explain(u, next(it), now=now), users[:1000]))
    profile_json = len(json.dumps(prof.profile(users[0], now=now).to_dict()))

    # ---- asof_features (training)
    aev = tuple(a[:args.asof_events] for a in ev)
    rx = np.random.default_rng(5)
    ex = (rx.choice(aev[0], args.asof_examples), rx.integers(0, args.items, args.asof_examples),
          rx.uniform(aev[3].min(), aev[3].max(), args.asof_examples))
    t1 = time.perf_counter()
    feats = asof_features(aev, ex, info, cfg)
    asof_s = time.perf_counter() - t1
    rows.append(dict(case=f"asof_features(): {args.asof_events:,} events, {args.asof_examples:,} examples",
                     seconds=asof_s, events_per_s=args.asof_events / asof_s,
                     examples_per_s=args.asof_examples / asof_s, nonzero=float((feats != 0).any(axis=1).mean())))

    cond = {"cpu": _cpu(), "cores": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__,
            "loadavg": os.getloadavg(), "items": args.items, "tags": args.tags, "users": args.users,
            "events": args.events, "half_life_days": cfg.half_life_days, "min_events": cfg.min_events,
            "run_seconds": time.perf_counter() - t_run}
    memory = dict(profiles=mem["profiles"], pending=mem["pending"], bytes_per_profile=mem["bytes_per_profile"],
                  bytes_per_pending=mem["bytes_per_pending"], bytes_per_profile_tags_only=mem_t["bytes_per_profile"],
                  tags_per_profile_median=float(np.median(n_tags)), tags_per_profile_max=int(max(n_tags)),
                  rss_growth_per_profile=rss_growth / max(1, n_prof), traced_bytes_per_profile=traced_bytes / n_prof,
                  profile_json_bytes=profile_json,
                  item_info_bytes=info.nbytes(), bytes_per_profile_after_updates=mem_updated["bytes_per_profile"],
                  bytes_per_profile_after_compact=mem_compacted["bytes_per_profile"], compacted=n_compacted,
                  compact_seconds=compact_s)

    print(f"\n## User profiles ({cond['cpu']}, {cond['cores']} cores, Python {cond['python']}, NumPy "
          f"{cond['numpy']}, load {cond['loadavg'][0]:.2f}; {args.items:,} items with 1-5 of {args.tags:,} tags, "
          f"384-d content + 64-d collaborative vectors)\n")
    print("| case | events/s | median us | p99 us | mean us | calls |")
    print("|---|---:|---:|---:|---:|---:|")
    for x in obs_rows:
        print(f"| {x['case']} | {x['events_per_s']:,.0f} | {x['median_us']:.2f} | {x['p99_us']:.2f} | "
              f"{x['mean_us']:.2f} | {x['calls']:,} |")
    print("\n| read | median us | p99 us | mean us | calls |")
    print("|---|---:|---:|---:|---:|")
    for x in read_rows:
        print(f"| {x['case']} | {x['median_us']:.1f} | {x['p99_us']:.1f} | {x['mean_us']:.1f} | {x['calls']:,} |")
    print("\n| bulk | seconds | events/s | notes |")
    print("|---|---:|---:|---|")
    for x in rows:
        note = (f"{x['profiles']:,} profiles, {x['pending']:,} pending" if "profiles" in x else
                f"{x['examples_per_s']:,.0f} examples/s, {x['nonzero']:.0%} with a profile")
        print(f"| {x['case']} | {x['seconds']:.2f} | {x['events_per_s']:,.0f} | {note} |")
    print(f"\nMemory: {memory['bytes_per_profile']:,.0f} bytes per profile as counted "
          f"({memory['bytes_per_profile_tags_only']:,.0f} tags only; median {memory['tags_per_profile_median']:.0f} "
          f"tags, max {memory['tags_per_profile_max']}), {memory['bytes_per_pending']:,.0f} per pending user; "
          f"traced (tracemalloc) after build() {memory['traced_bytes_per_profile']:,.0f} bytes per profile, "
          f"resident-set "
          f"growth {memory['rss_growth_per_profile']:,.0f} (freed temporaries the allocator keeps included); "
          f"one profile's JSON {memory['profile_json_bytes']:,} bytes; "
          f"ItemInfo {memory['item_info_bytes'] / 2**20:.0f} MiB.")
    print(f"After the observe cases (updated profiles hold their tags in a dict): "
          f"{memory['bytes_per_profile_after_updates']:,.0f} bytes per profile; compact() of {n_compacted:,} profiles "
          f"in {compact_s:.2f} s: {memory['bytes_per_profile_after_compact']:,.0f}.")
    print(f"\n(run time {cond['run_seconds']:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"conditions": cond, "observe": obs_rows, "reads": read_rows, "bulk": rows, "memory": memory},
                      f, indent=1)
        print(f"(JSON: {args.json})")


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
