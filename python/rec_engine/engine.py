"""The Engine: what a Python service imports. Two-stage recommendation, online feedback, model swaps.

::

    engine = Engine.load("bundles/pipeline")          # or a retrieval-only / ranking-only bundle
    rec = engine.recommend(42, k=10)                  # rec.items, rec.scores, rec.timings
    engine.observe(42, [1337, 7])                     # seen set, history, fold-in: the next call reflects it
    engine.swap("bundles/pipeline-v2")                # atomic; in-flight requests finish on the old version

A *version* is everything loaded from one bundle (retrieval model, ranking model, ONNX sessions); it is
immutable once built, and every request reads the current one once, so an answer comes wholly from one
version. What the engine learns online (:class:`~rec_engine.online.OnlineState`) belongs to the engine,
not to a version: it survives swaps and restarts (through its event log).
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ._core import RecEngineError
from .bundle import BundleError, open_bundle
from .online import OnlineState
from .ranking import RANKING_KINDS, CtrRanker, load_ranking
from .retrieval import load_retrieval
from .topk import topk

DEFAULT_CANDIDATES = 500


@dataclass
class Recommendation:
    """Items best first with their scores (click probability when a ranking model ran, else the retrieval
    score), the version that answered, whether the user got the cold-start fallback, and per-stage
    timings in milliseconds. Fewer than ``k`` items are padded with id -1 and score -inf."""

    user: int
    items: np.ndarray
    scores: np.ndarray
    version: str
    fallback: bool = False
    timings: dict = field(default_factory=dict)


class _Version:
    """Models loaded from one bundle; immutable after construction."""

    def __init__(self, path: Path, *, ort_threads: int, verify: bool):
        import onnxruntime as ort

        top = open_bundle(path, verify=verify)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ort_threads
        opts.inter_op_num_threads = 1
        self.path = path
        self.id = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()[:12]
        if top.kind == "pipeline":
            stages = top.meta.get("stages", {})
            rb = open_bundle(path / stages["retrieval"], verify=verify) if stages.get("retrieval") else None
            kb = open_bundle(path / stages["ranking"], verify=verify) if stages.get("ranking") else None
            self.n_candidates = int(top.meta.get("n_candidates", DEFAULT_CANDIDATES))
        elif top.kind in RANKING_KINDS:
            rb, kb, self.n_candidates = None, top, DEFAULT_CANDIDATES
        else:
            rb, kb, self.n_candidates = top, None, DEFAULT_CANDIDATES
        self.retrieval = load_retrieval(rb, opts) if rb is not None else None
        self.ranking: CtrRanker | None = load_ranking(kb, opts) if kb is not None else None
        if self.retrieval is None and self.ranking is None:
            raise BundleError(f"pipeline bundle {path} names no stage")
        n_r = self.retrieval.n_items if self.retrieval is not None else None
        n_k = self.ranking.n_items if self.ranking is not None else None
        if n_r is not None and n_k is not None and n_r != n_k:
            raise BundleError(f"bundle {path}: retrieval has {n_r} items but ranking's item store has {n_k}")
        self.n_items = n_r if n_r is not None else n_k
        counts = self.retrieval.item_counts if self.retrieval is not None else None
        # cold start: popular items, ranked by the same top-k (a 1-d "vector" per item)
        self.popular = None if counts is None else np.ascontiguousarray(counts.astype(np.float32)[:, None])


class Engine:
    """Serves recommendations from a bundle; see the module docstring.

    Parameters
    ----------
    path : str or Path
        A pipeline bundle (retrieval + ranking stages), or a single retrieval or ranking bundle.
    event_log : path, optional
        Append-only JSON-lines log of observed events; replayed at load, so nothing observed is lost.
    ort_threads : int
        ONNX Runtime intra-op threads per session (1 suits a server that runs requests in parallel).
    num_threads : int, optional
        Threads of the core's top-k (default: OpenMP's default; 1 in a busy multi-threaded server).
    verify : bool
        Check every bundle file's sha256 at load (default True).
    """

    def __init__(self, path, *, event_log=None, ort_threads: int = 1, num_threads: int | None = None,
                 verify: bool = True, fsync: bool = False):
        self.ort_threads, self.num_threads, self.verify = ort_threads, num_threads, verify
        self._version = _Version(Path(path), ort_threads=ort_threads, verify=verify)
        self.online = OnlineState(event_log, fsync=fsync)
        self._swap_lock = threading.Lock()

    @classmethod
    def load(cls, path, **options) -> "Engine":
        """Load the bundle at ``path`` (see :class:`Engine` for the options)."""
        return cls(path, **options)

    @property
    def version(self) -> str:
        return self._version.id

    @property
    def n_items(self) -> int | None:
        return self._version.n_items

    # ------------------------------------------------------------------ requests
    def _check_user(self, user) -> int:
        if isinstance(user, bool) or not isinstance(user, (int, np.integer)):
            raise TypeError(f"user must be an integer id, got {type(user).__name__}")
        if user < 0:
            raise ValueError(f"user ids are non-negative, got {user}")
        return int(user)

    def _check_items(self, items, name: str, n_items: int | None) -> np.ndarray:
        a = np.asarray(items)
        if a.dtype.kind not in "iu" and not (a.size == 0):
            raise TypeError(f"{name} must be integer item ids, got dtype {a.dtype}")
        a = a.astype(np.int64).reshape(-1)
        if n_items is not None and a.size and (a.min() < 0 or a.max() >= n_items):
            bad = int(a[(a < 0) | (a >= n_items)][0])
            raise IndexError(f"{name}: item id {bad} is out of range [0, {n_items})")
        return a

    def recommend(self, user: int, k: int = 10, *, exclude_seen: bool = True, candidates=None,
                  context: Mapping[str, Any] | None = None, n_candidates: int | None = None) -> Recommendation:
        """Top ``k`` items for ``user``: retrieval of ``n_candidates`` items by top-k (or the given
        ``candidates``), then ranking by the CTR model when the bundle has one.

        Parameters
        ----------
        user : int
            User id; an id the model does not know (and that has no observed events) gets the
            cold-start fallback: popular items, ranked by the CTR model from ``context`` if there is one.
        k : int
            Items to return (at most the catalogue; padded with -1 / -inf when fewer are left).
        exclude_seen : bool
            Skip items the user interacted with (training data and observed events).
        candidates : sequence of int, optional
            Restrict the result to these items.
        context : mapping, optional
            Feature values for the ranking model's context fields (and the user's fields when the
            model does not know the user).
        """
        return self._recommend(self._version, self._check_user(user), k, exclude_seen, candidates, context,
                               n_candidates)

    def recommend_batch(self, users: Sequence[int], k: int = 10, **kw) -> list[Recommendation]:
        """:meth:`recommend` for several users, all answered by the same model version."""
        v = self._version
        checked = [self._check_user(u) for u in users]
        return [self._recommend(v, u, k, kw.get("exclude_seen", True), kw.get("candidates"), kw.get("context"),
                                kw.get("n_candidates")) for u in checked]

    def _recommend(self, v: _Version, user: int, k: int, exclude_seen: bool, candidates, context,
                   n_candidates) -> Recommendation:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an integer, got {type(k).__name__}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        t0 = time.perf_counter()
        timings = {}
        cand = None if candidates is None else self._check_items(candidates, "candidates", v.n_items)
        seen = None
        if exclude_seen:
            seen = (v.retrieval.seen(user, self.online) if v.retrieval is not None
                    else (self.online.items(user) if self.online.items(user) is not None else np.zeros(0, np.int64)))
        fallback = False
        if v.retrieval is not None:
            n = k if v.ranking is None else max(k, n_candidates or v.n_candidates)
            res = v.retrieval.retrieve(user, n, self.online, exclude=seen, candidates=cand,
                                       num_threads=self.num_threads)
            if res is None:       # a user the model cannot describe: popular items
                if v.popular is None:
                    raise RecEngineError(f"user {user} is unknown and the bundle has no popularity to fall back on")
                res = topk(np.ones(1, np.float32), v.popular, n, exclude=seen, candidates=cand,
                           num_threads=self.num_threads)
                fallback = True
            ids, scores = res.ids, res.scores
            ids, scores = ids[ids >= 0], scores[ids >= 0]
            timings["retrieval_ms"] = (time.perf_counter() - t0) * 1e3
        else:
            if cand is None:
                if v.ranking.n_items is None:
                    raise ValueError("a ranking-only bundle without an item store needs candidates")
                cand = np.arange(v.ranking.n_items, dtype=np.int64)
            ids = cand if seen is None or not len(seen) else cand[~np.isin(cand, seen)]
            ids = np.unique(ids)
            scores = None
        if v.ranking is not None:
            t1 = time.perf_counter()
            probs = v.ranking.score_candidates(user, ids, context)
            order = np.lexsort((ids, -probs))[:k]
            ids, scores = ids[order], probs[order]
            timings["ranking_ms"] = (time.perf_counter() - t1) * 1e3
        ids, scores = ids[:k], scores[:k].astype(np.float32)
        if len(ids) < k:
            pad = k - len(ids)
            ids = np.concatenate([ids, np.full(pad, -1, np.int64)])
            scores = np.concatenate([scores, np.full(pad, -np.inf, np.float32)])
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return Recommendation(user, ids, scores, v.id, fallback, timings)

    # ------------------------------------------------------------------ feedback
    def observe(self, user: int, items: Sequence[int], **extra) -> None:
        """Record that ``user`` interacted with ``items`` (in time order). At once: the items join the
        user's seen set (excluded from then on), its SASRec history, and its LightGCN vector is folded in
        anew; the events are in the log before this returns."""
        user = self._check_user(user)
        items = self._check_items(items, "items", self._version.n_items)
        if items.size == 0:
            raise ValueError("observe needs at least one item")
        self.online.observe(user, items, **extra)

    # ------------------------------------------------------------------ versions
    def swap(self, path) -> str:
        """Load the bundle at ``path`` beside the current one and switch to it atomically; return the new
        version id. Requests already running finish on the old version. If the new bundle fails to load,
        this raises and the old version keeps serving."""
        with self._swap_lock:
            new = _Version(Path(path), ort_threads=self.ort_threads, verify=self.verify)
            self._version = new
            return new.id

    def close(self) -> None:
        self.online.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
