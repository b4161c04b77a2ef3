"""Content features in the ranking model, on MovieLens (ml-latest-small): does the CTR model rank new items better
when it sees their text?

    python -m rec_engine_train.experiments.ctr_content --data ../shared/data/movielens-small --out ctr_content.json

Examples are the ratings (label: at least 4 stars), split by :func:`rec_engine_train.data.ratings_ctr.ratings_ctr`:
a seeded 10% of the movies are held out of training entirely (all their ratings are test examples: "cold"), the
other ratings are split by time (last 20% test: "warm", 10% before it validation). Each movie's text is
``item_text(title, genres=genres)`` (MovieLens tags are left out: users tag what they watched, so a new movie has
none). The same model (``--model``, DeepFM by default, the kind's default settings and ``--epochs``) is trained on
the same split three times: with the user and item ids only; with the movies' genres as a multi-valued field too;
and with genres plus the content fields (the text vectors projected on ``--content-dim`` principal axes,
:class:`rec_engine.content.ContentProjection`, the function the engine applies to an item added online). Each
model is exported and scored by the serving ranker (:class:`rec_engine.ranking.CtrRanker`); AUC and log loss are
reported on all test examples, on the warm ones and on the cold ones.

A fourth run adds the **profile features** (issue 17): the user-item affinities of the user's profile
(decayed interest tags against the movie's genres, decayed mean text vector against the movie's), computed for
each example from the ratings before its time by :func:`rec_engine.profiles.asof_features`, the code the
engine runs on the events it observes (``profile_tag_overlap``, ``profile_content_cosine``).

``--synthetic`` runs the same four on the synthetic world instead: each user rates 40 items drawn by the
world's choice model (5 stars when a Bernoulli of the world's true click probability fires, else 1), the items'
"labels" are their category, brand and tags, and their "text vectors" the world's item factors.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="ml-latest-small directory (ratings.csv, movies.csv)")
    ap.add_argument("--synthetic", action="store_true", help="the synthetic world instead of --data")
    ap.add_argument("--out", default="ctr_content.json")
    ap.add_argument("--model", default="deepfm")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--content-dim", type=int, default=8)
    ap.add_argument("--content-encoder", default=None, help="content encoder bundle (default: the cached export)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import load_ranking

    from .. import defaults, pipeline
    from ..content_map import item_content
    from ..data import loaders
    from ..data.ratings_ctr import ratings_ctr
    from ..evaluate import evaluate_ctr

    torch.set_num_threads(2)
    if args.synthetic:
        inter, content = synthetic_ratings(args.seed)
        encode_s, source = 0.0, "synthetic"
    else:
        if args.data is None:
            ap.error("give --data DIR or --synthetic")
        data_dir = Path(args.data)
        inter = loaders.load_interactions(data_dir / "ratings.csv")
        t0 = time.perf_counter()
        content = item_content(inter.keys["item"], inter.n_items, data_dir / "movies.csv", {},
                               encoder_path=args.content_encoder, log=lambda s: print(s, file=sys.stderr))
        encode_s, source = time.perf_counter() - t0, str(data_dir)
    labels_name = "labels" if args.synthetic else "genres"
    variants = {"ids": (None, False), f"ids + {labels_name}": (0, False),
                f"ids + {labels_name} + content": (args.content_dim, False),
                f"ids + {labels_name} + content + profile": (args.content_dim, True)}
    rows, out = [], {"data": source, "model": args.model, "epochs": args.epochs, "seed": args.seed,
                     "encode_seconds": encode_s, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (dim, prof) in variants.items():
            t0 = time.perf_counter()
            data = ratings_ctr(inter, content=None if dim is None else content, content_dim=dim or 0, seed=args.seed,
                               profiles=prof)
            data_s = time.perf_counter() - t0
            config = defaults.resolve_config(args.model, data, {"epochs": args.epochs}, {}, seed=args.seed,
                                             num_threads=2, progress=False)
            t0 = time.perf_counter()
            result = pipeline.train(args.model, data, config, log=lambda s: None)
            train_s = time.perf_counter() - t0
            path = pipeline.export(result, data, Path(tmp) / name.replace(" ", ""), overwrite=True)
            ranker = load_ranking(open_bundle(path))
            probs = ranker(data.test)
            y, cold = data.test.labels, data.extra["test_cold"]
            m = {"all": evaluate_ctr(y, probs), "warm": evaluate_ctr(y[~cold], probs[~cold]),
                 "cold": evaluate_ctr(y[cold], probs[cold]), "train_seconds": train_s,
                 "fields": list(data.schema.names), "n_test": int(len(y)), "n_cold": int(cold.sum()),
                 "data_seconds": data_s}
            out["variants"][name] = m
            rows.append((name, m))
            print(f"{name:<26} AUC all {m['all']['auc']:.4f}  warm {m['warm']['auc']:.4f}  cold {m['cold']['auc']:.4f}"
                  f"  ({train_s:.0f}s)", file=sys.stderr)
    print(f"| features | AUC (all test) | AUC (warm items) | AUC (cold items) | log loss (cold) |")
    print("|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['all']['auc']:.4f} | {m['warm']['auc']:.4f} | {m['cold']['auc']:.4f} | "
              f"{m['cold']['logloss']:.4f} |")
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def synthetic_ratings(seed: int = 0, n_users: int = 1000, n_items: int = 500, per_user: int = 40):
    """Ratings of the synthetic world (see the module doc) and its items' content (labels, factor vectors)."""
    import numpy as np

    from ..content_map import ItemContent
    from ..data.loaders import RatedInteractions
    from ..data.synthetic import make_synthetic

    world = make_synthetic(n_users=n_users, n_items=n_items, seed=seed)
    rng = np.random.default_rng(seed + 1)
    logits = world.choice_logits()
    gumbel = -np.log(-np.log(rng.random(logits.shape)))
    items = np.argsort(-(logits + gumbel), axis=1)[:, :per_user]
    users = np.repeat(np.arange(n_users), per_user)
    items = items.ravel()
    p = 1.0 / (1.0 + np.exp(-world.ctr_logit(users, items, np.full(len(users), 12), np.zeros(len(users), np.int64))))
    ratings = np.where(rng.random(len(users)) < p, 5.0, 1.0).astype(np.float32)
    order = rng.permutation(len(users))            # the ratings arrive in a random global order
    ts = np.empty(len(users), np.int64)
    ts[order] = np.arange(len(users)) * 60
    inter = RatedInteractions(users, items, n_users, n_items, timestamps=ts, ratings=ratings)
    labels = [[f"category={world.category[i]}", f"brand={world.brand[i]}", *(f"tag={t}" for t in world.tags[i])]
              for i in range(n_items)]
    vecs = world.item_factors / np.linalg.norm(world.item_factors, axis=1, keepdims=True)
    content = ItemContent(vecs.astype(np.float32), np.ones(n_items, bool), {"encoder_model": "world factors"},
                          [""] * n_items, None, labels)
    return inter, content


if __name__ == "__main__":
    sys.exit(main())
