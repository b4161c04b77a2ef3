"""Ranking (CTR) examples from a table of rated interactions (MovieLens' ratings.csv and the like).

Each rating is an example of the item shown to the user; its label is 1 when the rating is at least ``like``
(4 of 5 stars by default: "liked"), else 0, so a model learns which of the items a user chose to rate they
liked. Fields: ``user_id`` and ``item_id`` (categorical), the items' ``labels`` (multi: genres and tags, when
the items file gives them) and, with item content (``--items``), the numeric ``content_0 .. content_{K-1}``
of :class:`rec_engine.content.ContentProjection` (the whitened principal axes of the trained items' text
vectors): the same function builds them here and for an item the engine adds online with its text.

The split holds out items as well as time: ``cold`` (10%) of the items are drawn at random and every example
of theirs goes to test, so the test set measures ranking of items training never saw (``extra["test_cold"]``
marks them); of the other examples, ordered by time, the last ``test`` share is test and the ``valid`` share
before it validation. ``extra["rows_<part>"]`` keeps each example's dense user and item ids and its time.
"""
from __future__ import annotations

import numpy as np

from rec_engine.features import Schema

from .containers import CtrData

FIELDS = {"user_id": "categorical", "item_id": "categorical", "labels": "multi"}


def ratings_ctr(inter, *, like: float = 4.0, content=None, content_dim: int = 8, cold: float = 0.1,
                test: float = 0.2, valid: float = 0.1, seed: int = 0, name: str = "ratings-ctr",
                profiles=None) -> CtrData:
    """CTR data from ``inter`` (:class:`~rec_engine_train.data.loaders.RatedInteractions` with ratings and
    timestamps); ``content``: the items' :class:`~rec_engine_train.content_map.ItemContent` (its ``labels`` become
    the ``labels`` field, its vectors the content fields, projected on ``content_dim`` axes).

    ``profiles`` (True or a :class:`rec_engine.profiles.ProfileConfig`; needs ``content``): the user-item
    affinities of the user's profile as pair fields ``profile_tag_overlap`` (the item's labels against the
    user's decayed tag affinities) and ``profile_content_cosine`` (its text vector against the user's decayed
    mean text vector), each example's computed by :func:`rec_engine.profiles.asof_features` from the ratings
    before its time (every rating is a ``rating`` event with its value), as the engine computes them at
    serving time from the events it has observed."""
    if getattr(inter, "ratings", None) is None:
        raise ValueError("CTR examples from interactions need ratings (a rating column) for the labels")
    if not (0 <= cold < 1 and 0 < test < 1 and 0 < valid < 1 and test + valid < 1):
        raise ValueError(f"need 0 <= cold < 1 and test, valid > 0 with test + valid < 1; got {cold}, {test}, {valid}")
    n, n_items = len(inter.users), inter.n_items
    if n < 10:
        raise ValueError(f"{n} ratings are too few for a split")
    rng = np.random.default_rng(seed)
    is_cold = np.zeros(n_items, bool)
    is_cold[rng.choice(n_items, int(round(cold * n_items)), replace=False)] = True
    ts = inter.timestamps if inter.timestamps is not None else np.arange(n, dtype=np.int64)
    warm = np.flatnonzero(~is_cold[inter.items])
    warm = warm[np.argsort(ts[warm], kind="stable")]
    n_test, n_valid = int(round(test * len(warm))), int(round(valid * len(warm)))
    cut = len(warm) - n_test - n_valid
    parts = {"train": np.sort(warm[:cut]), "valid": np.sort(warm[cut:cut + n_valid]),
             "test": np.sort(np.concatenate([warm[cut + n_valid:], np.flatnonzero(is_cold[inter.items])]))}
    labels = (np.asarray(inter.ratings, np.float64) >= like).astype(np.float32)

    item_cols: dict = {"item_id": np.arange(n_items, dtype=np.int64)}
    kinds = {"user_id": "categorical", "item_id": "categorical"}
    projection = None
    if content is not None:
        if len(content.vectors) != n_items:
            raise ValueError(f"item content for {len(content.vectors)} items, the data has {n_items}")
        if content.labels is not None:
            item_cols["labels"] = [list(x) for x in content.labels]
            kinds["labels"] = "multi"
        from rec_engine.content import ContentProjection

        fit_rows = np.flatnonzero(content.has & ~is_cold)      # the trained items' texts
        if content_dim > 0 and len(fit_rows) >= 2:            # content_dim=0: the labels only
            projection = ContentProjection.fit(content.vectors[fit_rows],
                                               min(content_dim, len(fit_rows) - 1, content.vectors.shape[1]))
            feats = projection.features(content.vectors, content.has)
            item_cols.update(feats)
            kinds.update({k: "numeric" for k in feats})

    def cols(rows):
        it = inter.items[rows]
        out = {"user_id": inter.users[rows]}
        for k, v in item_cols.items():
            out[k] = v[it] if isinstance(v, np.ndarray) else [v[i] for i in it.tolist()]
        return out

    pair = {}
    if profiles:
        if content is None:
            raise ValueError("profile features need the items' content (labels and text vectors)")
        from rec_engine.profiles import FEATURE_NAMES, ItemInfo, ProfileConfig, asof_features

        config = profiles if isinstance(profiles, ProfileConfig) else ProfileConfig()
        info = ItemInfo.from_tag_lists(content.labels or [[] for _ in range(n_items)], {"content": content.vectors})
        kinds_ev = np.full(n, "rating", dtype=object)
        feats = asof_features((inter.users, inter.items, kinds_ev, ts.astype(np.float64),
                               np.asarray(inter.ratings, np.float64)),
                              (inter.users, inter.items, ts.astype(np.float64)), info, config)
        for j, fname in enumerate(FEATURE_NAMES[:2]):
            pair[f"profile_{fname}"] = feats[:, j].astype(np.float64)
            kinds[f"profile_{fname}"] = "numeric"

    def cols_with_pairs(rows):
        out = cols(rows)
        out.update({k: v[rows] for k, v in pair.items()})
        return out

    schema = Schema.fit(cols_with_pairs(parts["train"]), kinds, hash_buckets=1)
    enc = {k: schema.encode(cols_with_pairs(r), labels[r]) for k, r in parts.items()}
    extra = {f"rows_{k}": {"users": inter.users[r], "items": inter.items[r], "ts": ts[r]} for k, r in parts.items()}
    extra["test_cold"] = is_cold[inter.items[parts["test"]]]
    extra["cold_items"] = np.flatnonzero(is_cold)
    extra["entity_features"] = {"user": {"user_id": np.arange(inter.n_users, dtype=np.int64)}, "item": item_cols}
    if content is not None:
        extra["content_info"] = dict(content.info)
    if projection is not None:
        extra["content_projection"] = projection
    if pair:
        extra["pair_fields"] = list(pair)
        extra["content_vectors"] = content.vectors      # serving's profiles read the same vectors and labels
        extra["item_labels"] = content.labels
        extra["profile_config"] = {"half_life_days": config.half_life_days, "min_events": config.min_events,
                                   "kind_weights": dict(config.kind_weights)}
    return CtrData(schema=schema, train=enc["train"], valid=enc["valid"], test=enc["test"], name=name, extra=extra,
                   keys=inter.keys)
