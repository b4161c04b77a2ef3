"""Exact top-k retrieval by inner product or cosine, with exclusion and candidate subsets."""
from __future__ import annotations

import threading
from typing import NamedTuple, Sequence

import numpy as np

from . import _core
from ._convert import as_count, as_float32, as_ids, threads_arg

_METRICS = ("ip", "cosine")
_PANEL = 64     # items per panel of a reduced-precision index (kPanel in cpp/src/kernels/topk_gemm.hpp)
_MAX_HEAVY = 1024   # items an exact ItemIndex re-scores for every query (see ItemIndex._set_exact)


class TopK(NamedTuple):
    """Result of :func:`topk`: ``ids`` (int64) and ``scores`` (float32), best first.

    Both are 1-D ``(width,)`` for one query and 2-D ``(B, width)`` for a batch, with
    ``width = min(k, n_items)``. Slots beyond the eligible items hold id -1 and score -inf."""

    ids: np.ndarray
    scores: np.ndarray


class IdLists:
    """Per-query lists of item ids in CSR form: query ``q`` owns ``ids[indptr[q]:indptr[q + 1]]``.

    Use it for ``exclude`` and ``candidates`` of a batch; :meth:`from_lists` builds one from a list of
    arrays."""

    __slots__ = ("indptr", "ids")

    def __init__(self, indptr, ids):
        self.indptr = as_ids(indptr, "indptr").astype(np.int64, copy=False)
        self.ids = as_ids(ids, "ids").astype(np.int64, copy=False)
        if self.indptr.shape[0] < 1:
            raise ValueError("indptr must hold n_queries + 1 entries")
        if self.indptr[0] != 0 or self.indptr[-1] != self.ids.shape[0]:
            raise ValueError(f"indptr must start at 0 and end at len(ids) = {self.ids.shape[0]}, got "
                             f"{int(self.indptr[0])} .. {int(self.indptr[-1])}")
        bad = np.flatnonzero(np.diff(self.indptr) < 0)
        if bad.size:
            raise ValueError(f"indptr must be non-decreasing (decreases at position {int(bad[0]) + 1})")

    @classmethod
    def from_lists(cls, lists: Sequence) -> "IdLists":
        arrays = [as_ids(x, f"list {q}") for q, x in enumerate(lists)]
        indptr = np.zeros(len(arrays) + 1, dtype=np.int64)
        if arrays:
            np.cumsum([a.shape[0] for a in arrays], out=indptr[1:])
        ids = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
        return cls(indptr, ids)

    def __len__(self) -> int:
        return int(self.indptr.shape[0] - 1)

    def __getitem__(self, q: int) -> np.ndarray:
        return self.ids[self.indptr[q]:self.indptr[q + 1]]

    def __repr__(self) -> str:
        return f"IdLists(n_queries={len(self)}, n_ids={self.ids.shape[0]})"


def _lists(value, n_queries: int, single: bool, name: str):
    if value is None:
        return None, None
    if isinstance(value, IdLists):
        lists = value
    elif single:
        lists = IdLists.from_lists([value])
    else:
        if isinstance(value, np.ndarray) and value.ndim == 1:
            raise TypeError(f"{name} for a batch must be a sequence of {n_queries} id lists or an IdLists, "
                            "got a 1-D array")
        lists = IdLists.from_lists(list(value))
    if len(lists) != n_queries:
        raise ValueError(f"{name} has {len(lists)} lists for {n_queries} queries")
    return lists.indptr, lists.ids


class ItemIndex:
    """Item vectors converted once to a reduced precision for fast top-k with exact answers.

    Pass it to :func:`topk` in place of ``items``. The scan runs in the reduced precision and keeps a
    shortlist of ``shortlist(k)`` candidates per query, which is then re-scored exactly in float32 from the
    original items: returned scores are exact float32 inner products (the values :func:`topk` gives a batch).

    With ``exact=True`` (the default) the ids are exact too, ties included: each query's shortlist is
    checked against a rigorous bound on the reduced-precision error (from the query, each item's scale and
    L2 norm, and float rounding), which proves that no item left out of the shortlist can reach the k-th
    best exact score. A query that fails the check (a shortlist too short for how close the scores lie) is
    scanned again with a 4x shortlist, then, if need be, exactly in float32; :attr:`rescans` counts them.
    With ``exact=False`` the shortlist is trusted: a true top-k item that fell outside it is missed.

    The bound on the items left out of a shortlist is taken at the largest norm and scale among them; the
    few items whose norm or scale exceeds 1.5x the 99th percentile (:attr:`heavy`, at most 1,024) are
    re-scored for every query instead, so that one outsized item does not fail every check. Queries whose
    values could overflow float32 in either precision are scanned in float32. The check assumes IEEE
    float arithmetic (no flush-to-zero mode set in the process by another library). ``from_arrays``
    trusts the arrays it is given: arrays of other items than ``items`` void the guarantee.

    Parameters
    ----------
    items : array_like, float32, shape (N, d)
        Kept by reference (a C-contiguous float32 array is not copied) for the re-scoring; must stay
        unchanged while the index is used. Must be finite.
    precision : {"int8", "bf16"}
        ``"int8"``: symmetric int8 with one scale per item, queries quantized per query, scored with
        AVX512-VNNI (``vpdpbusd``); N * d bytes plus 8 bytes per item. ``"bf16"``: bfloat16 (round to
        nearest even), scored with AVX512-BF16 (``vdpbf16ps``); 2 * N * d bytes. Without those
        instructions (or at ``REC_ENGINE_SIMD=scalar|avx2``) a portable scorer gives the same shortlist
        semantics, slowly. The exact mode adds 4 bytes per item (the norms).
    copy : bool
        Keep the reduced-precision copy (default). ``copy=False`` (bf16, exact only) keeps none: a batch of
        4 queries or more converts each panel of 64 items from ``items`` as its scan reaches it, so the
        index costs only its norms (4 bytes an item) while batches score at bf16's rate; 1-3 queries, and
        CPUs without AVX512-BF16, take the exact float32 scan (the same answer). A float32
        :class:`~rec_engine.Engine` screens its batches this way.
    shortlist : int, optional
        A fixed shortlist size (clamped to ``[k, N]``) instead of the default rule: exact int8
        ``4 k + 64``, exact bf16 ``2 k + 64`` (the check's margin is wider for int8), else ``k + max(32, k // 4)``.
    exact : bool
        Check every shortlist and rescan the queries that fail (default), or trust the shortlist.

    Notes
    -----
    1M Gaussian items x 64, 256 queries, 50 excluded ids each: with the default shortlists no query failed
    the check at k = 10, 100 and 500 (int8 and bf16); ``4 k + 64`` left 0-2 of 256 int8 queries to a
    rescan. A lone query over 65,536 items or more starts its selection at a floor from 128 sampled panels,
    so the longer shortlist costs little: a single int8 query at k = 500 takes about 1.3 ms there (warm; 2.6
    ms with the caches flushed), as the trusted shortlist does, against 6-7 ms for the float32 scan. Data
    whose scores crowd the k-th one (many near-duplicate items) needs longer shortlists, which the rescans
    supply. A batch over 65,536 items or more starts its selections at floors from the same sampled panels
    (256 queries, k = 100: int8 86 -> 45 ms, bf16 78 -> 57 ms; k = 500: both below the float32 scan's 100
    ms). Over a smaller table a batch whose shortlists exceed 320 items and add up to 24,576 or more scans in
    float32 instead: the same answer, faster than that many long selections and re-scorings. Only the inner
    product metric is supported;
    ``candidates`` fall back to the exact float32 scorer.
    """

    __slots__ = ("items", "precision", "packed", "corr", "scale", "_shortlist", "_exact", "norm", "heavy",
                 "_maxima", "queries", "rescans", "_lock")

    def __init__(self, items, precision: str = "int8", *, shortlist: int | None = None,
                 num_threads: int | None = None, exact: bool = True, copy: bool = True):
        if precision not in ("int8", "bf16"):
            raise ValueError(f"precision must be 'int8' or 'bf16', got {precision!r}")
        if not isinstance(copy, (bool, np.bool_)):
            raise TypeError(f"copy must be a bool, got {type(copy).__name__}")
        self.items = as_float32(items, "items", ndim=2)
        self.precision = precision
        self._shortlist = None if shortlist is None else as_count(shortlist, "shortlist")
        if copy:
            self.packed, self.corr, self.scale = _core.quantize_items(self.items, precision,
                                                                     threads_arg(num_threads))
        else:
            if precision != "bf16" or not (isinstance(exact, (bool, np.bool_)) and bool(exact)):
                raise ValueError("copy=False needs precision='bf16' and exact=True (the panels are converted "
                                 "as they are scanned, and the check guards against what bf16 cannot hold)")
            self.packed = self.corr = self.scale = None
        self._set_exact(exact, num_threads)
        if not copy and not np.isfinite(self._maxima[2]):   # (a norm of NaN or inf: a non-finite item)
            raise ValueError("items must be finite")

    def _set_exact(self, exact, num_threads) -> None:
        if not isinstance(exact, (bool, np.bool_)):
            raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
        self._exact = bool(exact)
        self.queries = self.rescans = 0
        self._lock = threading.Lock()
        self.norm, self.heavy = None, None
        self._maxima = (0.0, 0.0, 0.0, 0.0)
        if not self._exact:
            return
        n = self.items.shape[0]
        self.norm = _core.quantized_norms(self.items, self.precision, threads_arg(num_threads))
        scale = self.scale[:n] if self.scale is not None else np.zeros(n, np.float32)   # (bf16: no scales)
        if n == 0:
            self.heavy = np.zeros(0, np.int64)
            return
        # A few items of outsized norm or scale would widen every query's bound on the items left out of its
        # shortlist (taken at the maxima): those above 1.5x the 99th percentile (at most 1,024, the largest)
        # are re-scored for every query instead, and the maxima are taken over the others.
        nrm, sc = self.norm.astype(np.float64), scale.astype(np.float64)
        with np.errstate(all="ignore"):   # (norms of inf: the maxima then send every query to float32)
            cut_n, cut_s = 1.5 * float(np.quantile(nrm, 0.99)), 1.5 * float(np.quantile(sc, 0.99))
            excess = np.maximum(nrm / max(cut_n, 1e-300), sc / max(cut_s, 1e-300))
        heavy = np.flatnonzero(excess > 1.0)
        if len(heavy) > _MAX_HEAVY:
            heavy = heavy[np.argpartition(excess[heavy], -_MAX_HEAVY)[-_MAX_HEAVY:]]
        self.heavy = np.sort(heavy).astype(np.int64)
        rest = np.ones(n, bool)
        rest[self.heavy] = False
        self._maxima = (float(self.norm[rest].max()) if rest.any() else 0.0,
                        float(scale[rest].max()) if rest.any() else 0.0,
                        float(self.norm.max()), float(scale.max()))

    @property
    def exact(self) -> bool:
        """Whether every shortlist is checked (set at construction)."""
        return self._exact

    @classmethod
    def from_arrays(cls, items, precision: str, packed, corr, scale, *, shortlist: int | None = None,
                    exact: bool = True, num_threads: int | None = None) -> "ItemIndex":
        """An index from the arrays of one built earlier (``packed``, ``corr``, ``scale``: e.g. saved in a
        bundle and memory-mapped, so that server processes share them); ``items`` are the float32 vectors it
        was built from. Sizes are checked here (ValueError); contents are trusted. The exact mode's norms are
        computed here from ``items`` (one read of them)."""
        if precision not in ("int8", "bf16"):
            raise ValueError(f"precision must be 'int8' or 'bf16', got {precision!r}")
        self = cls.__new__(cls)
        self.items = as_float32(items, "items", ndim=2)
        self.precision = precision
        self._shortlist = None if shortlist is None else as_count(shortlist, "shortlist")
        n, d = self.items.shape
        rows = -(-n // _PANEL) * _PANEL
        width = (d + 3) // 4 * 4 if precision == "int8" else (d + 1) // 2 * 2 * 2
        want = {"packed": (np.uint8, rows * width), "corr": (np.int32, rows), "scale": (np.float32, rows)}
        got = {"packed": packed, "corr": corr, "scale": scale}
        for name, (dtype, size) in want.items():
            a = got[name]
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != (size,) or not a.flags.c_contiguous:
                raise ValueError(f"{precision} index array {name!r} must be C-contiguous {np.dtype(dtype)} of shape "
                                 f"({size},) for {n} x {d} items, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        self.packed, self.corr, self.scale = packed, corr, scale
        self._set_exact(exact, num_threads)
        return self

    def shortlist(self, k: int) -> int:
        """Candidates kept per query before the exact re-scoring."""
        if self._shortlist is not None:
            return self._shortlist
        if self.exact:
            return (4 if self.precision == "int8" else 2) * k + 64
        return k + max(32, k // 4)

    @property
    def shape(self):
        return self.items.shape

    @property
    def copy(self) -> bool:
        """Whether the index keeps its reduced-precision copy (else batches convert panels as they scan)."""
        return self.packed is not None

    def __repr__(self) -> str:
        return (f"ItemIndex(n_items={self.items.shape[0]}, dim={self.items.shape[1]}, precision={self.precision!r}, "
                f"exact={self.exact}{'' if self.copy else ', copy=False'})")


def topk(queries, items, k: int = 10, *, metric: str = "ip", exclude=None, candidates=None,
         num_threads: int | None = None) -> TopK:
    """The ``k`` best items for each query, exactly, best first (ties: lower id first).

    Parameters
    ----------
    queries : array_like, float32, shape (d,) or (B, d)
        One query gives 1-D results, a batch 2-D. Must be finite.
    items : array_like, float32, shape (N, d), or ItemIndex
        Item vectors; a C-contiguous float32 array is used without a copy. An :class:`ItemIndex`
        (int8 or bf16) scans in reduced precision and re-scores a shortlist exactly, with the same ids
        unless built with ``exact=False`` (inner product only; with ``candidates`` the exact float32
        scorer is used).
    k : int
        Results per query; ``k > N`` returns N columns.
    metric : {"ip", "cosine"}
        Inner product, or cosine similarity (zero vectors score 0).
    exclude : optional
        Items never returned (e.g. already seen): for one query an array of ids, for a batch a
        sequence of B arrays or an :class:`IdLists`. Ids must be in ``[0, N)``.
    candidates : optional
        Score only these items (same forms as ``exclude``); duplicates count once.
    num_threads : int, optional
        OpenMP threads for this call (default: OpenMP's default). Batches split the items between
        threads; small calls run on the calling thread.

    Returns
    -------
    TopK(ids int64, scores float32), shape (width,) or (B, width) with ``width = min(k, N)``; slots
    without an eligible item hold id -1 and score -inf.

    Raises
    ------
    ValueError  k < 0, mismatched dims, NaN/inf in queries, NaN scores, malformed lists.
    IndexError  an excluded or candidate id outside ``[0, N)`` (the message names query and position).
    TypeError   wrong dtypes.

    Notes
    -----
    Scores are computed block by block with a running selection; the B x N score matrix is never
    materialized. The GIL is released while it runs.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    kk = as_count(k, "k")
    index = items if isinstance(items, ItemIndex) else None
    if index is not None:
        if metric != "ip":
            raise ValueError("an ItemIndex supports metric='ip' only")
        items = index.items
        if candidates is not None:
            index = None
    q = as_float32(queries, "queries")
    single = q.ndim == 1
    if single:
        q = q.reshape(1, -1)
    elif q.ndim != 2:
        raise ValueError(f"queries must be 1-D (one query) or 2-D (a batch), got shape {q.shape}")
    x = as_float32(items, "items", ndim=2)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but items have dimension {x.shape[1]}")
    ex_indptr, ex_ids = _lists(exclude, q.shape[0], single, "exclude")
    c_indptr, c_ids = _lists(candidates, q.shape[0], single, "candidates")
    if index is not None:
        norm_max, scale_max, norm_all_max, scale_all_max = index._maxima
        ids, scores, rescans = _core.topk_quantized(
            q, x, index.packed, index.corr, index.scale, index.precision, kk, index.shortlist(kk), ex_indptr, ex_ids,
            threads_arg(num_threads), index.norm, norm_max, scale_max, index.heavy, norm_all_max, scale_all_max)
        with index._lock:
            index.queries += q.shape[0]
            index.rescans += rescans
        return TopK(ids[0], scores[0]) if single else TopK(ids, scores)
    ids, scores = _core.topk(q, x, kk, "ip" if metric == "ip" else "cosine", ex_indptr, ex_ids,
                             c_indptr, c_ids, threads_arg(num_threads))
    if single:
        return TopK(ids[0], scores[0])
    return TopK(ids, scores)
