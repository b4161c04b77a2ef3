"""Per-request re-ranking for diversity and the long tail, and Thompson-sampling exploration (NumPy only).

After ranking, a request holds ``n`` candidates with scores (any model's scale). Two re-rankings, both
deterministic, apply to them (:func:`rerank` applies both, in this order):

- :func:`debias` (popularity debiasing): ``rel - strength * pop``, where ``rel`` is the scores and ``pop`` the
  candidates' ``log(1 + exposure)`` (impressions or interactions per item), both min-max normalized to
  [0, 1] over the candidates. ``strength`` 0 keeps the order, 1 weighs popularity as much as relevance.
- :func:`mmr` (maximal marginal relevance, Carbonell & Goldstein 1998): greedy picks of
  ``argmax_i (1 - diversity) * rel_i - diversity * max_{j picked} cos(v_i, v_j)`` over the candidates' vectors
  (``rel`` again min-max normalized, so ``diversity`` means the same for every model's score scale).
  ``diversity`` 0 is the plain top-k by score; 1 ignores relevance after the first pick (the best item) and
  takes each time the candidate least similar to those already picked.

Exploration (:class:`ThompsonExplorer`) holds per-item impression and click counters and, per request, fills a
share of the ``k`` slots with items shown fewer than ``max_impressions`` times, chosen by Thompson sampling
from their Beta posteriors of the click rate; :meth:`ThompsonExplorer.blend` places them among the ranked
items and says which slots are exploration (so that the caller can log them).

Every function validates its input: TypeError for a wrong type (a non-numeric array, a float ``k``, a
non-Generator ``rng``), ValueError for wrong shapes or values (``diversity`` / ``debias`` / ``strength`` /
``share`` outside [0, 1], ``k < 0``, non-finite scores, negative counts), IndexError for item ids outside the
explorer's catalogue. Inputs are never modified.
"""
from __future__ import annotations

import math
import numbers
import threading

import numpy as np

__all__ = ["mmr", "debias", "rerank", "ThompsonExplorer"]


# ------------------------------------------------------------------------------------------ validation
def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return int(k)


def _check_unit(value, name: str) -> float:
    """A real number in [0, 1] (TypeError for a non-number, ValueError outside the range or NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(value).__name__}")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _real_array(x, name: str, ndim: int) -> np.ndarray:
    """``x`` as a float64 array of ``ndim`` dimensions (TypeError when not real numbers, ValueError for the
    wrong number of dimensions or non-finite values)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iuf" or a.dtype == np.bool_:
        raise TypeError(f"{name} must be an array of real numbers, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    a = a.astype(np.float64, copy=False)
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite (NaN or inf found)")
    return a


def _float_matrix(x, name: str) -> np.ndarray:
    """``x`` as a 2-D float32 or float64 array, converted only when it is another real dtype (TypeError when
    not real numbers, ValueError when not 2-D); finiteness is checked by the caller."""
    a = np.asarray(x)
    if a.dtype.kind not in "iuf" or a.dtype == np.bool_:
        raise TypeError(f"{name} must be an array of real numbers, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return a


def _id_array(x, name: str) -> np.ndarray:
    """``x`` as a 1-D int64 array (a scalar id becomes one id; TypeError for non-integers)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        if a.size == 0 and a.dtype.kind == "f":   # an empty list is float64 to NumPy
            a = a.astype(np.int64)
        else:
            raise TypeError(f"{name} must be integer ids, got dtype {a.dtype}")
    if a.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a.reshape(-1).astype(np.int64, copy=False)


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
                        f"{type(rng).__name__}")
    return rng


def _minmax(x: np.ndarray) -> np.ndarray:
    """``x`` min-max normalized to [0, 1] (float64); all ones when every value is the same."""
    if x.size == 0:
        return np.zeros(0)
    lo, hi = float(x.min()), float(x.max())
    if hi > lo:
        return (x - lo) / (hi - lo)
    return np.ones(x.shape)


def _top_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first, ties to the lower index (stable)."""
    return np.argsort(-scores, kind="stable")[:k].astype(np.int64)


# ------------------------------------------------------------------------------------------ re-ranking
def mmr(scores, vectors, k: int, diversity: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximal marginal relevance: ``k`` candidates, each picked greedily to maximize
    ``(1 - diversity) * rel_i - diversity * max_{j picked} cos(v_i, v_j)``.

    ``rel`` is ``scores`` min-max normalized to [0, 1] over the candidates (all ones when they are all equal);
    the similarity term of the first pick is 0 (nothing picked yet), so the first pick is always the best
    score; later, a candidate pointing away from every pick (negative cosines) gains. Rows of ``vectors`` are
    L2-normalized here (a copy, in their dtype: float32 stays float32); a zero row has cosine 0 with every row
    (neither similar nor opposed). Ties go to the higher score, then to the lower index; ``diversity=0``
    returns exactly the top-k by score (stable: lower index first among equal scores).

    Cost: one matrix-vector product with the ``[n, d]`` unit rows per pick and a running max-similarity array,
    O(k n d) in all (500 candidates, k=20, float32, one core of the development machine: about 0.2 ms at
    d=64, 0.4 ms at d=384).

    Parameters
    ----------
    scores : real array ``[n]``  the candidates' scores, finite, any scale
    vectors : real array ``[n, d]``  the candidates' vectors (content or item embeddings)
    k : int >= 0  how many to pick (``min(k, n)`` are returned)
    diversity : float in [0, 1]

    Returns
    -------
    order : int64 ``[min(k, n)]``  indices into the candidates, in pick order
    adjusted : float64 ``[min(k, n)]``  each pick's marginal relevance when it was picked (non-increasing at
        ``diversity=0``, where it is ``rel``)
    """
    s = _real_array(scores, "scores", 1)
    v = _float_matrix(vectors, "vectors")
    k = _check_k(k)
    lam = _check_unit(diversity, "diversity")
    n = s.shape[0]
    if v.shape[0] != n:
        raise ValueError(f"vectors must have one row per score ({n}), got shape {v.shape}")
    return _mmr(s, v, k, lam)


def _mmr(s: np.ndarray, v: np.ndarray, k: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mmr` on checked input (``v``: float32 / float64, as :func:`_float_matrix` gives it)."""
    n = s.shape[0]
    m = min(k, n)
    rel = _minmax(s)
    if lam == 0.0 or m == 0:
        order = _top_order(s, m)
        return order, rel[order]
    norms = np.sqrt(np.einsum("ij,ij->i", v, v).astype(np.float64))
    if not np.isfinite(norms).all():
        if not np.isfinite(v).all():
            raise ValueError("vectors must be finite (NaN or inf found)")
        norms = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64))   # float32 squares overflowed
        if not np.isfinite(norms).all():
            raise ValueError("vectors are too large: their norms overflow")
    # unit rows (a copy); a zero row stays zero (divided by 1), so its cosine with every row is 0
    u = v / np.where(norms > 0, norms, 1.0).astype(v.dtype)[:, None]
    # ties go to the higher score, then the lower index: argmax (first of equals) over the objective in
    # score order (``perm``)
    perm = np.argsort(-s, kind="stable")
    gain = (1.0 - lam) * rel                               # the relevance part of the objective
    closest = np.full(n, -np.inf)                          # max cosine to the picked ones
    obj = gain.copy()
    picked = np.empty(m, np.int64)
    values = np.empty(m)
    for t in range(m):
        j = int(perm[np.argmax(obj[perm])])
        picked[t] = j
        values[t] = obj[j]
        if t + 1 == m:
            break
        gain[j] = -np.inf                                  # picked: never again
        np.maximum(closest, u @ u[j], out=closest)
        np.multiply(closest, -lam, out=obj)
        obj += gain
    return picked, values


def debias(scores, exposure, strength: float) -> np.ndarray:
    """Popularity-debiased relevance of the candidates:
    ``minmax(scores) - strength * minmax(log(1 + exposure))``, float64 ``[n]``.

    ``minmax`` normalizes to [0, 1] over the candidates (all ones when every value is equal, so an equally
    exposed slate is only shifted). The result is increasing in the score for a fixed exposure and
    non-increasing in the exposure for a fixed score; ``strength=0`` gives ``minmax(scores)`` (same order as
    the scores), ``strength=1`` weighs the most exposed candidate's popularity as much as the whole score range.

    Parameters
    ----------
    scores : real array ``[n]``, finite
    exposure : real array ``[n]``, >= 0  each candidate's impression or interaction count
    strength : float in [0, 1]
    """
    s = _real_array(scores, "scores", 1)
    e = _real_array(exposure, "exposure", 1)
    w = _check_unit(strength, "strength")
    if e.shape != s.shape:
        raise ValueError(f"exposure must have one value per score ({s.shape[0]}), got shape {e.shape}")
    if e.size and e.min() < 0:
        raise ValueError("exposure must be >= 0")
    rel = _minmax(s)
    if w == 0.0:
        return rel
    return rel - w * _minmax(np.log1p(e))


_debias = debias


def rerank(scores, k: int, *, vectors=None, exposure=None, diversity: float = 0.0,
           debias: float = 0.0) -> np.ndarray:
    """The re-ranked first ``k`` candidates: :func:`debias` with strength ``debias`` (needs ``exposure``),
    then :func:`mmr` with ``diversity`` (needs ``vectors``) on the debiased relevance (re-normalized to
    [0, 1] inside :func:`mmr`). With both at 0 this is the top-k by score (ties: lower index first).

    Parameters
    ----------
    scores : real array ``[n]``  the candidates' scores from ranking
    k : int >= 0
    vectors : real array ``[n, d]``, optional  required when ``diversity > 0``
    exposure : real array ``[n]`` (>= 0), optional  required when ``debias > 0``
    diversity, debias : float in [0, 1]

    Returns
    -------
    int64 ``[min(k, n)]``: indices into the candidates, best first.
    """
    s = _real_array(scores, "scores", 1)
    k = _check_k(k)
    lam = _check_unit(diversity, "diversity")
    w = _check_unit(debias, "debias")
    n = s.shape[0]
    if vectors is not None:
        v = _float_matrix(vectors, "vectors")
        if v.shape[0] != n:
            raise ValueError(f"vectors must have one row per score ({n}), got shape {v.shape}")
    elif lam > 0:
        raise ValueError("diversity > 0 needs the candidates' vectors")
    if exposure is not None:
        e = _real_array(exposure, "exposure", 1)
        if e.shape != s.shape:
            raise ValueError(f"exposure must have one value per score ({n}), got shape {e.shape}")
    elif w > 0:
        raise ValueError("debias > 0 needs the candidates' exposure")
    rel = _debias(s, e, w) if w > 0 else s
    if lam > 0:
        return _mmr(rel, v, k, lam)[0]
    return _top_order(rel, min(k, n))


# ------------------------------------------------------------------------------------------ exploration
class ThompsonExplorer:
    """Per-item impression and click counters, and Thompson-sampling exploration over little-shown items.

    An item is *eligible* while it has fewer than ``max_impressions`` impressions. Per request,
    :meth:`choose` draws ``theta_i ~ Beta(a0 + clicks_i, b0 + max(impressions_i - clicks_i, 0))`` for the
    eligible items (not excluded, within the candidates) and returns those with the largest draws: items
    with a good click rate so far are shown more, items with no data are drawn from the prior. The priors
    ``a0``, ``b0`` default to 1 (uniform); :meth:`fit_prior` sets them from the global click rate.

    Thread safety: :meth:`grow`, :meth:`update` and the reads of :meth:`eligible` / :meth:`choose` hold one
    lock; sampling happens outside it, on a snapshot of the counts. A ``numpy.random.Generator`` shared by
    threads serializes on its own lock.

    Parameters
    ----------
    n_items : int >= 0  the catalogue size (:meth:`grow` extends it)
    a0, b0 : float > 0  the Beta prior of every item's click rate
    max_impressions : int >= 1  items with fewer impressions are eligible for exploration (default 100)
    """

    def __init__(self, n_items: int = 0, *, a0: float = 1.0, b0: float = 1.0, max_impressions: int = 100):
        n = self._check_count(n_items, "n_items")
        self.a0, self.b0 = self._check_prior(a0, "a0"), self._check_prior(b0, "b0")
        self.max_impressions = self._check_max(max_impressions)
        self._lock = threading.Lock()
        self._n = n
        self._imp = np.zeros(max(n, 16), np.int64)
        self._clk = np.zeros(max(n, 16), np.int64)

    # -------------------------------------------------------------------------------------- construction
    @classmethod
    def from_counts(cls, impressions, clicks, **kwargs) -> "ThompsonExplorer":
        """An explorer over ``len(impressions)`` items with these per-item counts (integer arrays ``[n]``,
        >= 0); ``kwargs`` as the constructor's."""
        imp = _id_array(impressions, "impressions")
        clk = _id_array(clicks, "clicks")
        if imp.shape != clk.shape:
            raise ValueError(f"impressions and clicks must have the same shape, got {imp.shape} and {clk.shape}")
        ex = cls(imp.shape[0], **kwargs)
        ex.update(np.arange(imp.shape[0]), imp, clk)
        return ex

    @classmethod
    def build(cls, item_ids, impressions, clicks, n_items: int, **kwargs) -> "ThompsonExplorer":
        """An explorer over ``n_items`` items filled from ``(item_ids, impressions, clicks)`` rows (per event
        or per item; repeated ids add up), as the event store's impression and click counts give them.
        ``impressions`` / ``clicks`` may be scalars (e.g. 1 per impression event). ``kwargs`` as the
        constructor's."""
        ex = cls(n_items, **kwargs)
        ex.update(item_ids, impressions, clicks)
        return ex

    def fit_prior(self, strength: float = 10.0) -> "ThompsonExplorer":
        """Set ``a0 = strength * ctr``, ``b0 = strength * (1 - ctr)`` from the global click rate
        ``ctr = total clicks / total impressions`` (clipped to [0.001, 0.999]); a prior worth ``strength``
        impressions. Leaves the prior as it is when there are no impressions yet. Returns self."""
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not strength > 0 \
                or not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number > 0, got {strength!r}")
        with self._lock:
            imp, clk = int(self._imp[:self._n].sum()), int(self._clk[:self._n].sum())
            if imp > 0:
                ctr = min(max(clk / imp, 1e-3), 1 - 1e-3)
                self.a0, self.b0 = float(strength) * ctr, float(strength) * (1 - ctr)
        return self

    # -------------------------------------------------------------------------------------- state
    @property
    def n_items(self) -> int:
        return self._n

    @property
    def impressions(self) -> np.ndarray:
        """A copy of the per-item impression counts, int64 ``[n_items]``."""
        with self._lock:
            return self._imp[:self._n].copy()

    @property
    def clicks(self) -> np.ndarray:
        """A copy of the per-item click counts, int64 ``[n_items]``."""
        with self._lock:
            return self._clk[:self._n].copy()

    def impressions_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Impression counts (int64) of ``item_ids`` (ids at or past ``n_items`` count 0), without copying the
        whole counter."""
        ids = np.asarray(item_ids, np.int64)
        with self._lock:
            ok = (ids >= 0) & (ids < self._n)
            return np.where(ok, self._imp[np.where(ok, ids, 0)], 0)

    def grow(self, n_items: int) -> None:
        """Extend the catalogue to ``n_items`` (new items start at zero counts); a smaller or equal size
        is a no-op (items are never dropped). Storage grows geometrically."""
        n = self._check_count(n_items, "n_items")
        with self._lock:
            if n <= self._n:
                return
            if n > self._imp.shape[0]:
                cap = max(n, 2 * self._imp.shape[0])
                imp, clk = np.zeros(cap, np.int64), np.zeros(cap, np.int64)
                imp[:self._n], clk[:self._n] = self._imp[:self._n], self._clk[:self._n]
                self._imp, self._clk = imp, clk
            self._n = n

    def update(self, item_ids, impressions=1, clicks=0) -> None:
        """Add ``impressions`` and ``clicks`` (integers >= 0, per id or one scalar for all) to the items
        ``item_ids`` (repeated ids add up). IndexError for an id outside ``[0, n_items)`` (call :meth:`grow`
        first); nothing is added when any input is wrong."""
        ids = _id_array(item_ids, "item_ids")
        imp = self._increments(impressions, ids.shape, "impressions")
        clk = self._increments(clicks, ids.shape, "clicks")
        if ids.size == 0:
            return
        with self._lock:
            n = self._n
            if ids.min() < 0 or ids.max() >= n:
                bad = int(ids[(ids < 0) | (ids >= n)][0])
                raise IndexError(f"item id {bad} is outside the explorer's {n} items (grow it first)")
            np.add.at(self._imp, ids, imp)
            np.add.at(self._clk, ids, clk)

    def eligible(self, max_impressions: int | None = None) -> np.ndarray:
        """Ids (int64, ascending) of the items with fewer than ``max_impressions`` impressions (default: the
        explorer's ``max_impressions``)."""
        cap = self.max_impressions if max_impressions is None else self._check_max(max_impressions)
        with self._lock:
            return np.flatnonzero(self._imp[:self._n] < cap).astype(np.int64)

    def choose(self, k: int, share: float, rng, exclude=None, candidates=None, *,
               max_impressions: int | None = None) -> np.ndarray:
        """Exploration items for a request of ``k`` slots, best Thompson draw first (int64 ids).

        The number of slots is ``floor(k * share)``, plus one more with probability ``frac(k * share)`` (so
        its mean is ``k * share``; never more than ``k``; 0 when ``share`` is 0), and at most the number of
        items in the pool. The pool: the eligible items (fewer than ``max_impressions`` impressions), within
        ``candidates`` when given (ids; others and out-of-range ids are ignored), not in ``exclude`` (ids; pass
        the user's seen items and the ranked ones). Each pooled item draws
        ``theta ~ Beta(a0 + clicks, b0 + max(impressions - clicks, 0))``; the largest draws are returned.
        Cost: one Beta draw per pooled item.
        """
        k = _check_k(k)
        share = _check_unit(share, "share")
        rng = _check_rng(rng)
        cap = self.max_impressions if max_impressions is None else self._check_max(max_impressions)
        ex = None if exclude is None else _id_array(exclude, "exclude")
        cand = None if candidates is None else _id_array(candidates, "candidates")
        want = k * share
        slots = int(math.floor(want))
        frac = want - slots
        if frac > 0 and rng.random() < frac:
            slots += 1
        slots = min(slots, k)
        if slots == 0:
            return np.zeros(0, np.int64)
        with self._lock:
            n = self._n
            if cand is None:
                pool = np.flatnonzero(self._imp[:n] < cap)
            else:
                cand = np.unique(cand[(cand >= 0) & (cand < n)])
                pool = cand[self._imp[cand] < cap]
            imp, clk = self._imp[pool], self._clk[pool]
        if ex is not None and ex.size and pool.size:
            keep = ~np.isin(pool, ex)
            pool, imp, clk = pool[keep], imp[keep], clk[keep]
        if pool.size == 0:
            return np.zeros(0, np.int64)
        theta = rng.beta(self.a0 + clk, self.b0 + np.maximum(imp - clk, 0))
        m = min(slots, pool.size)
        top = np.argpartition(-theta, m - 1)[:m] if m < pool.size else np.arange(pool.size)
        top = top[np.argsort(-theta[top], kind="stable")]
        return pool[top].astype(np.int64)

    @staticmethod
    def blend(ranked_ids, explore_ids, k: int, rng, *, placement: str = "random") -> tuple[np.ndarray, np.ndarray]:
        """The final ``k`` ids: the exploration items placed among the ranked ones, without duplicates.

        Exploration ids that repeat, or that are among the first ``k`` ranked ids anyway (they are shown
        without exploring), are dropped; at most ``k`` remain. Their slots: ``placement="random"`` draws
        positions uniformly among the answer's slots (without replacement; exploration items, best draw first,
        fill them in increasing position), ``"even"`` spreads them evenly (slot ``floor((i + 1) * L / (m + 1))``
        for the i-th of ``m`` in an answer of ``L``: roughly every ``1/share``-th position, never the first).
        The ranked ids (-1 padding dropped) fill the other slots in their order, skipping the exploration ids.
        The answer has ``min(k, len(explore) + len(ranked without them))`` ids.

        Returns
        -------
        ids : int64 ``[L]``
        is_explore : bool ``[L]``  True at the exploration slots
        """
        ranked = _id_array(ranked_ids, "ranked_ids")
        ranked = ranked[ranked >= 0]                                         # -1: top-k padding
        explore = _id_array(explore_ids, "explore_ids")
        k = _check_k(k)
        rng = _check_rng(rng)
        if placement not in ("random", "even"):
            raise ValueError(f"placement must be 'random' or 'even', got {placement!r}")
        _, first = np.unique(explore, return_index=True)
        explore = explore[np.sort(first)]                                   # distinct, in their order
        explore = explore[~np.isin(explore, ranked[:k])][:k]
        rest = ranked[~np.isin(ranked, explore)]
        _, first = np.unique(rest, return_index=True)
        rest = rest[np.sort(first)]                                         # the ranked ids, distinct
        m = explore.size
        total = min(k, m + rest.size)
        ids = np.empty(total, np.int64)
        mask = np.zeros(total, bool)
        if m:
            if placement == "random":
                pos = np.sort(rng.choice(total, m, replace=False))
            else:
                pos = (np.arange(1, m + 1) * total) // (m + 1)               # distinct; 0..m-1 when m == total
            mask[pos] = True
            ids[pos] = explore
        ids[~mask] = rest[:total - m]
        return ids, mask

    # -------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _check_count(n, name: str) -> int:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
        return int(n)

    @staticmethod
    def _check_max(n) -> int:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"max_impressions must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"max_impressions must be >= 1, got {n}")
        return int(n)

    @staticmethod
    def _check_prior(x, name: str) -> float:
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise TypeError(f"{name} must be a real number > 0, got {type(x).__name__}")
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
        return float(x)

    @staticmethod
    def _increments(x, shape, name: str) -> np.ndarray:
        """Per-id increments as int64 ``shape`` (a scalar broadcast), >= 0."""
        a = np.asarray(x)
        if a.dtype.kind not in "iu" or a.dtype == np.bool_:
            raise TypeError(f"{name} must be integer counts, got dtype {a.dtype}")
        if a.ndim == 0:
            a = np.broadcast_to(a, shape)
        elif a.shape != shape:
            raise ValueError(f"{name} must be a scalar or have one value per id {shape}, got shape {a.shape}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name} must be >= 0")
        return a.astype(np.int64)

    def __repr__(self) -> str:
        return (f"ThompsonExplorer(n_items={self._n}, a0={self.a0:g}, b0={self.b0:g}, "
                f"max_impressions={self.max_impressions})")
