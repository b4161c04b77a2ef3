"""Content encoder speed: items encoded per second at batch 1, 16 and 64 (ONNX Runtime, all-MiniLM-L6-v2).

A script, not a pytest-benchmark suite (it holds no ``bench_*`` functions, so pytest collects nothing):

    PYTHONPATH=python:.devpath .venv/bin/python bench/bench_content.py [--bundle DIR] [--seconds 2] [--rounds 3]
        [--ort-threads 1,2] [--json bench/results/content.json]

The texts are MovieLens items as the engine encodes them, ``item_text(title, genres=genres)`` (e.g. "Toy Story
(1995). Genres: Adventure, Animation, Children, Comedy, Fantasy", ~20 tokens), from
``../shared/data/movielens-small/movies.csv`` (or ``$REC_ENGINE_DATA/movielens-small``), or synthetic titles of
the same shape where the data is absent. The encoder bundle is ``--bundle``, or exported into a temporary folder
first (needs torch and the train extra; ~15 s, not timed).

Cases (each ``--rounds`` rounds of about ``--seconds``, interleaved; cache off, so every text is encoded):

- ``encode batch B``: ``encode(texts[i:i+B], batch_size=B, cache=False)`` over consecutive items, for B in 1, 16,
  64 and every ``--ort-threads`` value (ONNX Runtime intra-op threads; 1 is the setting for a server that runs
  many requests at once): items/s and the median / p99 latency of one call;
- ``encode 1024 per call, batch 64``: a catalogue encoded in bulk: one call sorts its texts by token count, so
  each batch of 64 is padded less than 64 consecutive items are;
- ``cache hit batch 64``: the same calls answered from the LRU cache;
- ``keywords``: ``keywords(text, vector)`` per item (the item's vector given: its candidate phrases are encoded);
- ``sentiment``: VADER over the same texts, 64 per call (where vaderSentiment is installed).

Prints a Markdown table; the JSON (default ``bench/results/content.json``, git-ignored) holds every row and the
run conditions (CPU, cores, load, versions).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rec_engine.content import ContentEncoder, item_text, sentiment


def movielens_texts(limit: int = 5000) -> tuple[list[str], str]:
    roots = [Path(os.environ["REC_ENGINE_DATA"])] if os.environ.get("REC_ENGINE_DATA") else []
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for root in roots:
        f = root / "movielens-small" / "movies.csv"
        if f.is_file():
            with open(f, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))[:limit]
            return [item_text(r["title"], genres=r["genres"]) for r in rows], str(f)
    rng = np.random.default_rng(0)
    words = "love war night city man woman story last dark return star king house road dream blood".split()
    genres = "Action Adventure Animation Comedy Crime Drama Fantasy Horror Romance Thriller".split()
    texts = [item_text(" ".join(rng.choice(words, rng.integers(1, 5))).title() + f" ({rng.integers(1930, 2020)})",
                       genres=list(rng.choice(genres, rng.integers(1, 4), replace=False))) for _ in range(limit)]
    return texts, "synthetic (MovieLens not found)"


def run_case(fn, texts, batch, seconds, start):
    """Calls ``fn(chunk)`` on consecutive chunks of ``batch`` texts for about ``seconds``; returns (items, wall,
    latencies, next start)."""
    lat, items, t_end = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if start + batch > len(texts):
            start = 0
        chunk = texts[start:start + batch]
        t = time.perf_counter()
        fn(chunk)
        lat.append(time.perf_counter() - t)
        items += len(chunk)
        start += batch
    return items, sum(lat), lat, start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="a content_encoder bundle (default: export one to a temp dir)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one round of one case")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ort-threads", default="1", help="comma-separated ONNX Runtime thread counts, e.g. 1,2")
    ap.add_argument("--json", metavar="PATH",
                    default=os.path.join(os.path.dirname(__file__), "results", "content.json"),
                    help="where the JSON goes ('' for none)")
    args = ap.parse_args()

    tmp = None
    bundle = args.bundle
    if bundle is None:
        from rec_engine_train.export_content import export_encoder

        tmp = tempfile.TemporaryDirectory(prefix="bench_content_")
        t = time.perf_counter()
        bundle = export_encoder(Path(tmp.name) / "encoder")
        print(f"(encoder exported in {time.perf_counter() - t:.1f} s)")
    texts, source = movielens_texts()
    threads = [int(x) for x in args.ort_threads.split(",") if x.strip()]
    encoders = {th: ContentEncoder.load(bundle, ort_threads=th, cache_size=len(texts)) for th in threads}
    first = encoders[threads[0]]
    n_tokens = [len(e.ids) for e in first._tok.encode_batch(texts[:1000])]

    cases = []
    for th, enc in encoders.items():
        for b in (1, 16, 64):
            cases.append(dict(case=f"encode batch {b}", batch=b, ort_threads=th,
                              fn=lambda c, enc=enc, b=b: enc.encode(c, batch_size=b, cache=False)))
        cases.append(dict(case="encode 1024 per call, batch 64", batch=1024, ort_threads=th,
                          fn=lambda c, enc=enc: enc.encode(c, batch_size=64, cache=False)))
    warm = first.encode(texts[:64 * 8])                          # fills the cache for the cache-hit case
    vecs = {t: v for t, v in zip(texts[:64 * 8], warm)}
    cached = texts[:64 * 8]
    cases.append(dict(case="cache hit batch 64", batch=64, ort_threads=threads[0], texts=cached,
                      fn=lambda c: first.encode(c, batch_size=64)))
    cases.append(dict(case="keywords (vector given)", batch=1, ort_threads=threads[0], texts=cached,
                      fn=lambda c: first.keywords(c[0], vecs[c[0]], n=5)))
    try:
        sentiment(["warm up"])
        cases.append(dict(case="sentiment (VADER)", batch=64, ort_threads=0, fn=sentiment))
    except ImportError:
        print("(vaderSentiment not installed: no sentiment row)")
    for c in cases:                                              # warm-up: first runs allocate
        c["fn"](c.get("texts", texts)[:c["batch"]])
        c.update(items=0, wall=0.0, lat=[], start=0)
    t_run = time.perf_counter()
    for _ in range(args.rounds):
        for c in cases:
            items, wall, lat, c["start"] = run_case(c["fn"], c.get("texts", texts), c["batch"], args.seconds,
                                                    c["start"])
            c["items"] += items
            c["wall"] += wall
            c["lat"] += lat
    rows = []
    for c in cases:
        lat = np.array(c["lat"]) * 1e3
        rows.append(dict(case=c["case"], batch=c["batch"], ort_threads=c["ort_threads"], items=c["items"],
                         items_per_s=c["items"] / c["wall"], median_ms=float(np.median(lat)),
                         p99_ms=float(np.percentile(lat, 99)), calls=len(lat)))

    import onnxruntime
    import tokenizers

    cond = {"cpu": _cpu(), "cores": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0],
            "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__, "texts": source,
            "n_texts": len(texts), "tokens_median": float(np.median(n_tokens)), "tokens_max": int(max(n_tokens)),
            "model": first.meta.get("model"), "package_version": first.meta.get("package_version"),
            "seconds_per_round": args.seconds, "rounds": args.rounds, "run_seconds": time.perf_counter() - t_run}
    print(f"\n## Content encoder ({cond['model']}, ONNX Runtime {cond['onnxruntime']}; {cond['cpu']}, "
          f"{cond['cores']} cores, load {cond['loadavg'][0]:.2f}; MovieLens title + genres texts, median "
          f"{cond['tokens_median']:.0f} tokens; {args.rounds} interleaved rounds of {args.seconds} s)\n")
    print("| case | ORT threads | items/s | median ms / call | p99 ms / call | calls |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        th = "-" if r["case"].startswith("sentiment") else r["ort_threads"]
        print(f"| {r['case']} | {th} | {r['items_per_s']:,.0f} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['calls']:,} |")
    print(f"\n(run time {cond['run_seconds']:.0f} s; texts: {source})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"conditions": cond, "rows": rows}, f, indent=1)
        print(f"(JSON: {args.json})")
    if tmp is not None:
        tmp.cleanup()


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
