"""Feedback metrics from the event store: what each model version served and how users answered it.

:func:`feedback_metrics` reads the store once (:meth:`~rec_engine.events.EventStore.scan`: only the columns it
needs) and gives one row per (model version, UTC day of the impression) plus a ``"total"`` row per version;
:func:`ab_summary` compares the versions' click-through rates (Wilson intervals, two-proportion z-tests);
:func:`format_table` / :func:`format_ab` print them as markdown and :func:`plot` draws them (needs matplotlib).
``rec-engine report`` (:func:`add_report_command`) does all of it from the command line.

Definitions (one *shown item* is one position of one impression):

- **impressions**: impression events (requests served) of the version that day; **items_shown**: the items
  they listed, summed.
- **clicks**: distinct (request id, item) pairs with at least one click event that names the request id of an
  impression of this row and an item that impression showed. Duplicate clicks count once; a click without
  a request id, with a request id no impression in the window has, or on an item its impression did not
  show is not attributed (counted in ``rows.unattributed``). A request id shown by several impressions
  answers to the first of them (in store order).
- **ctr** = clicks / items_shown.
- **conversions**: distinct (request id, item) pairs with an attributed conversion (attributed like clicks,
  whether or not a click was recorded); **conversion_value**: the sum of the values of every attributed
  conversion event (a repeated purchase adds its value; a conversion without a value adds 0);
  **cvr** = conversions / clicks (it can exceed 1 only when conversions arrive without their clicks).
- Feedback counts for the impression's version and day, whenever it came; with ``until``, feedback up to
  ``attribution_s`` (a day by default) after ``until`` is still read.
- **coverage** = distinct items shown / ``n_items``. ``n_items``: as given (the catalogue, e.g. a bundle's
  item count), else the number of distinct items in the events read (shown, clicked, converted or rated)
  together with the items of ``item_popularity`` — an estimate of the catalogue from what was seen.
- **novelty**: the mean over shown items of ``-log2 p(i)``, with ``p(i) = (c_i + 1) / (C + n_items)``
  (add-one smoothing), ``c_i`` the item's interactions and ``C`` their total: from ``item_popularity`` when
  given (e.g. the item counts the model was trained on), else the click, conversion and rating events of the
  window. Higher: less popular items served.

The ``"total"`` row of a version sums its days; its coverage is over the distinct items it showed on any day.
Missing versions (impressions without one) are reported as version ``None``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
from collections import deque
from collections.abc import Mapping
from itertools import chain, compress, islice, repeat
from operator import is_not
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from .events import EventStore, open_store

TOTAL = "total"
DAY_S = 86400.0

#: the columns of a metrics row, in table order
ROW_KEYS = ("version", "day", "impressions", "items_shown", "distinct_items", "clicks", "ctr", "conversions",
            "cvr", "conversion_value", "coverage", "novelty", "n_items")


class FeedbackRows(list):
    """The rows of :func:`feedback_metrics` (a list of dicts) with what the rows do not show:
    ``n_items`` (the coverage denominator), ``n_items_from`` (``"given"`` or ``"events"``) and
    ``unattributed``: feedback that no impression in the window can claim, by reason
    (``clicks_without_request``, ``clicks_unknown_request``, ``clicks_not_shown``, and the same for
    conversions)."""

    n_items: int = 0
    n_items_from: str = "events"
    unattributed: dict

    def __init__(self, rows=(), *, n_items: int = 0, n_items_from: str = "events", unattributed=None):
        super().__init__(rows)
        self.n_items, self.n_items_from = int(n_items), n_items_from
        self.unattributed = dict(unattributed or {})


def _day(day_index: int) -> str:
    return (_dt.date(1970, 1, 1) + _dt.timedelta(days=int(day_index))).isoformat()


def _bound(t, name: str) -> float | None:
    """A time bound as epoch seconds: a number, a datetime (naive = UTC), a date (its UTC midnight) or an
    ISO string of either."""
    if t is None:
        return None
    if isinstance(t, str):
        try:
            t = _dt.datetime.fromisoformat(t) if ("T" in t or " " in t or ":" in t) else _dt.date.fromisoformat(t)
        except ValueError:
            raise ValueError(f"{name} must be a date (YYYY-MM-DD), an ISO datetime or epoch seconds, got {t!r}") \
                from None
    if isinstance(t, _dt.datetime):
        return (t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)).timestamp()
    if isinstance(t, _dt.date):
        return _dt.datetime(t.year, t.month, t.day, tzinfo=_dt.timezone.utc).timestamp()
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not math.isfinite(t):
        raise ValueError(f"{name} must be a date, a datetime or finite epoch seconds, got {t!r}")
    return float(t)


def _pop_get(pop, item) -> float:
    try:
        c = pop.get(item, 0)
    except (TypeError, ValueError):                  # a key of another type than the mapping's
        return 0.0
    return float(c or 0)


def _pop_has(pop, item) -> bool:
    try:
        return item in pop
    except TypeError:
        return False


def _as_popularity(item_popularity):
    """A mapping item key -> interactions, its total and its number of items; a 1-D array is indexed by
    dense id (keys 0..n-1)."""
    if isinstance(item_popularity, Mapping):
        total = getattr(item_popularity, "total", None)
        if total is None:
            total = float(sum(item_popularity.values()))
        return item_popularity, float(total), len(item_popularity)
    a = np.asarray(item_popularity)
    if a.ndim != 1 or a.dtype.kind not in "iuf":
        raise TypeError("item_popularity must be a mapping item -> count or a 1-D numeric array indexed by item id")
    return _DenseCounts(a), float(a.sum()), len(a)


class _DenseCounts(Mapping):
    """Counts indexed by dense item id, as a mapping (keys are the ints 0..n-1)."""

    def __init__(self, counts: np.ndarray):
        self.counts = counts
        self.total = float(counts.sum())

    def __getitem__(self, k):
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 0 <= k < len(self.counts):
            raise KeyError(k)
        return self.counts[k]

    def __iter__(self):
        return iter(range(len(self.counts)))

    def __len__(self) -> int:
        return len(self.counts)


class BundleItemCounts(Mapping):
    """A bundle's training interactions per item, keyed by the user's own item keys (read-only mapping over
    the bundle's key map; no Python dict of the keys is built). ``total``: their sum."""

    def __init__(self, key_map, counts: np.ndarray):
        self.key_map, self.counts = key_map, np.asarray(counts)
        self.total = float(self.counts.sum())

    def __getitem__(self, key):
        try:
            i = self.key_map.id(key)
        except (TypeError, ValueError):
            raise KeyError(key) from None
        if i < 0:
            raise KeyError(key)
        return self.counts[i]

    def __contains__(self, key) -> bool:
        try:
            return self.key_map.id(key) >= 0
        except (TypeError, ValueError):
            return False

    def __iter__(self):
        return iter(self.key_map.key_array().tolist())

    def __len__(self) -> int:
        return len(self.counts)


def bundle_item_counts(path) -> tuple[int, BundleItemCounts]:
    """``(n_items, item popularity)`` of a bundle's retrieval stage (a retrieval bundle, or a pipeline bundle
    with one): its item count and the training interactions per item (``arrays/item_counts.npy``), keyed by
    the bundle's item keys. ValueError when the bundle has no such stage or counts."""
    from .bundle import open_bundle

    b = open_bundle(path, verify=False)
    if b.kind == "pipeline":
        stage = b.meta.get("stages", {}).get("retrieval")
        if not stage:
            raise ValueError(f"bundle {path} has no retrieval stage (its item counts give n_items and popularity)")
        b = open_bundle(b.path / stage, verify=False)
    if not b.has("arrays/item_counts.npy"):
        raise ValueError(f"bundle {b.path} ({b.kind}) stores no item_counts")
    counts = b.array("item_counts")
    n = int(b.meta.get("n_items", len(counts)))
    if len(counts) != n:
        raise ValueError(f"bundle {b.path}: item_counts has {len(counts)} entries, meta n_items is {n}")
    return n, BundleItemCounts(b.key_map("item", n), counts)


def feedback_metrics(store, *, n_items: int | None = None, item_popularity=None, since=None, until=None,
                     attribution_s: float = DAY_S) -> FeedbackRows:
    """CTR, CVR, conversion value, catalogue coverage and novelty per (model version, UTC day of the
    impression), and a ``day == "total"`` row per version (definitions: the module docstring).

    Parameters
    ----------
    store : EventStore, path or ``redis://`` URL
        Read once, in pages; a store opened here from a path is closed again.
    n_items : int, optional
        The catalogue size for coverage and smoothing (default: items seen in the events, see above).
    item_popularity : mapping item -> count, or 1-D array indexed by dense item id, optional
        Interactions per item for novelty (default: the window's click, conversion and rating events).
    since, until : epoch seconds, date, datetime or ISO string, optional
        The impressions (and popularity events) with ``since <= ts < until``; feedback to them is read up to
        ``until + attribution_s``.

    Returns
    -------
    FeedbackRows
        A list of dicts with keys :data:`ROW_KEYS`: versions in the order of their earliest impression, days
        ascending (``"YYYY-MM-DD"``), each version's ``"total"`` row last. ``ctr`` / ``cvr`` / ``novelty``
        are None where their denominator is 0.
    """
    since_s, until_s = _bound(since, "since"), _bound(until, "until")
    if since_s is not None and until_s is not None and until_s <= since_s:
        raise ValueError(f"until ({until}) must be after since ({since})")
    if n_items is not None and (isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer))
                                or n_items < 1):
        raise ValueError(f"n_items must be a positive integer, got {n_items!r}")
    pop = None if item_popularity is None else _as_popularity(item_popularity)
    own = not isinstance(store, EventStore)
    is_url = isinstance(store, str) and store.startswith(("redis://", "rediss://", "unix://"))
    if own and isinstance(store, (str, os.PathLike)) and not is_url and not os.path.exists(store):
        raise FileNotFoundError(f"no event store at {store}")   # (opening would create an empty one)
    st = open_store(store)
    try:
        return _scan(st, n_items, pop, since_s, until_s, attribution_s)
    finally:
        if own:
            st.close()


_COLUMNS = ("ts", "kind", "item", "request_id", "version", "value", "items")
_KIND = {"impression": 0, "click": 1, "conversion": 2, "rating": 3}
_CHUNK = 65_536                                        # rows turned into arrays at a time


class _Dense(dict):
    """Keys (item keys, versions) -> dense ints 0.. in order of first appearance; a dict, so 7 and "7" stay
    apart. One lookup per key: a key not seen yet gets the next int (``__missing__``)."""

    def __missing__(self, key):
        self[key] = i = len(self)
        return i

    def ids(self, keys, n: int) -> np.ndarray:
        """The ints of the ``n`` keys of the iterable ``keys``."""
        return np.fromiter(map(self.__getitem__, keys), np.int64, n)


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _unique(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a``, ascending (a sort: NumPy 2.3+'s hash-based ``np.unique`` is many times
    slower on a few million int64)."""
    s = np.sort(a)
    if len(s) > 1:
        s = s[np.concatenate(([True], s[1:] != s[:-1]))]
    return s


def _segments(sorted_ids: np.ndarray, n: int) -> np.ndarray:
    """Bounds of the runs of 0..n-1 in ``sorted_ids``: run ``g`` is ``[b[g], b[g + 1])``."""
    return np.searchsorted(sorted_ids, np.arange(n + 1))


def _scan(store: EventStore, n_items, pop, since_s, until_s, attribution_s) -> FeedbackRows:
    # One pass over the store's columns (EventStore.scan: tuples, no Event objects), a chunk of rows at a
    # time turned into arrays: item keys and versions become dense ints once (a dict lookup each), the
    # impressions' item lists are decoded with one json.loads per chunk, and everything is counted with
    # NumPy at the end. Attribution does not depend on the order of the feedback and its impression: a
    # request id answers to its first in-window impression in store order, whenever the feedback came.
    read_until = None if until_s is None else until_s + float(attribution_s)
    items_d, versions_d = _Dense(), _Dense()
    requests: dict = {}                                # request id -> index of its first in-window impression
    imp_ts, imp_v, imp_len, pos_item = [], [], [], []  # per in-window impression; per position shown
    fb_kind, fb_item, fb_imp, fb_rid, fb_win = [], [], [], [], []   # per feedback event (click, conversion, rating)
    conv_at, conv_value = [], []                       # conversions: index among the feedback, value (nan: none)
    pending: list[tuple] = []                          # (feedback index, request id) read before its impression
    n_imp = n_fb = 0
    rows = store.scan(_COLUMNS, kinds=tuple(_KIND), since=since_s, until=read_until)
    # the loop allocates millions of short-lived tuples and lists (no reference cycles) while the dicts above
    # grow to a million keys, which every full collection would walk again: the collector waits (~20%)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        while True:
            chunk = list(islice(rows, _CHUNK))
            if not chunk:
                break
            ts, kind, item, rid, version, value, items = zip(*chunk)
            del chunk
            code = np.fromiter(map(_KIND.__getitem__, kind), np.int8, len(kind))
            t = np.array(ts, dtype=np.float64)
            win = np.ones(len(t), bool) if until_s is None else t < until_s
            imp = (code == 0) & win                              # impressions after until: skipped
            n_new = int(np.count_nonzero(imp))
            if n_new:
                sel = imp.tolist()
                lists = json.loads("[" + ",".join(compress(items, sel)) + "]")
                lens = np.fromiter(map(len, lists), np.int64, n_new)
                imp_len.append(lens)
                pos_item.append(items_d.ids(chain.from_iterable(lists), int(lens.sum())))
                del lists
                imp_ts.append(t[imp])
                imp_v.append(versions_d.ids(compress(version, sel), n_new))
                # the first impression of each request id keeps it (setdefault, in store order)
                deque(map(requests.setdefault, compress(rid, sel), range(n_imp, n_imp + n_new)), maxlen=0)
                requests.pop(None, None)
                n_imp += n_new
            fb = code != 0
            n_new = int(np.count_nonzero(fb))
            if n_new:
                sel = fb.tolist()
                rids = list(compress(rid, sel))
                hit = np.fromiter(map(requests.get, rids, repeat(-1)), np.int64, n_new)
                has = np.fromiter(map(is_not, rids, repeat(None)), bool, n_new)
                for j in np.flatnonzero((hit < 0) & has).tolist():
                    pending.append((n_fb + j, rids[j]))
                kinds = code[fb]
                fb_kind.append(kinds)
                fb_item.append(items_d.ids(compress(item, sel), n_new))
                fb_imp.append(hit)
                fb_rid.append(has)
                fb_win.append(win[fb])
                conv = np.flatnonzero(kinds == 2)
                if len(conv):
                    conv_at.append(conv + n_fb)
                    conv_value.append(np.array([value[j] for j in np.flatnonzero(fb)[conv].tolist()],
                                               dtype=np.float64))          # None: nan
                n_fb += n_new
    finally:
        if gc_was:
            gc.enable()
    del rows

    n_keys = max(len(items_d), 1)
    imp_ts, imp_v, imp_len = _cat(imp_ts, np.float64), _cat(imp_v, np.int64), _cat(imp_len, np.int64)
    pos_item = _cat(pos_item, np.int64)
    fb_kind, fb_item, fb_imp = _cat(fb_kind, np.int8), _cat(fb_item, np.int64), _cat(fb_imp, np.int64)
    fb_rid, fb_win = _cat(fb_rid, bool), _cat(fb_win, bool)
    for j, r in pending:                               # feedback read before its impression
        fb_imp[j] = requests.get(r, -1)
    del requests, pending

    # groups: (version, UTC day of the impression), ordered by version code, then day
    day = (imp_ts // DAY_S).astype(np.int64)
    d0 = int(day.min()) if n_imp else 0
    span = (int(day.max()) - d0 + 1) if n_imp else 1
    gkey = imp_v * span + (day - d0)
    gkeys = _unique(gkey)
    imp_g = np.searchsorted(gkeys, gkey)
    n_g = len(gkeys)
    g_version, g_day = (gkeys // span).tolist(), (gkeys % span + d0).tolist()
    g_imps = np.bincount(imp_g, minlength=n_g)
    pos_g = np.repeat(imp_g, imp_len)
    g_shown = np.bincount(pos_g, minlength=n_g)
    # (group, item) pairs shown, with how often: sorted by group, then item
    pair = pos_g * n_keys + pos_item
    if n_g * n_keys <= 8 * len(pair) + (1 << 20):
        cnt = np.bincount(pair, minlength=n_g * n_keys)
        pair = np.flatnonzero(cnt)
        pair_n = cnt[pair]
        del cnt
    else:
        pair = np.sort(pair)
        starts = np.flatnonzero(np.concatenate(([True], pair[1:] != pair[:-1])))
        pair_n = np.diff(np.append(starts, len(pair)))
        pair = pair[starts]
    pair_g, pair_item = pair // n_keys, pair % n_keys
    g_bounds = _segments(pair_g, n_g)

    # attribution: a click / conversion counts for the first in-window impression of its request id when that
    # impression showed the item; (request, item) pairs distinct per kind
    lost: dict[str, int] = {}
    g_clicks = np.zeros(n_g, np.int64)
    g_convs = np.zeros(n_g, np.int64)
    g_value = [0.0] * n_g
    if n_fb:
        shown_pairs = np.sort(np.repeat(np.arange(n_imp, dtype=np.int64), imp_len) * n_keys + pos_item)
        known = (fb_kind != 3) & (fb_imp >= 0)
        fb_pair = fb_imp * n_keys + fb_item
        shown = np.zeros(n_fb, bool)
        if len(shown_pairs):
            want = fb_pair[known]
            at = np.minimum(np.searchsorted(shown_pairs, want), len(shown_pairs) - 1)
            shown[known] = shown_pairs[at] == want
        del shown_pairs
        for name, k in (("click", 1), ("conversion", 2)):
            of_kind = fb_kind == k
            counts = {"without_request": of_kind & ~fb_rid & fb_win,
                      "unknown_request": of_kind & fb_rid & (fb_imp < 0) & fb_win,
                      "not_shown": of_kind & known & ~shown}
            for why, mask in counts.items():
                c = int(np.count_nonzero(mask))
                if c:
                    lost[f"{name}s_{why}"] = c
            distinct = _unique(fb_pair[of_kind & shown])
            per_g = np.bincount(imp_g[distinct // n_keys], minlength=n_g)
            if k == 1:
                g_clicks = per_g
            else:
                g_convs = per_g
        if conv_at:
            at, val = np.concatenate(conv_at), np.concatenate(conv_value)
            ok = shown[at] & ~np.isnan(val)
            at, val = at[ok], val[ok]
            vg = imp_g[fb_imp[at]]
            order = np.argsort(vg, kind="stable")
            vg, val = vg[order], val[order]
            vb = _segments(vg, n_g)
            g_value = [math.fsum(val[vb[g]:vb[g + 1]].tolist()) for g in range(n_g)]

    # the catalogue size and each shown item's surprisal
    interactions = np.bincount(fb_item[fb_win], minlength=n_keys)
    total = float(np.count_nonzero(fb_win))
    shown_ids = np.flatnonzero(np.bincount(pair_item, minlength=n_keys))
    keys = list(items_d)
    if n_items is not None:
        n, n_from = int(n_items), "given"
    else:
        seen = np.zeros(n_keys, bool)
        seen[shown_ids] = True
        seen |= interactions > 0
        seen = np.flatnonzero(seen).tolist()
        n = len(seen) if pop is None else pop[2] + sum(1 for i in seen if not _pop_has(pop[0], keys[i]))
        n, n_from = max(n, 1), "events"
    surprisal = np.zeros(n_keys)
    if pop is None:
        surprisal[shown_ids] = [-math.log2((c + 1.0) / (total + n)) for c in interactions[shown_ids].tolist()]
    else:
        counts = pop[0]
        surprisal[shown_ids] = [-math.log2((_pop_get(counts, keys[i]) + 1.0) / (pop[1] + n))
                                for i in shown_ids.tolist()]
    nov = (pair_n * surprisal[pair_item]).tolist()     # count x surprisal per (group, item), summed exactly
    g_novelty = [math.fsum(nov[g_bounds[g]:g_bounds[g + 1]]) for g in range(n_g)]

    g_imps, g_shown, g_clicks, g_convs = g_imps.tolist(), g_shown.tolist(), g_clicks.tolist(), g_convs.tolist()
    g_bounds = g_bounds.tolist()

    def row(version, day_label, gs: range) -> dict:
        lo, hi = g_bounds[gs.start], g_bounds[gs.stop]
        distinct = hi - lo if len(gs) == 1 else int(np.count_nonzero(np.bincount(pair_item[lo:hi])))
        impressions = sum(g_imps[g] for g in gs)
        shown_n = sum(g_shown[g] for g in gs)
        clicks = sum(g_clicks[g] for g in gs)
        conversions = sum(g_convs[g] for g in gs)
        return {"version": version, "day": day_label, "impressions": impressions, "items_shown": shown_n,
                "distinct_items": distinct, "clicks": clicks, "ctr": clicks / shown_n if shown_n else None,
                "conversions": conversions, "cvr": conversions / clicks if clicks else None,
                "conversion_value": sum(g_value[g] for g in gs), "coverage": distinct / n,
                "novelty": math.fsum(g_novelty[g] for g in gs) / shown_n if shown_n else None, "n_items": n}

    # versions in the order of their earliest impression (ties: the first served in store order)
    first_ts = np.full(len(versions_d), np.inf)
    np.minimum.at(first_ts, imp_v, imp_ts)
    first_ts = first_ts.tolist()
    version_keys = list(versions_d)
    out = []
    for v in sorted(range(len(version_keys)), key=first_ts.__getitem__):
        gs = [g for g in range(n_g) if g_version[g] == v]           # contiguous, days ascending
        out += [row(version_keys[v], _day(g_day[g]), range(g, g + 1)) for g in gs]
        out.append(row(version_keys[v], TOTAL, range(gs[0], gs[-1] + 1)))
    return FeedbackRows(out, n_items=n, n_items_from=n_from, unattributed=dict(sorted(lost.items())))


# ---------------------------------------------------------------------------------------------- A/B view
def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / trials`` ((nan, nan) for 0 trials)."""
    if trials <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # exact at the ends (x = 0 gives 0, x = n gives 1), where rounding would leave the bound a hair off
    return (0.0 if successes <= 0 else min(p, centre - half)), (1.0 if successes >= trials else max(p, centre + half))


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """``(z, two-sided p-value)`` of the pooled two-proportion z-test of ``x2/n2`` against ``x1/n1``;
    (nan, nan) when a side has no trials, (0, 1) when the pooled rate is 0 or 1 (nothing differs)."""
    if n1 <= 0 or n2 <= 0:
        return math.nan, math.nan
    p = (x1 + x2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x2 / n2 - x1 / n1) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def ab_summary(rows_or_store, *, control=None, confidence: float = 0.95, **metrics_kw) -> list[dict]:
    """Per version: items shown, clicks, CTR with its Wilson interval (``ctr_low``, ``ctr_high``), and against
    the control version (``control``, default the first version of the rows: the one served first):
    ``ctr_diff`` (this CTR minus the
    control's), ``z`` and ``p_value`` of the two-proportion z-test (None for the control itself).

    ``rows_or_store``: rows of :func:`feedback_metrics` (their ``"total"`` rows are used, or the days summed
    when there are none), or a store / path passed to it with ``metrics_kw``.

    The test treats every shown item as an independent trial; clicks of one request or user are correlated,
    so the interval and p-value are optimistic when a few users make many of the clicks."""
    rows = rows_or_store if isinstance(rows_or_store, list) else feedback_metrics(rows_or_store, **metrics_kw)
    per: dict[Any, list[int]] = {}
    has_total = {r["version"] for r in rows if r["day"] == TOTAL}
    for r in rows:
        if (r["day"] == TOTAL) == (r["version"] in has_total):
            acc = per.setdefault(r["version"], [0, 0])
            acc[0] += r["items_shown"]
            acc[1] += r["clicks"]
    if not per:
        return []
    if control is None:
        control = next(iter(per))
    elif control not in per:
        raise ValueError(f"control version {control!r} is not among the versions {list(per)}")
    n0, x0 = per[control]
    out = []
    for v, (n, x) in per.items():
        lo, hi = wilson_interval(x, n, confidence)
        ctr = x / n if n else None
        rec = {"version": v, "control": v == control, "items_shown": n, "clicks": x, "ctr": ctr,
               "ctr_low": None if n == 0 else lo, "ctr_high": None if n == 0 else hi,
               "ctr_diff": None, "z": None, "p_value": None}
        if v != control and n and n0:
            z, p = two_proportion_test(x0, n0, x, n)
            rec.update(ctr_diff=ctr - x0 / n0, z=z, p_value=p)
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------- output
def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(rows: Sequence[dict]) -> str:
    """The rows of :func:`feedback_metrics` as a markdown table."""
    head = ["version", "day", "impressions", "items shown", "clicks", "CTR", "conversions", "CVR", "value",
            "distinct items", "coverage", "novelty (bits)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if j < 2 else "---:" for j in range(len(head))) + "|"]
    for r in rows:
        cells = ["-" if r["version"] is None else str(r["version"]), f"**{r['day']}**" if r["day"] == TOTAL
                 else str(r["day"]), str(r["impressions"]), str(r["items_shown"]), str(r["clicks"]),
                 _fmt(r["ctr"], ".4f"), str(r["conversions"]), _fmt(r["cvr"], ".4f"),
                 _fmt(r["conversion_value"], ".2f"), str(r["distinct_items"]), _fmt(r["coverage"], ".4f"),
                 _fmt(r["novelty"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ab(summary: Sequence[dict], confidence: float = 0.95) -> str:
    """The result of :func:`ab_summary` as a markdown table."""
    pct = f"{confidence * 100:g}%"
    head = ["version", "items shown", "clicks", "CTR", f"{pct} interval", "diff vs control", "z", "p-value"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in summary:
        interval = "-" if s["ctr_low"] is None else f"[{s['ctr_low']:.4f}, {s['ctr_high']:.4f}]"
        name = ("-" if s["version"] is None else str(s["version"])) + (" (control)" if s["control"] else "")
        cells = [name, str(s["items_shown"]), str(s["clicks"]), _fmt(s["ctr"], ".4f"), interval,
                 _fmt(s["ctr_diff"], "+.4f"), _fmt(s["z"], ".2f"), _fmt(s["p_value"], ".3g")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path) -> str:
    """Draw CTR, coverage and novelty per day, one line per version, into the PNG ``path`` (three panels
    sharing the date axis). Needs matplotlib (the ``bench`` extra); uses its Agg canvas directly, so no
    pyplot state or display is touched. Returns the path."""
    try:
        from matplotlib import dates as mdates
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plotting the report needs matplotlib: pip install matplotlib ({e})") from None
    daily = [r for r in rows if r["day"] != TOTAL]
    fig = Figure(figsize=(9, 8), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    panels = (("ctr", "CTR (clicks / items shown)"), ("coverage", "catalogue coverage"),
              ("novelty", "novelty (mean -log2 p, bits)"))
    versions = list(dict.fromkeys(r["version"] for r in daily))
    for ax, (key, label) in zip(axes, panels):
        for v in versions:
            pts = [(_dt.date.fromisoformat(r["day"]), r[key]) for r in daily
                   if r["version"] == v and r[key] is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o", label="(none)" if v is None else str(v))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("feedback per model version and day (UTC)")
    if versions:
        axes[0].legend(title="version", fontsize="small")
    days = sorted({r["day"] for r in daily})
    if days:                                           # one tick a day (up to ~10 ticks), dates only
        span = (_dt.date.fromisoformat(days[-1]) - _dt.date.fromisoformat(days[0])).days + 1
        axes[-1].xaxis.set_major_locator(mdates.DayLocator(interval=max(1, math.ceil(span / 10))))
        axes[-1].xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    axes[-1].set_xlabel("day of the impression (UTC)")
    fig.autofmt_xdate()
    fig.savefig(os.fspath(path), format="png", dpi=100)
    return os.fspath(path)


# ---------------------------------------------------------------------------------------------- command line
def add_report_command(sub) -> argparse.ArgumentParser:
    """Register ``report`` on an argparse subparsers object (``parser.add_subparsers()``); its handler is
    :func:`run_report` (``args.handler``)."""
    p = sub.add_parser("report", help="CTR, CVR, coverage and novelty per model version and day, and the A/B view",
                       description="Feedback metrics from an event store: per model version and UTC day of the "
                                   "impression: CTR (attributed clicks / items shown), CVR (conversions / clicks), "
                                   "conversion value, catalogue coverage and novelty; then CTR per version with "
                                   "a confidence interval and a z-test against the control version.")
    p.add_argument("--events", required=True, help="event store: a SQLite file (or .jsonl log) path or redis:// URL")
    p.add_argument("--bundle", default=None,
                   help="retrieval or pipeline bundle: its item count is the catalogue for coverage, its training "
                        "item counts the popularity for novelty (default: both from the events)")
    p.add_argument("--since", default=None, help="first day (YYYY-MM-DD, UTC) or ISO datetime of impressions")
    p.add_argument("--until", default=None,
                   help="last day (YYYY-MM-DD, UTC, included) or ISO datetime (excluded) of impressions")
    p.add_argument("--control", default=None, help="the A/B control version (default: the first version served)")
    p.add_argument("--png", default=None, help="write a plot of CTR, coverage and novelty per day here")
    p.add_argument("--json", default=None, help="write the rows and the A/B summary as JSON here")
    p.set_defaults(handler=run_report)
    return p


def _until_arg(s: str | None):
    """--until: a plain date includes that day."""
    if s is None:
        return None
    try:
        return _dt.date.fromisoformat(s) + _dt.timedelta(days=1)
    except ValueError:
        return s


def run_report(args) -> int:
    """The ``report`` command: print the per-version-per-day table and the A/B summary; write the PNG /
    JSON when asked."""
    n_items = pop = None
    if args.bundle:
        n_items, pop = bundle_item_counts(args.bundle)
    rows = feedback_metrics(args.events, n_items=n_items, item_popularity=pop, since=args.since,
                            until=_until_arg(args.until))
    if not rows:
        print("no impressions in the event store" + (" in that window" if args.since or args.until else ""))
        return 0
    summary = ab_summary(rows, control=args.control)
    print(format_table(rows))
    src = f"the bundle {args.bundle}" if rows.n_items_from == "given" else \
        "the distinct items in the events; --bundle gives the catalogue"
    print(f"\ncoverage over {rows.n_items} items ({src}); novelty from "
          + ("the bundle's training item counts" if pop is not None else "the events' interactions") + ".")
    lost = {k: v for k, v in rows.unattributed.items() if v}
    if lost:
        print("not attributed to an impression: " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in lost.items()))
    print("\nA/B: CTR per version (items shown as trials; clicks of one user are correlated, so intervals are "
          "optimistic)\n")
    print(format_ab(summary))
    if args.png:
        print(f"\nwrote {plot(rows, args.png)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": list(rows), "ab": summary, "n_items": rows.n_items, "n_items_from": rows.n_items_from,
                       "unattributed": rows.unattributed}, f, indent=1)
        print(f"wrote {args.json}")
    return 0
