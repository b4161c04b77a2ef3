"""The accuracy / long-tail trade-off of re-ranking (MMR diversity and popularity debiasing), measured.

    python -m rec_engine_train.experiments.longtail --data ../shared/data/movielens-small --out longtail.json \
        --plot longtail.png [--synthetic]

Protocol: the interactions (every MovieLens rating counts) are split per user at random, 80% train / 20% test
(``--split leave-last-out`` for the time-ordered leave-last-out split instead: one test item per user, so the
metrics are much noisier), EASE (``--model``; closed-form, seconds on MovieLens-small) is fitted on train, and
for every user with a test item its top ``--candidates`` (200) items, train items excluded, are re-ranked to
20 by :func:`rec_engine.longtail.rerank` (the serving code) over a sweep of ``diversity`` x ``debias``:

- MMR vectors: each movie's content vector, ``item_text(title, genres=genres)`` of movies.csv encoded by the
  project's content encoder (MiniLM, 384-d; what ``rec-engine train --items`` stores), cached beside
  ``--out`` (shared with the cold-start experiment's cache naming); on the synthetic world
  (``--synthetic``) the world's true item factors (8-d, cluster centre plus noise);
- debias exposure: the items' train interaction counts.

Metrics over the test users: Recall@20 and NDCG@20 (:func:`rec_engine_train.metrics.ranking_metrics`),
coverage@20 (distinct items recommended to the test users / all items) and novelty@20 (mean
``-log2(train count / n_users)`` of the recommended items, :func:`rec_engine_train.metrics.novelty`). The
Recall@20 change against the plain ranking also gets a paired standard error over users. A reference row
draws 20 of the 200 candidates at random (what coverage the candidate set allows at no accuracy).

The named setting: among those with coverage@20 at least twice the plain ranking's and Recall@20 at most 5%
(relative) below it, the one with the highest Recall@20 (ties: higher coverage); the one with the highest
coverage among them is reported too. Writes the JSON (every setting's metrics), a PNG (Recall@20 against
coverage@20, one point per setting, coloured by diversity, marker by debias) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import rec_engine
from rec_engine.longtail import rerank

from ..metrics import coverage, novelty, ranking_metrics

K = 20
DIVERSITY = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
DEBIAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9)   # finer where coverage takes off
MIN_COVERAGE_GAIN = 2.0
MAX_RECALL_LOSS = 0.05


# ------------------------------------------------------------------------------------------ inputs
def load_movielens(data: Path, split: str, seed: int, encoder, cache_dir: Path, log):
    """The split, the items' content vectors (dense item id order) and what describes them."""
    from .. import pipeline
    from ..content_map import read_items
    from .coldstart import _cached_vectors

    opts = {"split": split} if split == "leave-last-out" else {"split": "random", "test": "0.2", "valid": "0"}
    data_split = pipeline.load_data(str(data), "graph", seed=seed, data_options=opts)
    items = read_items(data / "movies.csv", {"key": "movieId", "title": "title", "genres": "genres"})
    keys = [str(k) for k in data_split.keys["item"].tolist()]
    missing = [k for k in keys if k not in items]
    if missing:
        raise ValueError(f"{data}/movies.csv does not describe {len(missing)} rated movies (e.g. {missing[0]})")
    texts = [items[k].text() for k in keys]
    vectors, info = _cached_vectors(texts, cache_dir, encoder, log)
    return data_split, vectors, {"vectors": "content: item_text(title, genres) encoded by the content encoder",
                                 "dim": int(vectors.shape[1]), "encoder": info}


def load_synthetic(seed: int):
    """The synthetic world's implicit split and its true item factors (as float32)."""
    from ..data.synthetic import make_synthetic

    world = make_synthetic(seed=seed)
    return world.implicit(), world.item_factors.astype(np.float32), {
        "vectors": "the synthetic world's true item factors", "dim": int(world.item_factors.shape[1])}


# ------------------------------------------------------------------------------------------ evaluation
def _recall_per_user(ranked: np.ndarray, truth: list[np.ndarray]) -> np.ndarray:
    return np.array([np.isin(t, r).sum() / len(t) for r, t in zip(ranked, truth)])


def _metrics(ranked: np.ndarray, truth: list[np.ndarray], counts: np.ndarray, n_users: int) -> dict:
    m = ranking_metrics(ranked, truth, (K,))
    return {f"recall@{K}": m[f"recall@{K}"], f"ndcg@{K}": m[f"ndcg@{K}"],
            f"coverage@{K}": coverage(ranked, len(counts)), f"novelty@{K}": novelty(ranked, counts, n_users)}


def sweep(name: str, split, vectors: np.ndarray, *, model: str = "ease", n_candidates: int = 200,
          diversities=DIVERSITY, debiases=DEBIAS, seed: int = 0, num_threads: int | None = None,
          log=print) -> dict:
    """Fit ``model`` on ``split.train``, take each test user's top ``n_candidates`` (train items excluded) and
    re-rank them to K under every (diversity, debias) setting; returns the result dict."""
    from .. import pipeline
    from ..defaults import resolve_config

    t0 = time.perf_counter()
    config = resolve_config(model, split, {}, {}, seed=seed, num_threads=num_threads, progress=False)
    result = pipeline.train(model, split, config, log=log)
    t_train = time.perf_counter() - t0
    fitted = result.model
    if not hasattr(fitted, "recommend"):
        raise ValueError(f"model {model!r} has no recommend(users, k); use ease, gfcf or bspm")
    test = split.test.by_user()
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    truth = [np.unique(test.ids[test.indptr[u]:test.indptr[u + 1]]) for u in users]
    t0 = time.perf_counter()
    top = fitted.recommend(users, n_candidates)
    t_cand = time.perf_counter() - t0
    counts = split.train.item_counts()
    n_users, n_items = split.train.n_users, split.train.n_items
    exposure = counts.astype(np.float64)
    cands = []
    for ids, scores in zip(top.ids, top.scores):
        ok = ids >= 0
        cands.append((ids[ok], scores[ok].astype(np.float64)))

    settings, per_user = [], {}
    t0 = time.perf_counter()
    for lam in diversities:
        for w in debiases:
            t1 = time.perf_counter()
            ranked = np.full((len(users), K), -1, np.int64)
            for row, (ids, scores) in enumerate(cands):
                pick = rerank(scores, K, vectors=vectors[ids] if lam > 0 else None,
                              exposure=exposure[ids] if w > 0 else None, diversity=lam, debias=w)
                ranked[row, :len(pick)] = ids[pick]
            secs = time.perf_counter() - t1
            settings.append({"diversity": lam, "debias": w, **_metrics(ranked, truth, counts, n_users),
                             "ms_per_user": 1e3 * secs / len(users)})
            per_user[(lam, w)] = _recall_per_user(ranked, truth)
    t_sweep = time.perf_counter() - t0
    base = next(s for s in settings if s["diversity"] == 0 and s["debias"] == 0)
    for s in settings:
        d = per_user[(s["diversity"], s["debias"])] - per_user[(0.0, 0.0)]
        s[f"recall@{K}_change"] = s[f"recall@{K}"] / base[f"recall@{K}"] - 1
        s[f"recall@{K}_change_se"] = float(d.std(ddof=1) / np.sqrt(len(d)) / base[f"recall@{K}"])
        s[f"coverage@{K}_ratio"] = s[f"coverage@{K}"] / base[f"coverage@{K}"]

    rng = np.random.default_rng(seed)
    rand = np.stack([ids[rng.choice(len(ids), K, replace=False)] for ids, _ in cands])
    reference = {"random 20 of the candidates": _metrics(rand, truth, counts, n_users)}

    ok = [s for s in settings if s[f"coverage@{K}_ratio"] >= MIN_COVERAGE_GAIN
          and s[f"recall@{K}_change"] >= -MAX_RECALL_LOSS]
    best = max(ok, key=lambda s: (s[f"recall@{K}"], s[f"coverage@{K}"])) if ok else None
    widest = max(ok, key=lambda s: (s[f"coverage@{K}"], s[f"recall@{K}"])) if ok else None
    return {"name": name, "model": model, "model_metrics": result.metrics, "n_users": n_users, "n_items": n_items,
            "n_train": len(split.train), "n_test_users": int(len(users)), "n_candidates": n_candidates, "k": K,
            "settings": settings, "reference": reference,
            "criterion": f"coverage@{K} >= {MIN_COVERAGE_GAIN}x the plain ranking's and Recall@{K} at most "
                         f"{MAX_RECALL_LOSS:.0%} (relative) below it; best = highest Recall@{K}",
            "best": best, "widest": widest, "n_qualifying": len(ok),
            # the plain re-ranking (both 0) must be the model's own top-K: its metrics equal the model's evaluation
            "plain_equals_model_evaluation": all(abs(base[m] - result.metrics.get(m, np.nan)) < 1e-9
                                                 for m in (f"recall@{K}", f"ndcg@{K}", f"coverage@{K}")),
            "seconds": {"train": t_train, "candidates": t_cand, "sweep": t_sweep}}


def mmr_timing(n: int = 500, k: int = 20, dims=(64, 384), repeat: int = 300) -> dict:
    """Microseconds per :func:`rec_engine.longtail.mmr` call (diversity 0.3) on random float32 input."""
    from rec_engine.longtail import mmr

    rng = np.random.default_rng(0)
    out = {}
    for d in dims:
        s, v = rng.normal(size=n), rng.normal(size=(n, d)).astype(np.float32)
        mmr(s, v, k, 0.3)
        best = np.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeat):
                mmr(s, v, k, 0.3)
            best = min(best, (time.perf_counter() - t0) / repeat)
        out[f"n={n},k={k},d={d}"] = 1e6 * best
    return out


# ------------------------------------------------------------------------------------------ report
def table(res: dict) -> str:
    lines = [f"| diversity | debias | Recall@{K} | change (±se) | NDCG@{K} | coverage@{K} | x base | novelty@{K} |",
             "|---|---|---|---|---|---|---|---|"]
    for s in res["settings"]:
        mark = " **" if res["best"] is s else ""
        lines.append(f"| {s['diversity']:g} | {s['debias']:g}{mark} | {s[f'recall@{K}']:.4f} | "
                     f"{100 * s[f'recall@{K}_change']:+.1f}% (±{100 * s[f'recall@{K}_change_se']:.1f}) | "
                     f"{s[f'ndcg@{K}']:.4f} | {s[f'coverage@{K}']:.4f} | {s[f'coverage@{K}_ratio']:.2f} | "
                     f"{s[f'novelty@{K}']:.2f} |")
    for name, m in res["reference"].items():
        lines.append(f"| {name} | | {m[f'recall@{K}']:.4f} | | {m[f'ndcg@{K}']:.4f} | {m[f'coverage@{K}']:.4f} | | "
                     f"{m[f'novelty@{K}']:.2f} |")
    return "\n".join(lines)


def verdict(res: dict) -> str:
    b, w = res["best"], res["widest"]
    if b is None:
        base = next(s for s in res["settings"] if s["diversity"] == 0 and s["debias"] == 0)[f"coverage@{K}"]
        why = (f" (doubling is impossible here: the plain ranking already covers {base:.1%} of the items)"
               if base * MIN_COVERAGE_GAIN > 1 else "")
        return (f"{res['name']}: no setting at least doubles coverage@{K} for at most a {MAX_RECALL_LOSS:.0%} relative "
                f"loss of Recall@{K}{why}.")

    def say(s):
        return (f"diversity={s['diversity']:g}, debias={s['debias']:g} (Recall@{K} {s[f'recall@{K}']:.4f}, "
                f"{100 * s[f'recall@{K}_change']:+.1f}% ±{100 * s[f'recall@{K}_change_se']:.1f}; coverage@{K} "
                f"{s[f'coverage@{K}']:.4f}, {s[f'coverage@{K}_ratio']:.2f}x)")

    text = f"{res['name']}: best setting that at least doubles coverage@{K} within -5% Recall@{K}: {say(b)}"
    if w is not b:
        text += f"; widest coverage within the same budget: {say(w)}"
    return text + f" [{res['n_qualifying']} settings qualify]"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(8.5 * len(results), 5.5), squeeze=False)
    markers = "osD^v<>p*hXPd8"
    for ax, res in zip(axes[0], results):
        divs = sorted({s["diversity"] for s in res["settings"]})
        debs = sorted({s["debias"] for s in res["settings"]})
        cmap = plt.get_cmap("viridis")
        for s in res["settings"]:
            c = cmap(divs.index(s["diversity"]) / max(1, len(divs) - 1))
            ax.scatter(s[f"coverage@{K}"], s[f"recall@{K}"], color=c, s=45, edgecolor="k", linewidth=0.4,
                       marker=markers[debs.index(s["debias"]) % len(markers)])
        for lam in divs:                                       # each diversity: a line over debias
            pts = sorted((s for s in res["settings"] if s["diversity"] == lam), key=lambda s: s["debias"])
            ax.plot([s[f"coverage@{K}"] for s in pts], [s[f"recall@{K}"] for s in pts], lw=0.6,
                    color=cmap(divs.index(lam) / max(1, len(divs) - 1)))
        base = next(s for s in res["settings"] if s["diversity"] == 0 and s["debias"] == 0)
        ax.axhline(base[f"recall@{K}"] * (1 - MAX_RECALL_LOSS), color="grey", ls="--", lw=0.8,
                   label=f"-{MAX_RECALL_LOSS:.0%} Recall@{K}")
        ax.axvline(base[f"coverage@{K}"] * MIN_COVERAGE_GAIN, color="grey", ls=":", lw=0.8,
                   label=f"{MIN_COVERAGE_GAIN:g}x coverage@{K}")
        for tag, s in (("plain", base), ("best", res["best"])):
            if s is not None:
                ax.annotate(f"{tag}: div {s['diversity']:g}, debias {s['debias']:g}",
                            (s[f"coverage@{K}"], s[f"recall@{K}"]), xytext=(8, 8), textcoords="offset points",
                            fontsize=8, arrowprops={"arrowstyle": "-", "lw": 0.5})
        for lam in divs:
            ax.scatter([], [], color=cmap(divs.index(lam) / max(1, len(divs) - 1)), label=f"diversity {lam:g}")
        for w in debs:
            ax.scatter([], [], color="white", edgecolor="k", marker=markers[debs.index(w) % len(markers)],
                       label=f"debias {w:g}")
        ax.set_xlabel(f"coverage@{K}")
        ax.set_ylabel(f"Recall@{K}")
        ax.set_title(f"{res['name']}: {res['model']} top-{res['n_candidates']} re-ranked to {K}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the ml-latest-small folder (ratings.csv, movies.csv)")
    p.add_argument("--out", required=True, help="JSON file to write (the content vector cache goes beside it)")
    p.add_argument("--plot", default=None, help="PNG file to write")
    p.add_argument("--model", choices=("ease", "gfcf", "bspm"), default="ease")
    p.add_argument("--split", choices=("random", "leave-last-out"), default="random")
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--synthetic", action="store_true", help="also run on the synthetic world (item factors)")
    p.add_argument("--content-encoder", default=None, metavar="DIR",
                   help="the content encoder bundle (default: the cached export)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "ratings.csv").is_file() or not (data / "movies.csv").is_file():
        print(f"skipped: {data} has no ratings.csv / movies.csv (MovieLens ml-latest-small is not shipped: see "
              f"../shared/data/README.md)", file=sys.stderr)
        return 0
    out = Path(args.out)
    t0 = time.perf_counter()
    split, vectors, vinfo = load_movielens(data, args.split, args.seed, args.content_encoder,
                                           out.parent / "longtail_cache", print)
    results = [{**sweep(data.name, split, vectors, model=args.model, n_candidates=args.candidates, seed=args.seed,
                        num_threads=args.threads), **vinfo, "split": args.split}]
    if args.synthetic:
        split, vectors, vinfo = load_synthetic(args.seed)
        results.append({**sweep("synthetic", split, vectors, model=args.model, n_candidates=args.candidates,
                                seed=args.seed, num_threads=args.threads), **vinfo, "split": "synthetic implicit"})
    timing = mmr_timing()
    doc = {"results": results, "mmr_microseconds": timing, "seconds": time.perf_counter() - t0,
           "threads": args.threads or rec_engine.default_num_threads(), "simd": rec_engine.simd_level()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    for res in results:
        print(f"\n### {res['name']} ({res['model']}, {res['n_test_users']} test users, {res['n_items']} items, "
              f"top-{res['n_candidates']} candidates, MMR vectors: {res['vectors']})\n")
        print(table(res))
        print("\n" + verdict(res))
    print("\nmmr per call: " + ", ".join(f"{k}: {v:.0f} us" for k, v in timing.items()))
    if args.plot:
        plot(results, Path(args.plot))
    print(f"\nwall {doc['seconds']:.1f}s; {out}" + (f", {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
