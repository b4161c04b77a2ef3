"""GF-CF on Gowalla: fit, rank all items for every test user (train items excluded), write metrics as JSON.

    python -m rec_engine_train.experiments.gowalla_gfcf --data ../shared/data/gowalla --out results.json
    # BSPM-EM (blurring = GF-CF's filter, then the sharpening ODE by one RK4 step, the low-pass part merged early):
    python -m rec_engine_train.experiments.gowalla_gfcf --data ../shared/data/gowalla --out bspm.json \
        --alpha 0.2 --k-ideal 448 --sharpen 2.5 --sharpen-solver rk4

Metrics are Recall@20 and NDCG@20 of :func:`rec_engine_train.metrics.ranking_metrics` over all users with a
test item (the LightGCN protocol, as :func:`rec_engine_train.evaluate.evaluate_retrieval` computes it);
the JSON also holds the settings, the fit and ranking wall times and the machine's thread count.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import rec_engine

from ..data.loaders import load_lightgcn
from ..evaluate import take_lists
from ..metrics import ranking_metrics
from ..models.gfcf import GFCF


def run(data, alpha: float = 0.3, k_ideal: int = 256, sharpen: float = 0.0, n_iter: int = 4,
        num_threads: int | None = None, ks=(20,), sharpen_solver: str = "euler", sharpen_steps: int = 1) -> dict:
    """Fit GF-CF on ``data``/train.txt, evaluate on ``data``/test.txt; returns the result dict."""
    split = load_lightgcn(data)
    test = split.test.by_user()
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    t0 = time.perf_counter()
    model = GFCF(alpha=alpha, k_ideal=k_ideal, sharpen=sharpen, sharpen_solver=sharpen_solver,
                 sharpen_steps=sharpen_steps, n_iter=n_iter, num_threads=num_threads)
    model.fit(split.train)
    t1 = time.perf_counter()
    ranked = model.recommend(users, max(ks)).ids
    t2 = time.perf_counter()
    metrics = ranking_metrics(ranked, take_lists(test, users), ks)
    return {"data": str(data), "model": "gfcf", "n_users": split.train.n_users, "n_items": split.train.n_items,
            "n_train": len(split.train), "n_test_users": int(users.size),
            "settings": {"alpha": alpha, "k_ideal": k_ideal, "sharpen": sharpen,
                         "sharpen_solver": sharpen_solver, "sharpen_steps": sharpen_steps, "svd": "randomized",
                         "n_iter": n_iter},
            "metrics": metrics, "fit_seconds": t1 - t0, "rank_seconds": t2 - t1, "total_seconds": t2 - t0,
            "threads": num_threads or rec_engine.default_num_threads(), "simd": rec_engine.simd_level()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train.txt and test.txt (LightGCN format)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--k-ideal", type=int, default=256)
    p.add_argument("--sharpen", type=float, default=0.0)
    p.add_argument("--sharpen-solver", choices=("euler", "rk4"), default="euler")
    p.add_argument("--sharpen-steps", type=int, default=1)
    p.add_argument("--n-iter", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    result = run(Path(a.data), a.alpha, a.k_ideal, a.sharpen, a.n_iter, a.threads,
                 sharpen_solver=a.sharpen_solver, sharpen_steps=a.sharpen_steps)
    Path(a.out).write_text(json.dumps(result, indent=2))
    m = result["metrics"]
    print(f"recall@20 {m['recall@20']:.4f}  ndcg@20 {m['ndcg@20']:.4f}  fit {result['fit_seconds']:.1f} s  "
          f"rank {result['rank_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
