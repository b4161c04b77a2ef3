"""A seeded synthetic world with known ground truth, for tests and demos that must show models learn.

Users and items live in a shared latent space of ``n_factors`` dimensions:

- items belong to ``n_clusters`` clusters; an item's factor vector is its cluster centre plus noise, and its
  ``category`` is its cluster (so the category is correlated with the factors);
- a user's taste is the sum of centres of their ``age`` bucket, ``gender`` and ``country`` plus noise (so user
  features are correlated with tastes);
- item popularity is Zipf-like (power law over a random order of items).

From this world three data sets are drawn, each with a signal a model of the right kind can learn:

- :meth:`SyntheticWorld.implicit`: each user's events drawn without replacement from
  ``softmax(taste . item + pop_weight * log popularity)``, split per user into train / valid / test;
- :meth:`SyntheticWorld.sequences`: time-ordered sequences where the next item stays in the cluster of the
  previous one with probability ``stay``, and follows taste and popularity within it;
- :meth:`SyntheticWorld.ctr`: impressions (user, item, hour, device) labelled by a known logistic model
  (:meth:`SyntheticWorld.ctr_logit`) with first-order feature effects and the pairwise term
  ``taste . item`` (which factorization models can capture and logistic regression cannot).
"""
from __future__ import annotations

import numpy as np

from rec_engine.features import Schema

from .containers import CtrData, ImplicitSplit, Interactions, SequenceData

AGES = ("<18", "18-24", "25-34", "35-49", "50+")
GENDERS = ("f", "m")
COUNTRIES = ("us", "de", "fr", "br", "in", "jp", "ng", "mx")
DEVICES = ("ios", "android", "web")

CTR_KINDS = {"user_id": "categorical", "age": "categorical", "gender": "categorical", "country": "categorical",
             "item_id": "categorical", "category": "categorical", "brand": "categorical", "tags": "multi",
             "price": "numeric", "hour": "numeric", "device": "categorical"}


def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    return -np.log(-np.log(rng.random(shape) + 1e-300) + 1e-300)


class SyntheticWorld:
    """Ground truth of a synthetic recommendation world (build one with :func:`make_synthetic`).

    Attributes
    ----------
    n_users, n_items, n_factors, n_clusters : int
    tastes : float64 ``[n_users, n_factors]``
        User taste vectors.
    item_factors : float64 ``[n_items, n_factors]``
        Item factor vectors; ``tastes @ item_factors.T`` is the true affinity.
    popularity : float64 ``[n_items]``
        Zipf-like popularity, sums to 1.
    item_cluster : int64 ``[n_items]``
        Cluster of each item (= its ``category``).
    category, brand : int64 ``[n_items]``
    tags : list of int64 arrays
        1-3 tags per item (the first tag is tied to the cluster).
    price : float64 ``[n_items]``
        Positive, log-normal, cluster-dependent.
    age, gender, country : int64 ``[n_users]``
        Indices into :data:`AGES`, :data:`GENDERS`, :data:`COUNTRIES`.
    pop_weight : float
        Weight of ``log popularity`` in the implicit and sequential choice logits.
    ctr_interaction : float
        Weight of ``taste . item`` in :meth:`ctr_logit`.
    ctr_bias : float
        Intercept of :meth:`ctr_logit`, calibrated for a positive rate near ``ctr_rate``.
    keys : dict or None
        Every user's and item's key: None (the dense ids are the keys), or with ``string_keys=True`` the strings
        ``"u-<id>"`` and ``"sku-<id, 4 digits or more>"`` (``"u-17"``, ``"sku-0042"``) in dense-id order.
    held_out_items : int
        The last ``held_out_items`` items are in the world (ground truth, :attr:`keys`) but in none of its data
        sets: items that arrive later (``rec-engine simulate --new-items-per-day`` adds them while serving).
        The data sets hold items ``0 .. n_items - held_out_items - 1`` (their ``keys`` too); the other items'
        draws keep their random streams.
    """

    def __init__(self, n_users: int = 1000, n_items: int = 500, n_factors: int = 8, seed: int = 0,
                 events_per_user: int = 30, n_clusters: int = 20, n_brands: int = 40, n_tags: int = 30,
                 zipf: float = 1.0, pop_weight: float = 0.5, signal: float = 1.5, stay: float = 0.85,
                 ctr_rate: float = 0.3, ctr_interaction: float = 1.0, string_keys: bool = False,
                 held_out_items: int = 0):
        if n_users < 1 or n_items < 2 or n_factors < 1:
            raise ValueError(f"need n_users >= 1, n_items >= 2, n_factors >= 1, got {n_users}, {n_items}, {n_factors}")
        if not 1 <= n_clusters <= n_items:
            raise ValueError(f"n_clusters must be in [1, n_items], got {n_clusters}")
        if events_per_user < 3:
            raise ValueError(f"events_per_user must be >= 3, got {events_per_user}")
        if not 0.0 <= stay <= 1.0 or not 0.0 < ctr_rate < 1.0:
            raise ValueError(f"stay must be in [0, 1] and ctr_rate in (0, 1), got {stay}, {ctr_rate}")
        self.n_users, self.n_items, self.n_factors, self.n_clusters = n_users, n_items, n_factors, n_clusters
        self.seed, self.events_per_user, self.stay, self.pop_weight = seed, events_per_user, stay, pop_weight
        self.ctr_interaction, self.string_keys = ctr_interaction, string_keys
        if isinstance(held_out_items, bool) or not isinstance(held_out_items, (int, np.integer)) \
                or not 0 <= held_out_items <= n_items - 2:
            raise ValueError(f"held_out_items must be an integer in [0, n_items - 2], got {held_out_items!r}")
        self.held_out_items = int(held_out_items)
        rng = np.random.default_rng(seed)
        self._rng_seeds = rng.integers(0, 2**63 - 1, size=4)       # one stream per data set
        f = n_factors
        scale = signal / np.sqrt(f)

        # items: cluster centres + noise; category = cluster
        centres = rng.normal(0.0, 1.0, (n_clusters, f))
        self.item_cluster = rng.integers(0, n_clusters, n_items).astype(np.int64)
        self.item_cluster[:n_clusters] = np.arange(n_clusters)       # no empty cluster
        rng.shuffle(self.item_cluster)
        self.item_factors = (centres[self.item_cluster] + 0.5 * rng.normal(0.0, 1.0, (n_items, f))) * np.sqrt(scale)
        self.category = self.item_cluster.copy()
        self.brand = rng.integers(0, n_brands, n_items).astype(np.int64)
        n_extra = rng.integers(0, 3, n_items)
        first = self.item_cluster % n_tags
        self.tags = [np.unique(np.concatenate([[first[i]], rng.integers(0, n_tags, n_extra[i])])).astype(np.int64)
                     for i in range(n_items)]
        self.price = np.exp(rng.normal(3.0, 0.5, n_clusters)[self.item_cluster] + 0.3 * rng.normal(size=n_items))

        # popularity: Zipf over a random order
        ranks = rng.permutation(n_items) + 1
        pop = ranks.astype(np.float64) ** -zipf
        self.popularity = pop / pop.sum()

        # users: feature centres + noise
        self.age = rng.integers(0, len(AGES), n_users).astype(np.int64)
        self.gender = rng.integers(0, len(GENDERS), n_users).astype(np.int64)
        self.country = rng.integers(0, len(COUNTRIES), n_users).astype(np.int64)
        c_age = rng.normal(0.0, 1.0, (len(AGES), f))
        c_gender = rng.normal(0.0, 1.0, (len(GENDERS), f))
        c_country = rng.normal(0.0, 1.0, (len(COUNTRIES), f))
        self.tastes = (c_age[self.age] + c_gender[self.gender] + c_country[self.country]
                       + 0.5 * rng.normal(0.0, 1.0, (n_users, f))) * np.sqrt(scale)

        # ctr first-order effects (on top of the taste . item interaction)
        self._w_age = rng.normal(0.0, 0.3, len(AGES))
        self._w_gender = rng.normal(0.0, 0.2, len(GENDERS))
        self._w_country = rng.normal(0.0, 0.3, len(COUNTRIES))
        self._w_category = rng.normal(0.0, 0.4, n_clusters)
        self._w_brand = rng.normal(0.0, 0.3, n_brands)
        self._w_tag = rng.normal(0.0, 0.3, n_tags)
        self._w_device = rng.normal(0.0, 0.3, len(DEVICES))
        self._item_tag_effect = np.array([self._w_tag[t].mean() for t in self.tags])
        self._log_price_mean = float(np.log(self.price).mean())
        self.ctr_bias = 0.0
        cal = np.random.default_rng(seed + 7919)
        m = 20000
        logit = self.ctr_logit(cal.integers(0, n_users, m), self._impressions(cal, m),
                               cal.integers(0, 24, m), cal.integers(0, len(DEVICES), m))
        lo, hi = -20.0, 20.0                                          # bisection for the target rate
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < ctr_rate else (lo, mid)
        self.ctr_bias = (lo + hi) / 2

    @property
    def keys(self) -> dict | None:
        if not self.string_keys:
            return None
        users = np.array([f"u-{u}" for u in range(self.n_users)], dtype=object)
        items = np.array([f"sku-{i:04d}" for i in range(self.n_items)], dtype=object)
        return {"user": users, "item": items}

    @property
    def n_data_items(self) -> int:
        """The items the data sets hold: ``n_items - held_out_items`` (the first ones)."""
        return self.n_items - self.held_out_items

    def _data_keys(self) -> dict | None:
        keys = self.keys
        if keys is not None and self.held_out_items:
            keys = {"user": keys["user"], "item": keys["item"][:self.n_data_items]}
        return keys

    # ------------------------------------------------------------------------------------ ground truth
    def scores(self) -> np.ndarray:
        """True affinity ``tastes @ item_factors.T``, float64 ``[n_users, n_items]``."""
        return self.tastes @ self.item_factors.T

    def choice_logits(self) -> np.ndarray:
        """Logits of the implicit choice model, float64 ``[n_users, n_items]``:
        ``taste . item + pop_weight * log popularity``."""
        return self.scores() + self.pop_weight * np.log(self.popularity)[None, :]

    def ctr_logit(self, users, items, hours, devices) -> np.ndarray:
        """The true click logit of impressions (all int arrays of one length ``n``; ``hours`` in 0..23,
        ``devices`` indices into :data:`DEVICES`); float64 ``[n]``. Probability = sigmoid(logit)."""
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        hours, devices = np.asarray(hours, np.float64), np.asarray(devices, np.int64)
        inter = np.einsum("nf,nf->n", self.tastes[users], self.item_factors[items])
        first = (self._w_age[self.age[users]] + self._w_gender[self.gender[users]]
                 + self._w_country[self.country[users]] + self._w_category[self.category[items]]
                 + self._w_brand[self.brand[items]] + self._item_tag_effect[items]
                 - 0.4 * (np.log(self.price[items]) - self._log_price_mean)
                 + 0.03 * (hours - 11.5) + self._w_device[devices])
        return self.ctr_bias + first + self.ctr_interaction * inter

    def _impressions(self, rng: np.random.Generator, n: int, n_items: int | None = None) -> np.ndarray:
        """Items shown (among the first ``n_items``, default all): half by popularity, half uniformly."""
        if n_items is None or n_items == self.n_items:
            p = 0.5 * self.popularity + 0.5 / self.n_items
        else:
            pop = self.popularity[:n_items]
            p = 0.5 * pop / pop.sum() + 0.5 / n_items
        return rng.choice(len(p), size=n, p=p).astype(np.int64)

    # ------------------------------------------------------------------------------------ data sets
    def implicit(self, valid_frac: float = 0.1, test_frac: float = 0.2) -> ImplicitSplit:
        """All-item ranking data: per user ``~events_per_user`` distinct items drawn without replacement
        from ``softmax(choice_logits)`` (Gumbel top-k), split at random per user into train / valid /
        test. A user with >= 3 events has at least one test and one valid item. Timestamps are the
        position of the event in the user's random order."""
        rng = np.random.default_rng(self._rng_seeds[0])
        U, I, e = self.n_users, self.n_items, self.events_per_user
        A = self.n_data_items
        n_ev = np.clip(rng.integers(e // 2, e + e // 2 + 1, U), 3, A)
        keys = self.choice_logits() + _gumbel(rng, (U, I))
        keys[:, A:] = -np.inf                                         # held-out items: never drawn
        order = np.argsort(-keys, axis=1)
        keep = np.arange(I)[None, :] < n_ev[:, None]
        users = np.repeat(np.arange(U, dtype=np.int64), n_ev)
        items = order[keep].astype(np.int64)
        # a random position of each event within its user (users is sorted, each user's events contiguous)
        order = np.lexsort((rng.random(len(items)), users))
        p = np.empty(len(items), np.int64)
        p[order] = np.arange(len(items)) - np.repeat(np.cumsum(n_ev) - n_ev, n_ev)
        n_test = np.maximum(1, np.round(test_frac * n_ev)).astype(np.int64)
        n_valid = np.maximum(1, np.round(valid_frac * n_ev)).astype(np.int64)
        nt, nv = np.repeat(n_test, n_ev), np.repeat(n_valid, n_ev)
        is_test, is_valid = p < nt, (p >= nt) & (p < nt + nv)
        is_train = ~(is_test | is_valid)

        def part(mask):
            sel = np.flatnonzero(mask)
            sel = sel[np.lexsort((p[sel], users[sel]))]
            return Interactions(users[sel], items[sel], U, A, timestamps=p[sel])

        return ImplicitSplit(train=part(is_train), test=part(is_test), valid=part(is_valid), name="synthetic",
                             keys=self._data_keys())

    def sequences(self) -> SequenceData:
        """Leave-last-out sequences: per user a length in ``[events_per_user // 2, 3 * events_per_user // 2]``
        of distinct items; the first drawn from ``softmax(choice_logits)``, each next one with probability
        ``stay`` from the cluster of the previous item (softmax of the choice logits within it), else from
        all items."""
        rng = np.random.default_rng(self._rng_seeds[1])
        U, I, e = self.n_users, self.n_items, self.events_per_user
        A = self.n_data_items
        lengths = np.clip(rng.integers(e // 2, e + e // 2 + 1, U), 3, A)
        L = int(lengths.max())
        base = self.choice_logits()
        used = np.zeros((U, I), bool)
        used[:, A:] = True                                            # held-out items: never drawn
        seq = np.empty((U, L), np.int64)
        rows = np.arange(U)
        prev_cluster = None
        for t in range(L):
            keys = np.where(used, -np.inf, base + _gumbel(rng, (U, I)))
            glob = keys.argmax(axis=1)
            if prev_cluster is None:
                pick = glob
            else:
                inside = np.where(self.item_cluster[None, :] == prev_cluster[:, None], keys, -np.inf)
                local = inside.argmax(axis=1)
                ok = np.isfinite(inside[rows, local]) & (rng.random(U) < self.stay)
                pick = np.where(ok, local, glob)
            seq[:, t] = pick
            used[rows, pick] = True
            prev_cluster = self.item_cluster[pick]
        train = [seq[u, :lengths[u] - 2].copy() for u in range(U)]
        valid = seq[rows, lengths - 2]
        test = seq[rows, lengths - 1]
        return SequenceData(train=train, valid=valid, test=test, n_items=A, name="synthetic", keys=self._data_keys())

    def ctr(self, n_examples: int = 20000, valid_frac: float = 0.1, test_frac: float = 0.2,
            hash_buckets: int = 1) -> CtrData:
        """Impressions (user uniform, item half by popularity, hour uniform in 0..23, device uniform)
        labelled by Bernoulli(sigmoid(:meth:`ctr_logit`)). Fields: ``user_id age gender country item_id
        category brand tags(multi) price(numeric) hour(numeric) device``; the schema is fitted on train.
        ``extra`` holds ``true_prob_{train,valid,test}`` (float64) and ``rows_{train,valid,test}``
        (dicts of the raw ``users items hours devices`` int64 arrays), and ``entity_features``: the columns of
        every user (``user_id age gender country``) and every item (``item_id category brand tags price``)
        for the feature stores of a serving bundle."""
        if n_examples < 3 or not (0 < valid_frac and 0 < test_frac and valid_frac + test_frac < 1):
            raise ValueError("need n_examples >= 3 and valid_frac, test_frac > 0 with a sum below 1")
        rng = np.random.default_rng(self._rng_seeds[2])
        n = n_examples
        users = rng.integers(0, self.n_users, n).astype(np.int64)
        items = self._impressions(rng, n, self.n_data_items)
        hours = rng.integers(0, 24, n).astype(np.int64)
        devices = rng.integers(0, len(DEVICES), n).astype(np.int64)
        prob = 1.0 / (1.0 + np.exp(-self.ctr_logit(users, items, hours, devices)))
        labels = (rng.random(n) < prob).astype(np.float32)
        n_test = max(1, int(round(test_frac * n)))
        n_valid = max(1, int(round(valid_frac * n)))
        parts = {"test": np.arange(n - n_test, n), "valid": np.arange(n - n_test - n_valid, n - n_test),
                 "train": np.arange(0, n - n_test - n_valid)}
        cols = {"user_id": users, "age": np.array(AGES, object)[self.age[users]],
                "gender": np.array(GENDERS, object)[self.gender[users]],
                "country": np.array(COUNTRIES, object)[self.country[users]],
                "item_id": items, "category": self.category[items], "brand": self.brand[items],
                "tags": [self.tags[i].tolist() for i in items], "price": self.price[items],
                "hour": hours.astype(np.float64), "device": np.array(DEVICES, object)[devices]}

        def take(rows):
            return {k: (v[rows] if isinstance(v, np.ndarray) else [v[r] for r in rows]) for k, v in cols.items()}

        schema = Schema.fit(take(parts["train"]), CTR_KINDS, hash_buckets=max(1, hash_buckets))
        enc = {k: schema.encode(take(r), labels[r]) for k, r in parts.items()}
        extra = {}
        for k, r in parts.items():
            extra[f"true_prob_{k}"] = prob[r]
            extra[f"rows_{k}"] = {"users": users[r], "items": items[r], "hours": hours[r], "devices": devices[r]}
        A = self.n_data_items
        all_users, all_items = np.arange(self.n_users), np.arange(A)
        extra["entity_features"] = {   # what serving looks up per user and per item; hour and device are context
            "user": {"user_id": all_users, "age": np.array(AGES, object)[self.age],
                     "gender": np.array(GENDERS, object)[self.gender],
                     "country": np.array(COUNTRIES, object)[self.country]},
            "item": {"item_id": all_items, "category": self.category[:A], "brand": self.brand[:A],
                     "tags": [t.tolist() for t in self.tags[:A]], "price": self.price[:A]}}
        return CtrData(schema=schema, train=enc["train"], valid=enc["valid"], test=enc["test"],
                       name="synthetic-ctr", extra=extra, keys=self._data_keys())


def make_synthetic(n_users: int = 1000, n_items: int = 500, n_factors: int = 8, seed: int = 0,
                   events_per_user: int = 30, **kwargs) -> SyntheticWorld:
    """A seeded :class:`SyntheticWorld` (same arguments, same world). Extra keyword arguments:
    ``n_clusters`` (20), ``n_brands`` (40), ``n_tags`` (30), ``zipf`` (1.0, popularity exponent),
    ``pop_weight`` (0.5), ``signal`` (1.5, scale of the latent affinity), ``stay`` (0.85, probability the
    next item of a sequence stays in the previous item's cluster), ``ctr_rate`` (0.3, target positive
    rate), ``ctr_interaction`` (1.0, weight of ``taste . item`` in the click logit), ``string_keys`` (False:
    the data sets' ``keys`` are None; True: ``"u-17"`` / ``"sku-0042"`` strings, the draws unchanged),
    ``held_out_items`` (0: the last items are in no data set, they arrive later)."""
    return SyntheticWorld(n_users=n_users, n_items=n_items, n_factors=n_factors, seed=seed,
                          events_per_user=events_per_user, **kwargs)
