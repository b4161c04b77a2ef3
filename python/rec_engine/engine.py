"""The Engine: what a Python service imports. Two-stage recommendation, online feedback, model swaps.

::

    engine = Engine.load("bundles/pipeline")          # or a retrieval-only / ranking-only bundle
    rec = engine.recommend("u-42", k=10)              # rec.items (item keys), rec.ids, rec.scores, rec.timings
    engine.observe("u-42", ["sku-1337", "sku-7"])     # seen set, history, fold-in: the next call reflects it
    engine.swap("bundles/pipeline-v2")                # atomic; in-flight requests finish on the old version

Users and items are named by their own keys (ints or strings, as in the training data; bundles without
key maps use the dense ids as keys). An unknown user key gets the cold-start answer; an unknown item key
is an :class:`~rec_engine.keys.UnknownKeyError` naming it.

A *version* is everything loaded from one bundle (retrieval model, ranking model, ONNX sessions); it is
immutable once built, and every request reads the current one once, so an answer comes wholly from one
version. What the engine learns online (:class:`~rec_engine.online.OnlineState`) belongs to the engine,
not to a version: it is kept by key, so it survives swaps (to versions with other dense ids) and
restarts (through its event log).
"""
from __future__ import annotations

import functools
import hashlib
import random
import secrets
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ._core import RecEngineError
from .bundle import BundleError, open_bundle
from .keys import KeyMap, UnknownKeyError
from .catalogue import Catalogue, VersionItems, check_features, check_vectors
from .events import Event, EventStore, open_store
from .online import OnlineState
from .versions import resolve as resolve_bundle
from .ranking import RANKING_KINDS, CtrRanker, load_ranking, quantize_dense
from .retrieval import UserState, load_retrieval
from .runtime import default_num_threads
from ._convert import threads_arg
from .bundle import INDEX_PRECISIONS, RANKING_PRECISIONS
from .topk import IdLists, ItemIndex, TopK, topk

DEFAULT_CANDIDATES = 500
_NO_IDS = np.zeros(0, np.int64)
_OBSERVED_CACHE_SIZE = 65536     # users whose observed items are kept mapped to a version's ids


@dataclass
class Recommendation:
    """Items best first with their scores (click probability when a ranking model ran, else the retrieval
    score), the version that answered, whether the user got the cold-start fallback, and per-stage
    timings in milliseconds.

    ``items`` are the items' own keys (an int64 array, or an object array of str for string keys) and
    ``ids`` their dense ids in the answering version (the fast path for callers that keep ids). Fewer than
    ``k`` results are padded with id -1, score -inf and key -1 (integer keys) or None (string keys):
    ``ids >= 0`` marks the real ones. ``request_id`` names this answer: feedback that passes it
    (:meth:`Engine.feedback`) is tied to the impression logged for it."""

    user: Any
    ids: np.ndarray
    scores: np.ndarray
    version: str
    fallback: bool = False
    timings: dict = field(default_factory=dict)
    item_keys: KeyMap | None = field(default=None, repr=False)
    _items: np.ndarray | None = field(default=None, repr=False)
    request_id: str | None = None
    explored: np.ndarray | None = None      # bool [k]: the slots exploration filled (recommend(explore=...))
    explanations: list | None = None        # per item: [(profile tag, contribution)] (recommend(explain=True))

    @property
    def items(self) -> np.ndarray:
        """The items' keys, computed on first use (the dense ids when the version has no key map)."""
        if self._items is None:
            keys = self.item_keys
            if keys is None or keys.kind == "dense":
                self._items = self.ids
            else:
                real = self.ids >= 0
                got = keys.keys(self.ids[real])
                out = np.full(len(self.ids), None if keys.kind == "str" else -1,
                              dtype=object if keys.kind == "str" else np.int64)
                out[real] = got
                self._items = out
        return self._items


def _lookup_ids(keys: KeyMap, items: list) -> np.ndarray:
    """Dense ids of ``items`` (-1 for keys the map lacks or of the other key type)."""
    if not items:
        return np.zeros(0, np.int64)
    try:
        return np.asarray(keys.lookup(items), np.int64)
    except (TypeError, ValueError):
        return np.array([_lookup_ids(keys, [x])[0] if isinstance(x, (int, str)) else -1 for x in items]
                        if len(items) > 1 else [-1], np.int64)


def _unit(x, name: str) -> float:
    """A setting in [0, 1] (TypeError for a non-number, ValueError outside)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(x).__name__}")
    if not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x!r}")
    return float(x)


def _string_lists(bundle, name: str, n: int):
    """``(utf8, offsets)`` of the bundle's per-item string lists ``name`` (None when it has none)."""
    if bundle is None or not bundle.has(f"arrays/{name}_offsets.npy"):
        return None
    out = (bundle.array(f"{name}_utf8", mmap=True), bundle.array(f"{name}_offsets"))
    if len(out[1]) != n + 1:
        raise BundleError(f"bundle {bundle.path}: {name} offsets for {len(out[1]) - 1} items, the model has {n}")
    return out


def read_string_lists(lists, i: int) -> list[str] | None:
    """Item ``i``'s strings of ``(utf8, offsets)`` (None past the stored items)."""
    if lists is None or not 0 <= i < len(lists[1]) - 1:
        return None
    utf8, off = lists
    blob = bytes(utf8[off[i]:off[i + 1]]).decode("utf-8")
    return blob.split("\x1f") if blob else []


class _Version:
    """Models loaded from one bundle; immutable after construction (its caches aside)."""

    def __init__(self, path: Path, *, ort_threads: int, verify: bool, index: str | None = None,
                 batch_threads: int | None = None, ranking_precision: str | None = None,
                 scan_memory: str = "copy", request_threads: int = 1):
        import onnxruntime as ort

        top = open_bundle(path, verify=verify)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ort_threads
        opts.inter_op_num_threads = 1
        self.path = path
        self.id = bundle_version_id(path)
        if top.kind == "pipeline":
            stages = top.meta.get("stages", {})
            rb = open_bundle(path / stages["retrieval"], verify=verify) if stages.get("retrieval") else None
            kb = open_bundle(path / stages["ranking"], verify=verify) if stages.get("ranking") else None
            nc = top.meta.get("n_candidates", DEFAULT_CANDIDATES)
            if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
                raise BundleError(f"bundle {path}: meta n_candidates must be an integer >= 1, got {nc!r}")
            self.n_candidates = nc
        elif top.kind in RANKING_KINDS:
            rb, kb, self.n_candidates = None, top, DEFAULT_CANDIDATES
        else:
            rb, kb, self.n_candidates = top, None, DEFAULT_CANDIDATES
        self.retrieval = load_retrieval(rb, opts) if rb is not None else None
        if self.retrieval is not None and hasattr(self.retrieval, "prepare"):
            self.retrieval.prepare()     # fold-in set up here, beside the old version, not on a first request
        dense = self._dense(top, kb, ranking_precision)
        matmul = self.ranking_info["precision"] if self.ranking_info["precision"] in ("bf16x3", "bf16") else "float32"
        self.ranking: CtrRanker | None = (load_ranking(kb, opts, batch_threads=batch_threads, dense=dense,
                                                       num_threads=request_threads, request_threads=request_threads,
                                                       matmul_precision=matmul)
                                          if kb is not None else None)
        if matmul != "float32":
            native = self.ranking.runner.native if self.ranking is not None else None
            self.ranking_info["tiles"] = bool(native is not None and native.tiles_active)
        if self.retrieval is None and self.ranking is None:
            raise BundleError(f"pipeline bundle {path} names no stage")
        n_r = self.retrieval.n_items if self.retrieval is not None else None
        n_k = self.ranking.n_items if self.ranking is not None else None
        if n_r is not None and n_k is not None and n_r != n_k:
            raise BundleError(f"bundle {path}: retrieval has {n_r} items but ranking's item store has {n_k}")
        self.n_items = n_r if n_r is not None else n_k
        # the user's own keys: items from the retrieval stage (the ranking stage's item store must agree),
        # users per stage (each stage's user rows are its own dense ids)
        r_items = rb.key_map("item", n_r) if rb is not None else None
        k_items = kb.key_map("item", n_k) if kb is not None and n_k is not None else None
        if r_items is not None and k_items is not None and k_items.kind != "dense" and r_items != k_items:
            raise BundleError(f"bundle {path}: the retrieval and ranking stages hold different item keys")
        self.item_keys = r_items or k_items or KeyMap.dense(self.n_items or 0)
        ranking_users = self.ranking.users.n if self.ranking is not None and self.ranking.users is not None else 0
        k_users = kb.key_map("user", ranking_users) if kb is not None else None
        self.user_keys = rb.key_map("user", self.retrieval.n_users) if rb is not None else k_users
        # the ranking stage's user rows: by its own keys, else (no keys stored) the same dense ids as retrieval
        self.ranking_user_keys = k_users if k_users is not None and k_users.kind != "dense" else None
        counts = self.retrieval.item_counts if self.retrieval is not None else None
        # cold start: popular items, ranked by the same top-k (a 1-d "vector" per item) when candidates are
        # given, else read off their order, sorted once (popular_order)
        self.popular = None if counts is None else np.ascontiguousarray(counts.astype(np.float32)[:, None])
        self._popular_order: np.ndarray | None = None
        self._unit_lock = threading.Lock()
        self.catalogue: VersionItems | None = None     # items added / removed online (see catalogue.py)
        # content (issue 16): the items' text vectors (unit rows, float32) and the map from a text vector to
        # the retrieval model's item space ([c + 1, d], the last row a bias), when training stored them
        self.content_vectors = self.content_map = None
        self.content_meta: dict = {}
        cb = rb if rb is not None and rb.has("arrays/content_vectors.npy") else (
            kb if kb is not None and kb.has("arrays/content_vectors.npy") else None)   # a ranking stage's own
        if cb is not None:
            cv = np.asarray(cb.array("content_vectors", mmap=True), np.float32)
            norms = np.linalg.norm(cv, axis=1, keepdims=True)
            self.content_vectors = np.ascontiguousarray(cv / np.where(norms > 0, norms, 1.0), np.float32)
            if len(self.content_vectors) != self.n_items:
                raise BundleError(f"bundle {path}: {len(self.content_vectors)} content vectors for {self.n_items} items")
            self.content_meta = dict(cb.meta.get("content") or {})
            if cb.has("arrays/content_map.npy"):
                self.content_map = np.ascontiguousarray(cb.array("content_map"), np.float32)
        # (utf8 blob, offsets) of the items' keyphrases and of their labels (genres, tags), when training stored them
        self.keywords = _string_lists(rb, "item_keywords", self.n_items or 0)
        self.labels = _string_lists(rb, "item_labels", self.n_items or 0) or _string_lists(
            kb, "item_labels", self.n_items or 0)
        self.sentiment = None      # float32 [n_items], NaN: no reviews (items option reviews_file)
        if rb is not None and rb.has("arrays/item_sentiment.npy"):
            self.sentiment = rb.array("item_sentiment")
            if self.sentiment.shape != (self.n_items,):
                raise BundleError(f"bundle {path}: item_sentiment has shape {self.sentiment.shape}, the model "
                                  f"has {self.n_items} items")
        self._observed: dict = {}    # user key -> (stamp, observed items as this version's dense ids)
        self.scan_memory = scan_memory
        self.index = self._load_index(top, index)

    def _dense(self, top, kb, precision: str | None) -> bytes | None:
        """The ranking model's dense part when it is not the stage's own float32 one (sets ranking_info)."""
        stored = dict(top.meta.get("ranking") or {}) if top.kind == "pipeline" else {}
        want = precision if precision is not None else stored.get("precision", "float32")
        if precision is None and want not in RANKING_PRECISIONS:
            raise BundleError(f"bundle {top.path}: meta ranking.precision must be one of {RANKING_PRECISIONS}, "
                              f"got {want!r}")
        if want not in RANKING_PRECISIONS:
            raise ValueError(f"ranking_precision must be one of {RANKING_PRECISIONS}, got {want!r}")
        self.ranking_info = {"precision": want}
        if want in ("bf16x3", "bf16") and stored.get("precision") == want:
            self.ranking_info = stored
        if want != "int8" or kb is None:
            return None
        if stored.get("precision") == "int8" and top.has("dense_int8.onnx"):
            self.ranking_info = stored
            return top.onnx_path("dense_int8").read_bytes()
        return quantize_dense(kb.onnx_path("dense"))

    def _load_index(self, top, precision: str | None) -> dict:
        """Sets the retrieval stage's scan (exact float32, or an int8 / bf16 ItemIndex: the bundle's own
        arrays when it stores them, else built now); returns what is known of it (precision, recall)."""
        stored = dict(top.meta.get("index") or {}) if top.kind == "pipeline" else {}
        want = precision if precision is not None else stored.get("precision", "float32")
        if want not in INDEX_PRECISIONS:
            raise ValueError(f"index must be one of {INDEX_PRECISIONS}, got {want!r}")
        if want == "float32":
            if self.scan_memory == "copy" and self.retrieval is not None and self.retrieval.scans_vectors:
                # the scanned table in this process's own memory: NumPy asks the kernel for huge pages for
                # large arrays, which a scan reads ~1.35x faster than the mapped file's 4 KB page-cache pages
                self.retrieval.items = np.array(self.retrieval.items, order="C")
            r = self.retrieval
            if r is not None and r.screens_batches(r.screen_min_batch):   # batches' bf16 screen: now, not on a batch
                r.batch_screen(r.items)
            return {"precision": "float32"}
        # a reduced-precision scan reads its index (loaded or built here, in this process unless "mmap");
        # the float32 items are only gathered for the shortlist, so they stay mapped
        if self.retrieval is None:
            raise ValueError(f"index={want!r} needs a retrieval stage; bundle {self.path} has none")
        names = [f"index_{want}_{a}" for a in ("packed", "corr", "scale")]
        if stored.get("precision") == want and all(top.has(f"arrays/{n}.npy") for n in names):
            arrays = [top.array(n, mmap=self.scan_memory == "mmap") for n in names]
            self.retrieval.set_index(ItemIndex.from_arrays(self.retrieval.items, want, *arrays))
            return stored
        self.retrieval.set_index(ItemIndex(self.retrieval.items, want))
        return {"precision": want}

    def map_content(self, content: np.ndarray) -> np.ndarray:
        """Retrieval vectors ``[n, d]`` of text vectors ``[n, c]`` through the content map."""
        w = self.content_map
        if w is None or content.shape[1] + 1 != w.shape[0]:
            raise ValueError(f"this version has no content map for {content.shape[1]}-dim text vectors")
        return np.ascontiguousarray(content @ w[:-1] + w[-1], np.float32)

    @property
    def removed_ids(self) -> np.ndarray:
        """Sorted dense ids of the items removed online (excluded from every answer)."""
        return _NO_IDS if self.catalogue is None else self.catalogue.removed_ids

    def items_view(self) -> VersionItems:
        if self.catalogue is None:
            self.catalogue = VersionItems(self)
        return self.catalogue

    def unit_table(self, side: str) -> np.ndarray:
        """The retrieval model's item (``side="item"``) or user vectors scaled to unit length (a zero vector
        stays zero), built at the first call and kept: cosine similarity is then a dot product, so the
        core's top-k finds the nearest. ValueError for a retrieval stage without such vectors."""
        r = self.retrieval
        name = f"_unit_{side}"
        got = getattr(self, name, None)
        if got is not None and (side == "user" or len(got) == len(r.items)):
            return got
        if r is None or not r.scans_vectors or r.kind == "popularity" or not hasattr(r, "users" if side == "user" else "items"):
            raise ValueError(f"similar {side}s need a retrieval model with {side} vectors (mf, lightgcn, ngcf); "
                             f"this version has {'none' if r is None else r.kind}")
        with self._unit_lock:
            got = getattr(self, name, None)
            if got is None or (side == "item" and len(got) != len(r.items)):
                table = r.items if side == "item" else r.users.to_numpy()
                table = np.asarray(table, np.float32)
                norms = np.linalg.norm(table, axis=1, keepdims=True)
                got = np.ascontiguousarray(table / np.where(norms > 0, norms, 1.0), np.float32)
                setattr(self, name, got)
        return got

    def self_information(self) -> np.ndarray | None:
        """Per item, -log2 of its add-one smoothed share of the training interactions (novelty of showing
        it); None without item counts. Computed once."""
        info = getattr(self, "_info", None)
        if info is None and self.retrieval is not None and self.retrieval.item_counts is not None:
            counts = np.asarray(self.retrieval.item_counts, np.float64)
            info = self._info = -np.log2((counts + 1.0) / (counts.sum() + len(counts)))
        if info is not None and self.n_items is not None and len(info) < self.n_items:
            # items added online have no training interactions: the information of a count of 0
            counts = np.asarray(self.retrieval.item_counts, np.float64)
            zero = -np.log2(1.0 / (counts.sum() + len(counts)))
            info = self._info = np.concatenate([info, np.full(self.n_items - len(info), zero)])
        return info

    def popular_items(self, n: int, exclude: np.ndarray | None) -> TopK:
        """The cold-start answer without candidates: the ``n`` most popular items not in ``exclude``, as the
        top-k over the popularity column gives them (ties: lower id first), read off an order sorted once."""
        order = self._popular_order
        if order is None:   # sorted at the first cold start (a stable sort: equal counts keep id order)
            order = self._popular_order = np.argsort(-self.popular[:, 0], kind="stable")
        n = min(n, len(order))
        if exclude is None or not len(exclude):
            ids = order[:n]
        else:
            head = order[:n + len(exclude)]
            ids = head[~np.isin(head, exclude)][:n]
        scores = self.popular[ids, 0]
        if len(ids) < n:
            ids = np.concatenate([ids, np.full(n - len(ids), -1, np.int64)])
            scores = np.concatenate([scores, np.full(n - len(scores), -np.inf, np.float32)])
        return TopK(ids.astype(np.int64, copy=False), scores)

    def user_state(self, user, online: OnlineState) -> UserState:
        """What this version knows of the user with key ``user``: dense id and observed items."""
        uid = self.user_keys.id(user)
        stamp = online.stamp(user)
        if stamp == 0:
            return UserState(user, uid)
        hit = self._observed.get(user)
        if hit is None or hit[0] != stamp:
            stamp, keys = online.snapshot(user)
            ids = self.item_keys.lookup(list(keys))
            hit = (stamp, np.ascontiguousarray(ids[ids >= 0]))    # items this version does not hold: dropped
            if len(self._observed) >= _OBSERVED_CACHE_SIZE:
                self._observed.clear()
            self._observed[user] = hit
        return UserState(user, uid, hit[1], hit[0])


def bundle_version_id(path: Path) -> str:
    """The id of the version a bundle directory serves as: the first 12 hex digits of its manifest's sha256."""
    return hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()[:12]


@functools.lru_cache(maxsize=64)
def version_tag(version: str) -> str:
    """8 hex digits naming a model version (CRC-32 of its id): the tail of the request ids it answers with."""
    return f"{zlib.crc32(version.encode()) & 0xFFFFFFFF:08x}"


def request_id(version: str) -> str:
    """A new request id: 24 random hex digits, then the :func:`version_tag` of the version that answered, so
    feedback can be tied to its version without a table of past answers."""
    return secrets.token_hex(12) + version_tag(version)


def _best_first(ids: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """The positions of the ``k`` best of ``p`` (highest first, equal scores by lower id, NaN last), what
    ``np.lexsort((ids, -p))[:k]`` gives; for many more scores than ``k`` only those at or above the ``k``-th
    best are sorted (500 candidates, k = 10: ~6 instead of 8.2 us)."""
    if len(p) <= 4 * k or k < 1:
        return np.lexsort((ids, -p))[:k]
    t = -np.partition(-p, k - 1)[k - 1]     # the k-th best score (NaN sorts last)
    if t != t:          # fewer than k numbers
        return np.lexsort((ids, -p))[:k]
    sel = np.flatnonzero(p >= t)
    return sel[np.lexsort((ids[sel], -p[sel]))][:k]


class Engine:
    """Serves recommendations from a bundle; see the module docstring.

    Parameters
    ----------
    path : str or Path
        A pipeline bundle (retrieval + ranking stages), or a single retrieval or ranking bundle.
    events : path, ``redis://`` URL or :class:`~rec_engine.events.EventStore`, optional
        The event store (:func:`~rec_engine.events.open_store`): a SQLite file (the embedded default), a
        Redis stream shared by replicas, or a store object (which the caller then closes). Observed
        events are committed to it before :meth:`observe` returns, impressions are logged to it, and the
        online state is read from it in bulk at load. A ``.jsonl`` log of older releases is imported once
        into the ``.db`` file beside it. ``event_log`` is the older name of this option.
    durable : bool
        ``synchronous=FULL`` for a SQLite store: an fsync per commit (no loss on a power failure; without
        it a process crash loses nothing acknowledged, a power failure may lose the last commits).
        ``fsync`` is the older name.
    window_days : float, optional
        Read only the last ``window_days`` of interactions into the online state at load (default: all).
    retention_days : float, optional
        The store erases events older than this (at open, then about once a minute).
    impression_sample : float
        Share of recommendations whose impression is logged (default 1.0; 0 logs none). Request ids are
        returned either way.
    follow_events_s : float, optional
        Poll the store this often for events other processes (``serve --workers N``, replicas on a Redis
        stream) observed, and apply them to this engine's online state.
    candidate, candidate_fraction : bundle path, float
        A/B serving: users whose key hashes below ``candidate_fraction`` (stable per key) are served by the
        ``candidate`` bundle, the others by ``path``; impressions record the version that served them.
        See :meth:`set_candidate`.
    clock : callable, optional
        Seconds since the epoch for the events this engine stores (default ``time.time``; a simulation
        passes its own clock, so its days are days in the store).
    content_encoder : path, optional
        A ``content_encoder`` bundle (``rec-engine content-encoder``): lets :meth:`add_items` take item text,
        turned into the retrieval vector by the version's content map.
    hybrid_max_events : int
        With a bundle that stores content vectors, a user with at most this many events (training and
        observed, at least one) is retrieved by content too: the items nearest to the mean text vector of
        what it touched, fused with the collaborative top-n by reciprocal rank; a user the model does not know
        gets the content half alone instead of the popularity fallback. 0: off.
    diversity, debias : float
        Defaults of :meth:`recommend`'s re-ranking (0: off): maximal marginal relevance over the items' text
        vectors (their collaborative vectors without text) and popularity debiasing by exposure (training
        interactions plus logged impressions), in [0, 1] (:mod:`rec_engine.longtail`).
    explore : float
        Default share of slots (0: off) given to items shown fewer than ``explore_max_impressions`` times,
        chosen by Thompson sampling on their logged impressions and clicks (:class:`~rec_engine.longtail.
        ThompsonExplorer`, filled from the event store at load and updated by every impression and click).
    profiles : bool, ProfileConfig or mapping, optional
        Keep user profiles (:mod:`rec_engine.profiles`: decayed interest tags, preference vectors, counters),
        built from the event store at load and on every swap, updated by every observed event:
        :meth:`profile`, ``recommend(..., explain=True)``. True: the default :class:`~rec_engine.profiles.
        ProfileConfig`; a mapping: its fields (``half_life_days``, ``min_events``, ``ttl_s``, ...).
    ort_threads : int
        ONNX Runtime intra-op threads per session (1 suits a server that runs requests in parallel).
    num_threads : int, optional
        Threads of a request: of the core's top-k (default: OpenMP's default; 1 in a busy multi-threaded
        server) and of its ranking, whose candidates run through the dense part as that many row chunks at
        once (each on one thread, at least 64 candidates each: 500 candidates of a DeepFM 400-400-400 on two
        threads take 1.0 ms instead of 1.8 ms); and of the ONNX Runtime session that ranks
        :meth:`recommend_batch`'s candidates (default: all cores).
    batch_threads : int, optional
        Threads of :meth:`recommend_batch` alone (its top-k and the ONNX Runtime session that ranks its
        candidates), when they should differ from ``num_threads``: a server that answers lone requests on one
        core each but coalesces concurrent ones into batches gives the batches every core (``serve
        --coalesce-us``). Default: ``num_threads``.
    verify : bool
        Check every bundle file's sha256 at load (default True).
    index : {"float32", "int8", "bf16"}, optional
        How retrieval scans the item vectors: in float32, or in reduced precision with the shortlist
        re-scored in float32 (:class:`~rec_engine.topk.ItemIndex`; 2-4x less memory traffic per request), with
        the float32 scan's candidates: each reduced-precision shortlist is checked against a bound on its
        error, and a request whose shortlist fails the check is scanned again (counted in :attr:`index`). (Its
        scores are those of the float32 scan of a batch; a lone float32 request sums in another order, so a
        score may differ in its last bit and near-ties within that bit may order differently.) Default: the
        bundle's setting (``write_pipeline(index=...)``, whose stored arrays are then loaded), else float32.
        Applies to every version this engine loads (swaps too).
    scan_memory : {"copy", "mmap"}
        Where the table that retrieval scans (the item vectors, or the int8 / bf16 index) lives: ``"copy"``
        (default), read into this process's memory, where NumPy gets huge pages for it (a scan of 1M x 64
        float32 on one thread: 8.7 ms against 12.0 ms from the memory-mapped file's 4 KB pages); ``"mmap"``,
        the bundle's file mapped, shared with other processes through the page cache (``serve --workers N``
        saves N - 1 copies). Other tables are always memory-mapped.
    ranking_precision : {"float32", "int8", "bf16x3", "bf16"}, optional
        The ranking model's dense part as trained, or with int8 weights (ONNX Runtime's dynamic quantization,
        :func:`~rec_engine.ranking.quantize_dense`: 2.7x faster for an MLP 400-400-400; probabilities move by
        up to ~1e-2, 8e-3 for the demo's DeepFM, see :attr:`ranking_info`; activations are quantized per call,
        so a score also depends slightly on the other examples of its call, or of its row chunk: recommend_batch,
        and engines of other ``num_threads``, may order near-ties unlike single calls). ``"bf16x3"`` / ``"bf16"``:
        the products of its hidden layers on AMX-BF16 tiles (Intel Sapphire Rapids and later; PyTorch's "high" /
        "medium" float32 matmul precisions): each float32 split into two bf16 numbers and three bf16 products a
        term (~16 significant bits; measured 1.5x faster than float32 for DeepFM's 400-400-400 at 500 rows, logits
        within ~1e-5 of it), or one bf16 product (~8 bits; 3.3x, logits within ~5e-3); the same arithmetic for
        every row wherever it is scored. Float32 where the tiles are not in use (``ranking_info["tiles"]``).
        Default: the bundle's setting (``write_pipeline(ranking_precision=...)``, which stores the int8 model),
        else float32.
    """

    def __init__(self, path, *, events=None, event_log=None, ort_threads: int = 1, num_threads: int | None = None,
                 verify: bool = True, durable: bool = False, fsync: bool = False, index: str | None = None,
                 ranking_precision: str | None = None, scan_memory: str = "copy",
                 window_days: float | None = None, retention_days: float | None = None,
                 impression_sample: float = 1.0, follow_events_s: float | None = None,
                 candidate=None, candidate_fraction: float = 0.0, clock=None, content_encoder=None,
                 hybrid_max_events: int = 5, diversity: float = 0.0, debias: float = 0.0, explore: float = 0.0,
                 explore_max_impressions: int = 100, seed: int | None = None, profiles=None,
                 batch_threads: int | None = None):
        self.check_options(scan_memory=scan_memory, index=index, ranking_precision=ranking_precision,
                           batch_threads=batch_threads, num_threads=num_threads,
                           impression_sample=impression_sample, window_days=window_days,
                           retention_days=retention_days, follow_events_s=follow_events_s,
                           candidate=candidate, candidate_fraction=candidate_fraction)
        self.diversity, self.debias, self.explore = (_unit(diversity, "diversity"), _unit(debias, "debias"),
                                                     _unit(explore, "explore"))
        if isinstance(explore_max_impressions, bool) or not isinstance(explore_max_impressions, int) \
                or explore_max_impressions < 1:
            raise ValueError(f"explore_max_impressions must be an integer >= 1, got {explore_max_impressions!r}")
        self.explore_max_impressions = explore_max_impressions
        from .profiles import ProfileConfig

        if profiles is None or profiles is False:
            self._profile_config = None
        elif profiles is True:
            self._profile_config = ProfileConfig()
        elif isinstance(profiles, ProfileConfig):
            self._profile_config = profiles
        elif isinstance(profiles, Mapping):
            self._profile_config = ProfileConfig(**profiles)
        else:
            raise TypeError(f"profiles must be True, a ProfileConfig or a mapping of its fields, got "
                            f"{type(profiles).__name__}")
        self._profile_default = profiles is True
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self._explore_lock = threading.Lock()
        self.ort_threads, self.num_threads, self.verify, self._index = ort_threads, num_threads, verify, index
        self.catalogue = None                      # set below, once the first version is loaded
        self._cat_lock = threading.RLock()      # catalogue changes; a swap publishes its version under it
        self.batch_threads = batch_threads if batch_threads is not None else num_threads
        self._ranking_precision, self._scan_memory = ranking_precision, scan_memory
        if events is not None and event_log is not None:
            raise ValueError("give events= or its older name event_log=, not both")
        events = events if events is not None else event_log
        self.impression_sample = float(impression_sample)
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {type(clock).__name__}")
        self._clock = clock or time.time
        if isinstance(hybrid_max_events, bool) or not isinstance(hybrid_max_events, int) or hybrid_max_events < 0:
            raise ValueError(f"hybrid_max_events must be an integer >= 0, got {hybrid_max_events!r}")
        self.hybrid_max_events = hybrid_max_events
        self._encoder_path, self._encoder = content_encoder, None
        self._version = self._load_version(path)
        self.catalogue = Catalogue()
        self._candidate: _Version | None = None
        self._candidate_fraction = 0.0
        if candidate is not None:
            self.set_candidate(candidate, candidate_fraction)
        store = None if events is None else open_store(events, durable=durable or fsync,
                                                       retention_days=retention_days)
        self.events: EventStore | None = store
        try:
            self.online = OnlineState(store, window_days=window_days, follow_s=follow_events_s,
                                      owns_store=not isinstance(events, EventStore))
        except BaseException:
            if store is not None and not isinstance(events, EventStore):
                store.close()
            raise
        self._swap_lock = threading.Lock()
        if store is not None:            # the living catalogue as stored: replayed in order
            for ev in store.read(kinds=["item_added", "item_removed"]):
                if ev.kind == "item_added":
                    a = ev.attrs or {}
                    vec, content = a.get("vector"), a.get("content")
                    self.catalogue.add(ev.item, None if vec is None else np.asarray(vec, np.float32),
                                       a.get("features"), None if content is None else np.asarray(content, np.float32),
                                       a.get("text"))
                else:
                    self.catalogue.remove(ev.item)
            for ver in (self._version, self._candidate):
                if ver is not None:
                    self._apply_catalogue(ver)
        for ver in (self._version, self._candidate):
            if ver is not None:
                self._attach_profiles(ver)

    def _load_version(self, path) -> _Version:
        v = _Version(resolve_bundle(Path(path)), ort_threads=self.ort_threads, verify=self.verify,
                     index=self._index,
                     # recommend_batch ranks with as many ONNX Runtime threads as its top-k uses (0: all cores)
                     batch_threads=self.batch_threads if self.batch_threads is not None else 0,
                     ranking_precision=self._ranking_precision, scan_memory=self._scan_memory,
                     # a request's ranking runs its candidates as row chunks on as many threads as its top-k
                     request_threads=threads_arg(self.num_threads) or default_num_threads())
        if getattr(self, "catalogue", None) is not None:
            self._apply_catalogue(v)
        if getattr(self, "online", None) is not None:      # a swap / candidate (at start: after the store opens)
            self._attach_profiles(v)
        return v

    def _added_features(self, v: _Version, start: int) -> dict:
        """``{id: features}`` of the items added online that ``v`` holds at ids ``>= start``."""
        added = self.catalogue.added if self.catalogue is not None else {}
        if not added:
            return {}
        keys = list(added)
        ids = _lookup_ids(v.item_keys, keys)
        return {int(i): added[k].get("features") for k, i in zip(keys, ids.tolist()) if i >= start}

    def _attach_profiles(self, v: _Version) -> None:
        """``v.profiles``: the users' profiles over ``v``'s items, built from the event store."""
        v.profiles = None
        if self._profile_config is None:
            return
        from .profile_serving import ServingProfiles

        config = self._profile_config
        trained = (v.ranking.bundle.meta.get("profile_config") if v.ranking is not None else None) or {}
        if trained and self._profile_default:      # the settings the ranking model's profile features had
            from .profiles import ProfileConfig

            config = ProfileConfig(**{k: trained[k] for k in ("half_life_days", "min_events", "kind_weights")
                                      if k in trained})
        v.profiles = ServingProfiles(v, self.events, config, self._clock, added=self._added_features(v, 0))

    def _refresh_profiles(self) -> None:
        """After add_items: the profiles' item table rebuilt in the background for the new items."""
        for ver in (self._version, self._candidate):
            sp = getattr(ver, "profiles", None) if ver is not None else None
            if sp is not None:
                n0 = sp.items.n_items
                threading.Thread(target=sp.refresh_items, args=(self._added_features(ver, n0),),
                                 name="rec-engine-profile-items", daemon=True).start()

    def profile(self, user, top: int = 10) -> dict | None:
        """``user``'s profile (engine option ``profiles``): ``tags`` (the ``top`` interest tags with their decayed
        affinities, best first), ``vectors`` (the decayed mean of the content and collaborative vectors of
        what the user touched), ``counts`` (events per kind), ``first_ts`` / ``last_ts``, ``n_positive``; None
        for a user with fewer than the profile's ``min_events`` events. See :mod:`rec_engine.profiles`."""
        v = self._version_for(user)
        sp = getattr(v, "profiles", None)
        if sp is None:
            raise RecEngineError("this engine keeps no profiles: Engine.load(..., profiles=True)")
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"top must be an integer >= 0, got {top!r}")
        return sp.profile(self._check_user(v, user), top=top)

    def _apply_catalogue(self, v: _Version) -> None:
        """The engine's catalogue applied to version ``v`` (at load, swap, restart): added items ``v`` does
        not hold join it with their stored vector when its dimension is the version's (an item ``v`` holds
        keeps ``v``'s own vector); removed keys are excluded. ``v.catalogue_skipped``: added items left out
        (no vector of the right dimension)."""
        added, removed = self.catalogue.snapshot()
        v.catalogue_skipped = 0
        if not added and not removed:
            return
        with self._cat_lock:
            view = v.items_view()
            if added:
                keys = [k for k, _ in added]
                held = v.item_keys.lookup(keys) >= 0
                r = v.retrieval
                dim = None if r is None or not r.scans_vectors else r.items.shape[1]
                vecs, ok, cont = [], [], []
                for j, (k, rec) in enumerate(added):
                    if held[j] or dim is None:
                        continue
                    c = rec.get("content")
                    if c is not None and v.content_map is not None and len(c) + 1 == v.content_map.shape[0]:
                        vec = v.map_content(c[None, :])[0]          # the text, through this version's map
                    elif rec["vector"] is not None and len(rec["vector"]) == dim:
                        vec = rec["vector"]
                    else:
                        continue
                    ok.append(j)
                    vecs.append(vec)
                    cont.append(c)
                v.catalogue_skipped = int((~held).sum()) - len(ok)
                if ok:
                    width = (v.content_vectors.shape[1] if v.content_vectors is not None else
                             v.ranking.content.dim if v.ranking is not None and v.ranking.content is not None
                             else None)
                    content = None if width is None else np.stack(
                        [c if c is not None and len(c) == width else np.zeros(width, np.float32) for c in cont])
                    view.apply_add([keys[j] for j in ok], np.stack(vecs), [added[j][1]["features"] for j in ok],
                                   content)
            view.set_removed(sorted(removed, key=str) if removed else [])

    @classmethod
    def check_options(cls, **options) -> None:
        """Check option names and values without loading anything (TypeError for an unknown option,
        ValueError for a bad value), as a server that starts several processes does once."""
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) - {"self", "path"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown Engine options: {', '.join(unknown)}")
        if options.get("scan_memory", "copy") not in ("copy", "mmap"):
            raise ValueError(f"scan_memory must be 'copy' or 'mmap', got {options['scan_memory']!r}")
        if options.get("index") is not None and options["index"] not in INDEX_PRECISIONS:
            raise ValueError(f"index must be one of {INDEX_PRECISIONS}, got {options['index']!r}")
        if options.get("ranking_precision") is not None and options["ranking_precision"] not in RANKING_PRECISIONS:
            raise ValueError(f"ranking_precision must be one of {RANKING_PRECISIONS}, "
                             f"got {options['ranking_precision']!r}")
        rate = options.get("impression_sample", 1.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"impression_sample must be in [0, 1], got {rate!r}")
        for name in ("window_days", "retention_days", "follow_events_s"):
            got = options.get(name)
            if got is not None and (isinstance(got, bool) or not isinstance(got, (int, float)) or not got > 0):
                raise ValueError(f"{name} must be a number > 0, got {got!r}")
        if options.get("num_threads") is not None:
            threads_arg(options["num_threads"])     # (TypeError / ValueError naming num_threads)
        bt = options.get("batch_threads")
        if bt is not None and (isinstance(bt, bool) or not isinstance(bt, int) or bt < 1):
            raise ValueError(f"batch_threads must be an integer >= 1, got {bt!r}")
        frac = options.get("candidate_fraction", 0.0)
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ValueError(f"candidate_fraction must be in [0, 1], got {frac!r}")
        if frac and options.get("candidate") is None:
            raise ValueError("candidate_fraction needs a candidate bundle")

    @classmethod
    def load(cls, path, **options) -> "Engine":
        """Load the bundle at ``path`` (see :class:`Engine` for the options)."""
        return cls(path, **options)

    @property
    def version(self) -> str:
        return self._version.id

    @property
    def index(self) -> dict:
        """The current version's retrieval scan: ``{"precision": ...}``, with the recall of the exact top
        ``recall_at`` measured when the bundle's index was built (``recall``, ``recall_min``, ``recall_users``)
        and, for an int8 / bf16 index, ``exact`` (True: every shortlist is checked, see
        :class:`~rec_engine.topk.ItemIndex`) with the queries scanned so far and how many of them failed the
        check and were rescanned (``queries``, ``rescans``). A float32 scan whose batches go through the bf16
        screen (:meth:`recommend_batch`) adds ``batch_screen``: the batch size from which they do, and the
        queries screened and rescanned so far."""
        v = self._version
        info = dict(v.index)
        idx = getattr(v.retrieval, "index", None) if v.retrieval is not None else None
        if idx is not None:
            info.update(exact=idx.exact, queries=idx.queries, rescans=idx.rescans)
        screen = getattr(v.retrieval, "_screen", None) if v.retrieval is not None else None
        if idx is None and screen is not None and screen[1] is not None and v.retrieval.screen_min_batch:
            info["batch_screen"] = {"precision": "bf16", "min_batch": int(v.retrieval.screen_min_batch),
                                    "queries": screen[1].queries, "rescans": screen[1].rescans}
        return info

    @property
    def ranking_info(self) -> dict:
        """The current version's ranking precision (``{"precision": ...}``), with its agreement with the
        float32 model when the bundle stored an int8 one (``max_abs_diff`` of probabilities, ``top_overlap``)."""
        return dict(self._version.ranking_info)

    @property
    def n_items(self) -> int | None:
        return self._version.n_items

    @property
    def item_keys(self) -> KeyMap:
        """The current version's item keys (:class:`~rec_engine.keys.KeyMap`)."""
        return self._version.item_keys

    @property
    def user_keys(self) -> KeyMap:
        """The current version's user keys (:class:`~rec_engine.keys.KeyMap`)."""
        return self._version.user_keys

    # ------------------------------------------------------------------ requests
    def _check_user(self, v: _Version, user):
        """The user's key, checked for the version's key type (TypeError otherwise)."""
        if isinstance(user, np.generic):
            user = user.item()
        want = str if v.user_keys.kind == "str" else int
        if isinstance(user, bool) or not isinstance(user, want):
            raise TypeError(f"user must be {'a string' if want is str else 'an integer'} key, "
                            f"got {type(user).__name__}")
        return user

    @staticmethod
    def _item_ids(v: _Version, items, name: str) -> np.ndarray:
        """Dense ids of the item keys ``items`` (UnknownKeyError naming an unknown one, TypeError for keys
        of the wrong type)."""
        if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
            raise TypeError(f"{name} must be a sequence of item keys, got {type(items).__name__}")
        if isinstance(items, np.ndarray) and items.dtype.kind not in "iuUO" and items.size:
            raise TypeError(f"{name} must be item keys, got an array of dtype {items.dtype}")
        if isinstance(items, np.ndarray) and items.dtype.kind == "U":
            items = items.tolist()
        try:
            return v.item_keys.ids(items, what="item")
        except UnknownKeyError as e:
            raise UnknownKeyError(f"{name}: {e}") from None
        except TypeError as e:
            raise TypeError(f"{name}: {e}") from None

    def recommend(self, user, k: int = 10, *, exclude_seen: bool = True, exclude=None, candidates=None,
                  context: Mapping[str, Any] | None = None, n_candidates: int | None = None,
                  diversity: float | None = None, debias: float | None = None,
                  explore: float | None = None, explain: bool = False) -> Recommendation:
        """Top ``k`` items for ``user``: retrieval of ``n_candidates`` items by top-k (or the given
        ``candidates``), then ranking by the CTR model when the bundle has one.

        Parameters
        ----------
        user : int or str
            The user's key; a key the model does not know (and that has no observed events) gets the
            cold-start fallback: popular items, ranked by the CTR model from ``context`` if there is one.
        k : int
            Items to return (at most the catalogue; padded with id -1 / score -inf when fewer are left).
        exclude_seen : bool
            Skip items the user interacted with (training data and observed events).
        exclude : sequence of item keys, optional
            Never return these items.
        candidates : sequence of item keys, optional
            Restrict the result to these items.
        context : mapping, optional
            Feature values for the ranking model's context fields (and the user's fields when the
            model does not know the user).
        n_candidates : int, optional
            Items retrieved for the ranking stage (default: the pipeline's setting).
        diversity, debias : float, optional
            Re-ranking of the ranked candidates for this request (default: the engine's settings; 0: off):
            maximal marginal relevance over the items' vectors, and popularity debiasing by exposure
            (:func:`rec_engine.longtail.rerank`). The scores stay the model's; only the order changes.
        explore : float, optional
            Share of the ``k`` slots (default: the engine's setting; 0: off) for items with few impressions,
            chosen by Thompson sampling (:class:`~rec_engine.longtail.ThompsonExplorer`) among the retrieved
            candidates and the items added online; ``rec.explored`` marks those slots.
        explain : bool
            ``rec.explanations``: for each item, the user's profile tags that matched it with their
            contributions, highest first (engine option ``profiles``; [] for an item no tag of the user's
            profile matched, or a user without a profile).
        """
        v = self._version_for(user)
        user = self._check_user(v, user)
        rec = self._recommend(v, user, k, exclude_seen, exclude, candidates, context,
                              n_candidates, self._tail_options(diversity, debias, explore))
        if explain:
            sp = getattr(v, "profiles", None)
            if sp is None:
                raise RecEngineError("explain=True needs profiles: Engine.load(..., profiles=True)")
            rec.explanations = sp.explain(user, rec.ids)
        self._log_impressions([rec], context)
        return rec

    @staticmethod
    def _pair(v: "_Version", user, ids: np.ndarray) -> dict | None:
        """The ranking model's per-candidate profile features (pair fields ``profile_<feature>``, see
        :data:`rec_engine.profiles.FEATURE_NAMES`) of ``user``: the same affinity_features that training
        computed as of each example's time (zeros without a profile)."""
        r = v.ranking
        if r is None or not r.pair_fields:
            return None
        from .profiles import FEATURE_NAMES

        sp = getattr(v, "profiles", None)
        feats = sp.features(user, ids) if sp is not None else np.zeros((len(ids), len(FEATURE_NAMES)), np.float32)
        return {f"profile_{n}": feats[:, j] for j, n in enumerate(FEATURE_NAMES) if f"profile_{n}" in r.pair_fields}

    def _tail_options(self, diversity, debias, explore) -> tuple[float, float, float]:
        return (self.diversity if diversity is None else _unit(diversity, "diversity"),
                self.debias if debias is None else _unit(debias, "debias"),
                self.explore if explore is None else _unit(explore, "explore"))

    # ------------------------------------------------------------------ the long tail (rec_engine.longtail)
    def _explorer(self, v: "_Version"):
        """The version's exploration counters, filled from the event store on first use (impressions and
        clicks/conversions of the items it holds), grown to the items added since."""
        ex = getattr(v, "explorer", None)
        if ex is None:
            with self._explore_lock:
                ex = getattr(v, "explorer", None)
                if ex is None:
                    from .longtail import ThompsonExplorer

                    ex = ThompsonExplorer(v.n_items or 0, max_impressions=self.explore_max_impressions)
                    if self.events is not None:
                        self.events.flush()
                        shown, clicked = [], []
                        for kind, item, items in self.events.scan(["kind", "item", "items"],
                                                                  kinds=["impression", "click", "conversion"],
                                                                  decode=True):
                            if kind == "impression":
                                shown.extend(items or ())
                            else:
                                clicked.append(item)
                        for keys, imp, clk in ((shown, 1, 0), (clicked, 0, 1)):
                            ids = _lookup_ids(v.item_keys, keys)
                            ids = ids[(ids >= 0) & (ids < ex.n_items)]
                            ex.update(ids, imp, clk)
                        ex.fit_prior()
                    v.explorer = ex
        if ex.n_items < (v.n_items or 0):
            ex.grow(v.n_items)
        return ex

    def _long_tail(self, v: "_Version", ids: np.ndarray, scores: np.ndarray, k: int, seen, options,
                   score_more=None):
        """The ranked candidates (best first) re-ranked and explored per ``options`` (diversity, debias,
        explore); returns ``(ids, scores, explored mask or None)`` of at most ``k`` items."""
        diversity, debias, explore = options
        explored = None
        if (diversity or debias) and len(ids) > 1:
            from .longtail import rerank

            vecs = None
            if diversity:
                table = v.content_vectors if v.content_vectors is not None else (
                    v.retrieval.items if v.retrieval is not None and v.retrieval.scans_vectors else None)
                if table is not None and int(ids.max()) < len(table):
                    vecs = np.asarray(table[ids], np.float32)
            exposure = None
            if debias:
                exposure = np.zeros(len(ids), np.float64)
                pop = v.popular
                if pop is not None:
                    inside = ids < len(pop)
                    exposure[inside] = pop[ids[inside], 0]
                if getattr(v, "explorer", None) is not None:
                    exposure += v.explorer.impressions_of(ids)
            order = rerank(np.asarray(scores, np.float64), k, vectors=vecs, exposure=exposure,
                           diversity=diversity if vecs is not None else 0.0, debias=debias)
            ids, scores = ids[order], scores[order]
        if explore and k > 0:
            ex = self._explorer(v)
            pool = ids[k:]
            n_trained = len(v.popular) if v.popular is not None else (v.n_items or 0)
            if (v.n_items or 0) > n_trained:                      # items added online: all of them may be tried
                pool = np.concatenate([pool, np.arange(n_trained, v.n_items, dtype=np.int64)])
            excl = ids[:k] if seen is None or not len(seen) else np.concatenate([ids[:k], seen])
            with self._rng_lock:
                chosen = ex.choose(k, explore, self._rng, exclude=excl, candidates=pool)
                if len(chosen):
                    final, explored = ex.blend(ids[:k], chosen, k, self._rng)
            if len(chosen):
                score_of = dict(zip(ids.tolist(), np.asarray(scores).tolist()))
                unscored = np.array([i for i in final.tolist() if i not in score_of], np.int64)
                if len(unscored):     # items added online outside the candidates: scored by the model
                    more = score_more(unscored) if score_more is not None else None
                    fill = more if more is not None else np.full(len(unscored), float(np.min(scores)))
                    score_of.update(zip(unscored.tolist(), np.asarray(fill, np.float64).tolist()))
                ids = final
                scores = np.array([score_of[i] for i in final.tolist()], np.float32)
            else:
                ids, scores = ids[:k], scores[:k]
        return ids[:k], scores[:k], explored

    def recommend_batch(self, users: Sequence, k: int = 10, *, exclude_seen: bool = True, exclude=None,
                        candidates=None, context: Mapping[str, Any] | None = None,
                        contexts: Sequence[Mapping[str, Any] | None] | None = None,
                        n_candidates: int | None = None, diversity: float | None = None,
                        debias: float | None = None, explore: float | None = None) -> list[Recommendation]:
        """:meth:`recommend` for several users, all answered by one version, through the batched core calls:
        the user vectors in one lookup, one top-k over all users (per-user exclusion lists), and the ranking
        of every user's candidates in one feature lookup and one ONNX call per chunk of about 16k examples.
        Each answer equals what :meth:`recommend` returns for that user alone (the batched top-k sums a
        score's terms in another order, so a retrieval score can differ in its last bit).

        ``context`` applies to every user, ``contexts`` gives one per user (not both); the other options
        apply to every user. ``candidates`` (or a bundle without retrieval) answers user by user. The
        timings of each answer are those of the whole batch (``batch_size`` says how many users). Under
        A/B serving each version answers its own users in one batch."""
        if isinstance(users, (str, bytes, Mapping)) or not hasattr(users, "__len__"):
            raise TypeError(f"users must be a sequence of user keys, got {type(users).__name__}")
        users = list(users)
        tail = self._tail_options(diversity, debias, explore)
        cand = self._candidate
        if cand is not None and self._candidate_fraction > 0:
            on_cand = [self._in_candidate(u) for u in users]
            if any(on_cand):
                if contexts is not None and (isinstance(contexts, Mapping) or not hasattr(contexts, "__len__")
                                             or len(contexts) != len(users)):
                    raise ValueError("contexts must be a sequence with one mapping per user")
                out: list = [None] * len(users)
                for flag, ver in ((False, self._version), (True, cand)):
                    idx = [j for j, c in enumerate(on_cand) if c == flag]
                    if not idx:
                        continue
                    got = self._recommend_batch(ver, [users[j] for j in idx], k, exclude_seen, exclude,
                                                candidates, context,
                                                None if contexts is None else [contexts[j] for j in idx],
                                                n_candidates, tail)
                    for j, r in zip(idx, got):
                        out[j] = r
                self._log_impressions(out, list(contexts) if contexts is not None else context)
                return out
        out = self._recommend_batch(self._version, users, k, exclude_seen, exclude, candidates, context,
                                    contexts, n_candidates, tail)
        self._log_impressions(out, list(contexts) if contexts is not None else context)
        return out

    def _recommend_batch(self, v: _Version, users: list, k, exclude_seen, exclude, candidates, context,
                         contexts, n_candidates, tail=(0.0, 0.0, 0.0)) -> list[Recommendation]:
        checked = [self._check_user(v, u) for u in users]
        if contexts is not None:
            if context is not None:
                raise ValueError("give context (one for every user) or contexts (one per user), not both")
            if isinstance(contexts, Mapping) or not hasattr(contexts, "__len__"):
                raise TypeError(f"contexts must be a sequence of mappings, got {type(contexts).__name__}")
            contexts = list(contexts)
            if len(contexts) != len(checked):
                raise ValueError(f"contexts has {len(contexts)} entries for {len(checked)} users")
            for j, c in enumerate(contexts):
                if c is not None and not isinstance(c, Mapping):
                    raise TypeError(f"contexts[{j}] must be a mapping or None, got {type(c).__name__}")
        else:
            contexts = [context] * len(checked)
        self._check_k(k)
        if candidates is not None or v.retrieval is None or any(tail) or (
                v.ranking is not None and v.ranking.pair_fields):   # re-ranked / explored / pair fields: one by one
            return [self._recommend(v, u, k, exclude_seen, exclude, candidates, c, n_candidates, tail)
                    for u, c in zip(checked, contexts)]
        if not checked:
            return []
        t0 = time.perf_counter()
        extra = None if exclude is None else self._item_ids(v, exclude, "exclude")
        removed = v.removed_ids
        if len(removed):
            extra = removed if extra is None else np.concatenate([extra, removed])
        states = [v.user_state(u, self.online) for u in checked]
        excludes = []
        for st in states:
            seen = v.retrieval.seen(st) if exclude_seen else None
            if extra is not None:
                seen = extra if seen is None else np.concatenate([seen, extra])
            excludes.append(seen if seen is not None else _NO_IDS)
        n = k if v.ranking is None else max(k, n_candidates or v.n_candidates)
        results = v.retrieval.retrieve_batch(states, n, excludes=excludes, num_threads=self.batch_threads)
        if v.content_vectors is not None and self.hybrid_max_events:
            results = [self._hybrid(v, st, n, ex, r) for st, ex, r in zip(states, excludes, results)]
        fallback = [r is None for r in results]
        if any(fallback) and v.popular is None:
            user = checked[fallback.index(True)]
            raise RecEngineError(f"user {user!r} is unknown and the bundle has no popularity to fall back on")
        ids_list, scores_list = [], []
        for j, r in enumerate(results):
            if r is None:
                r = v.popular_items(n, excludes[j])
            keep = r.ids >= 0
            ids_list.append(r.ids[keep])
            scores_list.append(r.scores[keep])
        timings = {"retrieval_ms": (time.perf_counter() - t0) * 1e3}
        if v.ranking is not None:
            t1 = time.perf_counter()
            ruids = [v.ranking_user_keys.id(u) if v.ranking_user_keys is not None else st.uid
                     for u, st in zip(checked, states)]
            def best(j: int, p: np.ndarray):      # on the thread that scored user j (see score_candidates_batch)
                ids = ids_list[j]
                order = _best_first(ids, p, k)
                return ids[order], p[order]

            for j, (ids, p) in enumerate(v.ranking.score_candidates_batch(ruids, ids_list, contexts, then=best,
                                                                          top=k if k >= 1 else None)):
                ids_list[j], scores_list[j] = ids, p
            timings["ranking_ms"] = (time.perf_counter() - t1) * 1e3
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        timings["batch_size"] = len(checked)
        return [self._finish(v, u, ids, scores, k, fb, dict(timings))
                for u, ids, scores, fb in zip(checked, ids_list, scores_list, fallback)]

    @staticmethod
    def _check_k(k) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an integer, got {type(k).__name__}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")

    @staticmethod
    def _finish(v: _Version, user, ids: np.ndarray, scores: np.ndarray, k: int, fallback: bool,
                timings: dict) -> Recommendation:
        """The answer: the best ``k`` (padded with id -1 / score -inf)."""
        ids, scores = ids[:k], scores[:k].astype(np.float32)
        if len(ids) < k:
            pad = k - len(ids)
            ids = np.concatenate([ids, np.full(pad, -1, np.int64)])
            scores = np.concatenate([scores, np.full(pad, -np.inf, np.float32)])
        return Recommendation(user, ids, scores, v.id, fallback, timings, v.item_keys)

    def _recommend(self, v: _Version, user, k: int, exclude_seen: bool, exclude, candidates, context,
                   n_candidates, tail=(0.0, 0.0, 0.0)) -> Recommendation:
        self._check_k(k)
        t0 = time.perf_counter()
        timings = {}
        cand = None if candidates is None else self._item_ids(v, candidates, "candidates")
        state = v.user_state(user, self.online)
        seen = None
        if exclude_seen:
            seen = v.retrieval.seen(state) if v.retrieval is not None else state.observed
        if exclude is not None:
            extra = self._item_ids(v, exclude, "exclude")
            seen = extra if seen is None else np.concatenate([seen, extra])
        removed = v.removed_ids
        if len(removed):
            seen = removed if seen is None else np.concatenate([seen, removed])
        fallback = False
        if v.retrieval is not None:
            n = k if v.ranking is None else max(k, n_candidates or v.n_candidates)
            res = v.retrieval.retrieve(state, n, exclude=seen, candidates=cand, num_threads=self.num_threads)
            if cand is None:
                res = self._hybrid(v, state, n, seen, res)
            if res is None:       # a user the model cannot describe: popular items
                if v.popular is None:
                    raise RecEngineError(f"user {user!r} is unknown and the bundle has no popularity to fall back on")
                pop = v.popular
                if cand is not None and len(cand) and cand.max() >= len(pop):   # items added online: count 0
                    cand = cand[cand < len(v.retrieval.items)]      # those in the table this request may rank
                    pop = np.concatenate([pop, np.zeros((len(v.retrieval.items) - len(pop), 1), np.float32)])
                res = (v.popular_items(n, seen) if cand is None else
                       topk(np.ones(1, np.float32), pop, n,
                            exclude=None if seen is None else seen[seen < len(pop)], candidates=cand,
                            num_threads=self.num_threads))
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
        long_tail = any(tail)
        if v.ranking is not None:
            t1 = time.perf_counter()
            ruid = v.ranking_user_keys.id(user) if v.ranking_user_keys is not None else state.uid
            probs = v.ranking.score_candidates(ruid, ids, context, self._pair(v, user, ids),
                                               top=None if long_tail or k < 1 else k)
            order = np.lexsort((ids, -probs)) if long_tail else _best_first(ids, probs, k)
            ids, scores = ids[order], probs[order]
            timings["ranking_ms"] = (time.perf_counter() - t1) * 1e3
        explored = None
        if long_tail:
            t2 = time.perf_counter()
            if scores is None:        # a ranking-only bundle always ranks; retrieval-only keeps its order
                scores = np.zeros(len(ids), np.float32)
            more = None
            if v.ranking is not None:
                def more(extra, _u=ruid, _c=context):
                    return v.ranking.score_candidates(_u, extra, _c, self._pair(v, user, extra))
            ids, scores, explored = self._long_tail(v, ids, scores, k, seen, tail, more)
            timings["rerank_ms"] = (time.perf_counter() - t2) * 1e3
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        rec = self._finish(v, user, ids, scores, k, fallback, timings)
        if explored is not None:
            rec.explored = np.concatenate([explored, np.zeros(k - len(explored), bool)])
        return rec

    _RRF = 60.0          # reciprocal rank fusion's constant (Cormack et al.): score = sum of 1 / (60 + rank)

    def _hybrid(self, v: _Version, state, n: int, exclude, res: TopK | None) -> TopK | None:
        """Retrieval for a user with few events (see ``hybrid_max_events``): the ``n`` items nearest to the
        user's profile vector (the engine's ``profiles``: the decayed, event-weighted mean text vector of what
        it touched; without profiles the plain mean text vector of its items), fused with the collaborative
        answer ``res`` by reciprocal rank (the content half alone when ``res`` is None). Other users: ``res``
        unchanged."""
        cv = v.content_vectors
        if cv is None or not self.hybrid_max_events:
            return res
        events = v.retrieval.seen(state)
        if not 0 < len(events) <= self.hybrid_max_events:
            return res
        events = events[events < len(cv)]
        sp = getattr(v, "profiles", None)
        st = sp.profiles.get(state.key) if sp is not None and "content" in sp.items.spaces else None
        if st is not None and st.vectors.get("content") is not None and np.any(st.vectors["content"]):
            profile = np.asarray(st.vectors["content"], np.float64)     # the profile's preference vector
        else:
            profile = cv[events].sum(axis=0)
        norm = float(np.linalg.norm(profile))
        if not len(events) or norm == 0.0:
            return res
        ex = None if exclude is None or not len(exclude) else exclude[exclude < len(cv)]
        content = topk((profile / norm).astype(np.float32), cv, n, exclude=ex, num_threads=self.num_threads)
        fused: dict = {}
        for part in (content, res):
            if part is None:
                continue
            for rank, i in enumerate(part.ids.tolist()):
                if i >= 0:
                    fused[i] = fused.get(i, 0.0) + 1.0 / (self._RRF + rank + 1)
        if not fused:
            return res
        ids = np.fromiter(fused.keys(), np.int64, len(fused))
        scores = np.fromiter(fused.values(), np.float64, len(fused)).astype(np.float32)
        order = np.lexsort((ids, -scores))[:n]
        return TopK(ids[order], scores[order])

    # ------------------------------------------------------------------ feedback
    def _log_impressions(self, recs: list[Recommendation], contexts) -> None:
        """Give each answer its request id and log its impression (sampled; with the request's context in
        ``attrs["context"]``, which the offline update needs to rebuild the ranking examples) without waiting
        for the commit. ``contexts``: one mapping (or None) for all, or a list with one per answer."""
        store, rate = self.events, self.impression_sample
        events = []
        for j, rec in enumerate(recs):
            rec.request_id = request_id(rec.version)
            for ver in (self._version, self._candidate):       # exploration counts every impression
                ex = getattr(ver, "explorer", None)
                if ex is not None and ver.id == rec.version:
                    shown = rec.ids[(rec.ids >= 0) & (rec.ids < ex.n_items)]
                    ex.update(shown, 1, 0)
            if store is not None and rate > 0 and (rate >= 1 or random.random() < rate):
                real = rec.ids >= 0
                ctx = contexts[j] if isinstance(contexts, list) else contexts
                attrs = {"context": dict(ctx)} if ctx else {}
                if rec.explored is not None and rec.explored.any():
                    attrs["explored"] = np.flatnonzero(rec.explored[real]).tolist()
                events.append(Event("impression", rec.user, items=rec.items[real], scores=rec.scores[real],
                                    ts=self._clock(), request_id=rec.request_id, version=rec.version,
                                    attrs=attrs or None))
        if events:
            try:
                store.append(events, wait=False)
            except (TypeError, ValueError):     # a context that is not JSON: the impression without it
                store.append([Event(e.kind, e.user, items=e.items, scores=e.scores, ts=e.ts,
                                    request_id=e.request_id, version=e.version) for e in events], wait=False)

    def observe(self, user, items: Sequence, *, kind: str = "click", request_id: str | None = None,
                value: float | None = None, attrs: Mapping | None = None, ts: float | None = None) -> None:
        """Record that ``user`` interacted with ``items`` (item keys, in time order; ``kind``: "click" (the
        default), "conversion" or "rating"). At once: the items join the user's seen set (excluded from
        then on), its SASRec history, and its LightGCN vector is folded in anew; the events are committed to
        the event store before this returns. ``request_id`` ties them to the recommendation they answer;
        ``value``: a conversion's value or a rating; ``attrs``: free-form JSON attributes. An unknown item key
        is an :class:`~rec_engine.keys.UnknownKeyError` and nothing is recorded."""
        v = self._version
        user = self._check_user(v, user)
        ids = self._item_ids(v, items, "items")
        if ids.size == 0:
            raise ValueError("observe needs at least one item")
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id).__name__}")
        keys = items.tolist() if isinstance(items, np.ndarray) else list(items)
        self.online.observe(user, keys, kind=kind, request_id=request_id, value=value, attrs=attrs,
                            ts=self._clock() if ts is None else ts)
        now = self._clock() if ts is None else ts
        for ver in (v, self._candidate):
            sp = getattr(ver, "profiles", None) if ver is not None else None
            if sp is not None:
                sp.observe(user, ids if ver is v else _lookup_ids(ver.item_keys, keys), kind, now, value)
        if kind in ("click", "conversion"):
            for ver in (v, self._candidate):
                ex = getattr(ver, "explorer", None)
                if ex is not None:
                    got = ids if ver is v else _lookup_ids(ver.item_keys, keys)
                    ex.update(got[(got >= 0) & (got < ex.n_items)], 0, 1)

    def feedback(self, user, item, *, kind: str = "click", request_id: str | None = None,
                 value: float | None = None, attrs: Mapping | None = None, ts: float | None = None) -> None:
        """One event on one item: a click, a conversion (``value``: its value) or a rating (``value``: the
        rating), with the ``request_id`` of the recommendation that showed it (see :meth:`observe`)."""
        if kind == "rating" and value is None:
            raise ValueError("a rating needs value= (the rating)")
        self.observe(user, [item], kind=kind, request_id=request_id, value=value, attrs=attrs, ts=ts)

    def forget(self, user) -> int:
        """Erase ``user``: every event in the store (the next offline update trains on none of them, and
        skips the user in its base data) and the online state; returns the number of events erased. The
        user is then served as one never seen (or as the model knows them from training)."""
        if isinstance(user, np.generic):
            user = user.item()
        if isinstance(user, bool) or not isinstance(user, (int, str)):
            raise TypeError(f"user must be an integer or string key, got {type(user).__name__}")
        n = self.online.forget(user)
        for ver in (self._version, self._candidate):
            if ver is not None:
                ver._observed.pop(user, None)
        return n

    def served_item_info(self, version: str) -> np.ndarray | None:
        """The self-information per item (see ``_Version.self_information``) of the version with id
        ``version`` if it is the current or the candidate one, else None (feedback metrics use it)."""
        for ver in (self._version, self._candidate):
            if ver is not None and ver.id == version:
                return ver.self_information()
        return None

    # ------------------------------------------------------------------ living catalogue
    @staticmethod
    def _key_list(keys) -> list:
        """Item keys as a list of Python ints / strs (TypeError for a single key or a mapping)."""
        keys = keys.tolist() if isinstance(keys, np.ndarray) else keys
        if isinstance(keys, (str, bytes, Mapping)) or not hasattr(keys, "__len__"):
            raise TypeError(f"keys must be a sequence of item keys, got {type(keys).__name__}")
        return [k.item() if isinstance(k, np.generic) else k for k in keys]

    def add_items(self, keys, *, vectors=None, text=None, features=None) -> np.ndarray:
        """Add items to the catalogue while serving: from the moment this returns they can be retrieved,
        ranked and observed. ``keys``: the new items' keys (the catalogue's key type); ``vectors``:
        float32 ``[n, d]`` in the retrieval model's item space, or ``text``: one string per item (title,
        genres, tags, description: :func:`rec_engine.content.item_text` builds one), encoded by the engine's
        ``content_encoder`` and mapped into the item space by the version's content map (a bundle trained
        with ``--items``), so a new item is served before anyone clicks it; ``features``: one mapping per
        item of the ranking model's item fields (category, tags, price, ...; missing ones are missing values).
        A key the version already holds keeps its own vector; a removed key comes back. Recorded in the
        event store (``item_added``), so a restart replays it; a swap re-applies it by key: through the new
        version's content map when the item came with text, else with its vector when the new version's
        item vectors have the same dimension. Returns the items' dense ids in the current version."""
        while True:
            v = self._version
            ids = self._add_items(v, keys, vectors, text, features)
            if ids is not None:
                return ids                   # else a swap published another version meanwhile: again on it

    def _add_items(self, v: _Version, keys, vectors, text, features) -> np.ndarray | None:
        keys = self._key_list(keys)
        if not keys:
            raise ValueError("add_items needs at least one key")
        if len(set(keys)) != len(keys):
            raise ValueError("add_items got the same key twice")
        r = v.retrieval
        if r is None or not r.scans_vectors or r.kind == "popularity":
            raise ValueError("add_items needs a retrieval model with item vectors (mf, lightgcn, ngcf, sasrec)")
        view = v.items_view()
        view.check_keys(keys)
        vecs = check_vectors(vectors, len(keys), r.items.shape[1])
        feats = check_features(features, len(keys))
        content = None
        if text is not None:
            if isinstance(text, str) or not hasattr(text, "__len__") or len(text) != len(keys):
                raise ValueError("text must be a sequence with one string per key")
            content = self.encode_text(list(text))
            if vecs is None:
                vecs = v.map_content(content)
        with self._cat_lock:
            if self._version is not v:
                return None
            ids = view.apply_add(keys, vecs, feats, content)
            cand = self._candidate
            if cand is not None and cand.retrieval is not None:
                cv = (cand.map_content(content) if content is not None and cand.content_map is not None
                      else vecs if vecs is not None and cand.retrieval.items.shape[1] == vecs.shape[1] else None)
                if cv is not None:
                    cand.items_view().apply_add(keys, cv, feats, content)
            for j, k in enumerate(keys):
                self.catalogue.add(k, None if vecs is None else vecs[j], feats[j],
                                   None if content is None else content[j], None if text is None else text[j])
            if self.catalogue.removed or len(v.removed_ids) or (cand is not None and len(cand.removed_ids)):
                removed = self.catalogue.removed_keys()      # a re-added key leaves the removed ids
                for ver in (v, cand):
                    if ver is not None and ver.catalogue is not None:
                        ver.catalogue.set_removed(removed)
        if self.events is not None:
            self.events.append([Event("item_added", "", k, ts=self._clock(), attrs={
                "vector": None if vecs is None else vecs[j].tolist(),
                **({"content": content[j].tolist(), "text": text[j]} if content is not None else {}),
                **({"features": dict(feats[j])} if feats[j] else {})}) for j, k in enumerate(keys)])
        self._refresh_profiles()
        return ids

    def item_keywords(self, item) -> list[str]:
        """The keyphrases of ``item`` (best first): stored by training (items option ``keywords=N``), or for an
        item added online with text, drawn from that text by the engine's content encoder; [] when neither."""
        v = self._version
        i = int(self._item_ids(v, [item], "item")[0])
        stored = read_string_lists(v.keywords, i)
        if stored is not None:
            return stored
        rec = self.catalogue.added.get(item.item() if isinstance(item, np.generic) else item)
        if rec is None or not rec.get("text") or self._encoder_path is None:
            return []
        self.encode_text([rec["text"]])              # loads (and checks) the encoder
        return [p for p, _ in self._encoder.keywords(rec["text"], rec.get("content"))]

    def item_labels(self, item) -> list[str]:
        """The genres and tags of ``item`` that training stored (an items file's lists); for an item added
        online, the ``labels`` of its features; [] when neither."""
        v = self._version
        i = int(self._item_ids(v, [item], "item")[0])
        stored = read_string_lists(v.labels, i)
        if stored is not None:
            return stored
        rec = self.catalogue.added.get(item.item() if isinstance(item, np.generic) else item)
        labels = ((rec or {}).get("features") or {}).get("labels")
        return [str(x) for x in labels] if isinstance(labels, (list, tuple)) else []

    def item_sentiment(self, item) -> float | None:
        """The mean VADER compound score in [-1, 1] of ``item``'s reviews (stored by training with the items
        option ``reviews_file``); None when it had none."""
        v = self._version
        i = int(self._item_ids(v, [item], "item")[0])
        if v.sentiment is None or i >= len(v.sentiment) or not np.isfinite(v.sentiment[i]):
            return None
        return float(v.sentiment[i])

    def encode_text(self, texts: list) -> np.ndarray:
        """Unit text vectors ``[n, c]`` of ``texts`` by the engine's content encoder (loaded at first use)."""
        if self._encoder is None:
            if self._encoder_path is None:
                raise ValueError("item text needs a content encoder: Engine.load(..., content_encoder=PATH) "
                                 "(a bundle written by `rec-engine content-encoder`)")
            from .content import ContentEncoder

            self._encoder = ContentEncoder.load(self._encoder_path)
        want = self._version.content_meta.get("encoder_weights_sha256")
        got = getattr(self._encoder, "meta", {}).get("weights_sha256")
        if want and got and want != got:       # text vectors of another model would be mapped as if ours
            raise ValueError(f"the content encoder {self._encoder_path} was exported from other weights "
                             f"({got[:12]}) than the bundle's content map was fitted with ({want[:12]})")
        return self._encoder.encode(texts)

    def remove_items(self, keys) -> None:
        """Withdraw items: once this returns, no answer contains them (retrieval, candidates, cold start,
        similar items). An unknown key is an :class:`~rec_engine.keys.UnknownKeyError` and nothing is
        removed. Recorded in the event store (``item_removed``); survives swaps and restarts by key."""
        v = self._version
        keys = self._key_list(keys)
        self._item_ids(v, keys, "items")
        with self._cat_lock:
            for k in keys:
                self.catalogue.remove(k)
            removed = self.catalogue.removed_keys()
            for ver in (self._version, self._candidate):
                if ver is not None:
                    ver.items_view().set_removed(removed)
        if self.events is not None:
            self.events.append([Event("item_removed", "", k, ts=self._clock()) for k in keys])

    # ------------------------------------------------------------------ neighbours
    def similar_items(self, items, k: int = 10, *, by: str = "collaborative", alpha: float = 0.5, exclude=None,
                      num_threads: int | None = None):
        """The ``k`` items most similar to each item of ``items`` (a key, or a sequence of keys: a list of
        answers, one top-k call for all of them), the item itself excluded (and ``exclude``, item keys, for
        every query). ``by``: ``"collaborative"``, the cosine of the retrieval model's item vectors (mf /
        lightgcn / ngcf); ``"content"``, the cosine of the items' text vectors (bundles trained with
        ``--items``; an item added with text a second ago has one); ``"blend"``, ``alpha`` x collaborative +
        (1 - alpha) x content, exact over the union of each side's top ``4k + 50``. Each answer is a
        :class:`Recommendation` whose ``user`` is the query item's key and whose ``scores`` are the
        similarities. An unknown key is an :class:`~rec_engine.keys.UnknownKeyError`."""
        if by not in ("collaborative", "content", "blend"):
            raise ValueError(f"by must be 'collaborative', 'content' or 'blend', got {by!r}")
        if by == "collaborative":
            return self._similar("item", items, k, exclude, num_threads)
        v = self._version
        if v.content_vectors is None:
            raise ValueError("similar items by content need a bundle with content vectors (train with --items)")
        if by == "content":
            return self._similar("content", items, k, exclude, num_threads)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        wide = max(4 * k + 50, k)
        single = isinstance(items, (str, int, np.integer)) and not isinstance(items, bool)
        cf = self._similar("item", [items] if single else items, wide, exclude, num_threads)
        ct = self._similar("content", [items] if single else items, wide, exclude, num_threads)
        unit, cv = v.unit_table("item"), v.content_vectors
        out = []
        for a, b in zip(cf, ct):
            q = int(v.item_keys.id(a.user))
            union = np.union1d(a.ids[a.ids >= 0], b.ids[b.ids >= 0])
            union = union[(union < len(unit)) & (union < len(cv))]
            s = (alpha * (unit[union] @ unit[q]) + (1 - alpha) * (cv[union] @ cv[q])).astype(np.float32)
            order = np.lexsort((union, -s))[:k]
            ids, sc = union[order], s[order]
            if len(ids) < k:
                ids = np.concatenate([ids, np.full(k - len(ids), -1, np.int64)])
                sc = np.concatenate([sc, np.full(k - len(sc), -np.inf, np.float32)])
            out.append(Recommendation(a.user, ids, sc, v.id, False, {}, v.item_keys))
        return out[0] if single else out

    def similar_users(self, users, k: int = 10, *, num_threads: int | None = None):
        """The ``k`` users most similar to each user of ``users`` (people to follow) by the cosine of the
        retrieval model's user vectors; a LightGCN user with observed events is compared by its folded-in
        vector. The user itself is excluded. Answers carry user keys in ``items`` (``ids``: the users'
        dense ids). A user the model cannot describe is an :class:`~rec_engine.keys.UnknownKeyError`."""
        return self._similar("user", users, k, None, num_threads)

    def _similar(self, side: str, keys, k, exclude, num_threads):
        v = self._version
        self._check_k(k)
        single = isinstance(keys, (str, int, np.integer)) and not isinstance(keys, bool)
        queries = [keys] if single else keys
        if isinstance(queries, (bytes, Mapping)) or not hasattr(queries, "__len__"):
            raise TypeError(f"{side}s must be a key or a sequence of keys, got {type(keys).__name__}")
        queries = queries.tolist() if isinstance(queries, np.ndarray) else list(queries)
        table = v.content_vectors if side == "content" else v.unit_table(side)
        if side in ("item", "content"):
            ids = self._item_ids(v, queries, "items")
            if len(ids) and ids.max() >= len(table):
                raise UnknownKeyError(f"items: item {queries[int(np.argmax(ids))]!r} is being added; ask again")
            q = table[ids]
            extra = None if exclude is None else self._item_ids(v, exclude, "exclude")
            if len(v.removed_ids):
                extra = v.removed_ids if extra is None else np.concatenate([extra, v.removed_ids])
            key_map = v.item_keys
        else:
            checked = [self._check_user(v, u) for u in queries]
            states = [v.user_state(u, self.online) for u in checked]
            vecs, known = v.retrieval.user_vectors(states)
            if not known.all():
                bad = checked[int(np.flatnonzero(~known)[0])]
                raise UnknownKeyError(f"users: the model has no vector for user {bad!r}")
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            q = np.ascontiguousarray(vecs / np.where(norms > 0, norms, 1.0), np.float32)
            ids = np.array([st.uid for st in states], np.int64)
            extra = None
            key_map = v.user_keys
        if not len(queries):
            return []
        lists = [np.array([i], np.int64) if i >= 0 else _NO_IDS for i in ids.tolist()]
        if extra is not None:
            lists = [np.concatenate([x, extra]) for x in lists]
        res = topk(np.ascontiguousarray(q, np.float32), table, k, exclude=IdLists.from_lists(lists),
                   num_threads=num_threads if num_threads is not None else self.num_threads)
        out = [Recommendation(qk, res.ids[j], res.scores[j], v.id, False, {}, key_map)
               for j, qk in enumerate(queries)]
        return out[0] if single else out

    # ------------------------------------------------------------------ A/B serving
    @staticmethod
    def _bucket(user) -> float:
        """The user's place in [0, 1), stable by a hash of the key (and its type)."""
        h = hashlib.blake2b(f"{type(user).__name__}:{user}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2.0**64

    def _in_candidate(self, user) -> bool:
        if isinstance(user, np.generic):
            user = user.item()
        return self._candidate is not None and self._bucket(user) < self._candidate_fraction

    def _version_for(self, user) -> _Version:
        return self._candidate if self._in_candidate(user) else self._version

    def set_candidate(self, path, fraction: float) -> str:
        """Serve the bundle at ``path`` to the share ``fraction`` of users (those whose key hashes below
        it: stable, so a user sees one version) beside the current version; returns its version id. The
        candidate must hold the same kind of keys. Replaces an earlier candidate."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"candidate_fraction must be in [0, 1], got {fraction!r}")
        new = self._load_version(path)
        if new.user_keys.kind != self._version.user_keys.kind and "dense" not in (
                new.user_keys.kind, self._version.user_keys.kind):
            raise BundleError(f"candidate {path} has {new.user_keys.kind} user keys, the current version "
                              f"{self._version.user_keys.kind} keys")
        self._candidate, self._candidate_fraction = new, float(fraction)
        return new.id

    def clear_candidate(self) -> None:
        """Stop A/B serving: every user gets the current version."""
        self._candidate, self._candidate_fraction = None, 0.0

    def promote_candidate(self) -> str:
        """Make the candidate the current version for every user; returns its id."""
        with self._swap_lock:
            if self._candidate is None:
                raise RecEngineError("no candidate version to promote")
            self._version, self._candidate, self._candidate_fraction = self._candidate, None, 0.0
            return self._version.id

    @property
    def ab(self) -> dict | None:
        """``{"control": id, "candidate": id, "fraction": f}`` while A/B serving, else None."""
        if self._candidate is None:
            return None
        return {"control": self._version.id, "candidate": self._candidate.id, "fraction": self._candidate_fraction}

    # ------------------------------------------------------------------ versions
    def swap(self, path) -> str:
        """Load the bundle at ``path`` beside the current one and switch to it atomically; return the new
        version id. Requests already running finish on the old version. If the new bundle fails to load,
        this raises and the old version keeps serving."""
        with self._swap_lock:
            new = self._load_version(path)
            with self._cat_lock:      # items added or removed while it loaded, then publish: none is missed
                self._apply_catalogue(new)
                self._version = new
            return new.id

    def close(self) -> None:
        self.online.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
