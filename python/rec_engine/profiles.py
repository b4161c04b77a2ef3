"""User profiles: time-decayed interest tags, preference vectors and activity counters per user, the basis
of personalized recommendation and of the ranking model's affinity features.

What a profile holds
--------------------
For a user with events ``e`` (item ``i_e``, kind ``k_e``, time ``t_e``, value ``v_e``):

- an event weight ``w_e = kind_weights[k_e]`` (default impression 0, click 1, conversion 3, rating 1), times
  ``rating_weight(v_e)`` for a rating (default ``clip((v - 2.5) / 2.5, -1, 1)``: a bad rating pushes tags
  down). Events of weight 0 only count in the counters;
- the **tag affinities** ``a_tag(now) = sum_e w_e * tw(i_e, tag) * 2 ** (-(now - t_e) / h)`` over the events
  whose item carries ``tag`` (``tw``: the item's weight of that tag, default ``1 / len(tags of the item)``;
  ``h``: the half-life in seconds). A tag is a genre, a tag or a keyphrase: strings outside, ids of a
  :class:`TagVocab` inside;
- per named vector space (``"content"``: unit text vectors, ``"collaborative"``: the retrieval model's item
  vectors, ...) the **preference vector**, the decayed weighted mean of the vectors of the items touched
  with a positive weight: ``p = sum_e w_e d_e x_(i_e) / sum_e w_e d_e`` (``d_e = 2 ** (-(now - t_e) / h)``,
  events with ``w_e > 0`` whose item has a vector in that space);
- **counters**: events per kind, the first and the last event time.

O(1) updates: values relative to an anchor
------------------------------------------
Decaying every tag of a user at each event would cost O(tags). Instead each user keeps an anchor time
``T`` and stores ``s_tag = sum_e w_e tw 2 ** ((t_e - T) / h)``; then ``a_tag(now) = s_tag * 2 ** (-(now - T) /
h)``: an event adds one term per tag of its item and one scaled vector per space, O(tags of the item +
vector dims). The same holds for the vector numerators and the weight denominators. When an event's
exponent ``(t_e - T) / h`` passes ``rebase_exponent`` (default 50, i.e. a factor 2**50) the user's values
are all rescaled by ``2 ** (-(t_e - T) / h)`` and the anchor moves to ``t_e``: nothing overflows, however
long the history (an event far older than the anchor adds ``w * 2**(very negative)``, which is 0 to within
the float's precision relative to newer events, as it is in exact arithmetic).

The factor ``2 ** (-(now - T) / h)`` is common to every value of a user, so it cancels in every ratio: the
preference vectors (``num / den``) and the affinity features below do not depend on ``now`` once the events
are fixed; ``now`` only scales the reported tag weights.

Features: one code path at training and serving
-----------------------------------------------
:func:`affinity_features` (a pure function of a :class:`ProfileState` snapshot, the :class:`ItemInfo` and
candidate ids) gives three float32 columns per candidate:

0. tag overlap: ``sum_(tag of item) a_tag * tw(item, tag) / sum_tag |a_tag|``, in ``[-1, 1]`` (item tag
   weights are in ``[0, 1]`` and an item names a tag once);
1. cosine between the user's ``"content"`` preference vector and the item's content vector (0 when either
   is missing);
2. the same for ``"collaborative"``.

:meth:`Profiles.features` serves them; :func:`asof_features` computes them for training examples by
replaying the events in time order through the same :meth:`Profiles.observe` update and the same
:func:`affinity_features`, each example seeing only the events strictly before its time, so training and
serving cannot disagree (a test asserts bit-equality).

Memory
------
A user gets a stored profile only after ``min_events`` positive-weight events; before that a cheap pending
entry holds the counters and the (at most ``pending_events``) weighted events to replay. Profiles and
pending entries idle (no update, no read) for longer than ``ttl_s`` are evicted (:meth:`Profiles.evict`,
also amortized inside :meth:`Profiles.observe`), ``max_users`` caps each of the two (least recently used
first). With a ``loader`` (``loader(user) -> (item_ids, kinds, ts, values)``, e.g. over the event store with
:func:`events_arrays_from_store`) an evicted user's profile is rebuilt on the next read.

Start-up: :meth:`Profiles.build` computes every profile from arrays of events in bulk (NumPy: unique users,
CSR expansion of the items' tags, bincounts over (user, tag) pairs; per user one matrix-vector product
``f @ V[items]`` for each vector space), never replaying events one by one. Built profiles keep their tags
compact (two arrays, about 12 bytes a tag); the first update of a profile turns them into a dict (O(1)
per tag update from then on) and :meth:`Profiles.compact` turns idle ones back.

Thread safety: one lock per :class:`Profiles`; every method may be called from any thread.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .events import INTERACTIONS, KINDS, check_key

__all__ = [
    "DEFAULT_KIND_WEIGHTS", "FEATURE_NAMES", "FEATURE_SPACES", "ItemInfo", "Profile", "ProfileConfig",
    "ProfileState", "Profiles", "TagVocab", "affinity_features", "asof_features", "default_rating_weight",
    "events_arrays_from_store",
]

#: event weight per kind (kinds not named weigh 0: they count in the counters only)
DEFAULT_KIND_WEIGHTS = MappingProxyType({"impression": 0.0, "click": 1.0, "conversion": 3.0, "rating": 1.0})
#: the vector spaces of feature columns 1 and 2
FEATURE_SPACES = ("content", "collaborative")
#: the columns of :func:`affinity_features`
FEATURE_NAMES = ("tag_overlap", "content_cosine", "collaborative_cosine")

_mul, _add = np.multiply, np.add
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_RATING = _KIND_CODE["rating"]
_NK = len(KINDS)


def default_rating_weight(values):
    """``clip((rating - 2.5) / 2.5, -1, 1)``: 5 stars -> 1, 2.5 -> 0, 1 star -> -0.6, 0 -> -1 (array in, array out)."""
    return np.clip((np.asarray(values, dtype=np.float64) - 2.5) / 2.5, -1.0, 1.0)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class ProfileConfig:
    """How profiles decay, weigh events and stay bounded.

    Parameters
    ----------
    half_life_days : float
        An event's weight halves every ``half_life_days`` (> 0).
    kind_weights : mapping of str to float
        Event weight per kind (kinds of :data:`rec_engine.events.KINDS`; kinds not named weigh 0).
    rating_weight : callable or None
        For a rating, the kind weight is multiplied by ``rating_weight(values)``: called with a float64 array of
        ratings, returns an array of the same shape (finite). None: ratings weigh the kind weight, whatever
        the value. Default :func:`default_rating_weight`.
    min_events : int
        Positive-weight events a user needs before a profile is stored (>= 1).
    ttl_s : float or None
        Profiles idle (no update, no read) for longer than this are evicted (None: never).
    max_users : int or None
        At most this many stored profiles (and, separately, pending users); the least recently used go first.
    evict_every : int
        :meth:`Profiles.observe` runs the TTL eviction every ``evict_every`` calls.
    rebase_exponent : float
        A user's values are rescaled and the anchor moved when an event's exponent passes this (in (0, 1000]).
    pending_events : int
        At most this many weighted events are buffered per pending user (the oldest are dropped).
    """

    half_life_days: float = 14.0
    kind_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    rating_weight: Callable | None = default_rating_weight
    min_events: int = 3
    ttl_s: float | None = 7 * 86400.0
    max_users: int | None = None
    evict_every: int = 1024
    rebase_exponent: float = 50.0
    pending_events: int = 64

    def __post_init__(self):
        def num(name, lo_open=0.0, hi=None, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not _is_number(v):
                raise TypeError(f"{name} must be a number, got {type(v).__name__}")
            if not (math.isfinite(v) and v > lo_open and (hi is None or v <= hi)):
                raise ValueError(f"{name} must be finite and > {lo_open}" + ("" if hi is None else f" and <= {hi}")
                                 + f", got {v!r}")

        def integer(name, lo, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")

        num("half_life_days")
        num("ttl_s", allow_none=True)
        num("rebase_exponent", hi=1000.0)
        integer("min_events", 1)
        integer("max_users", 1, allow_none=True)
        integer("evict_every", 1)
        integer("pending_events", 1)
        kw = self.kind_weights
        if not isinstance(kw, Mapping):
            raise TypeError(f"kind_weights must be a mapping of kind to weight, got {type(kw).__name__}")
        for k, w in kw.items():
            if k not in _KIND_CODE:
                raise ValueError(f"kind_weights: unknown event kind {k!r}; kinds are {KINDS}")
            if not _is_number(w):
                raise TypeError(f"kind_weights[{k!r}] must be a number, got {type(w).__name__}")
            if not math.isfinite(w):
                raise ValueError(f"kind_weights[{k!r}] must be finite, got {w!r}")
        object.__setattr__(self, "kind_weights", MappingProxyType({k: float(w) for k, w in kw.items()}))
        if self.rating_weight is not None and not callable(self.rating_weight):
            raise TypeError(f"rating_weight must be callable or None, got {type(self.rating_weight).__name__}")

    @property
    def half_life_s(self) -> float:
        return float(self.half_life_days) * 86400.0

    def kind_weight_array(self) -> np.ndarray:
        """float64 [len(KINDS)]: the weight of each kind code."""
        return np.array([self.kind_weights.get(k, 0.0) for k in KINDS], dtype=np.float64)

    def rating_factors(self, values: np.ndarray) -> np.ndarray:
        """``rating_weight`` of float64 ``values`` checked (same shape, finite)."""
        if self.rating_weight is None:
            return np.ones_like(values)
        out = np.asarray(self.rating_weight(values), dtype=np.float64)
        if out.shape != values.shape or not np.isfinite(out).all():
            raise ValueError(f"rating_weight must return finite values of shape {values.shape}, got {out!r}")
        return out

    def event_weights(self, codes: np.ndarray, values: np.ndarray) -> np.ndarray:
        """float64 weights of events given by kind codes (into KINDS) and values (NaN: none)."""
        w = self.kind_weight_array()[codes]
        r = codes == _RATING
        if r.any():
            rv = values[r]
            if np.isnan(rv).any():
                raise ValueError("a rating event needs a value (the rating)")
            w[r] = w[r] * self.rating_factors(rv)
        return w


# ------------------------------------------------------------------------------------------------ tags
class TagVocab:
    """A growing vocabulary: tag string <-> int id (ids never change; new tags get the next id).

    ``normalize`` (default True): tags are compared after collapsing white space and case folding
    (``" Sci-Fi "`` and ``"sci-fi"`` are one tag). Thread-safe."""

    def __init__(self, tags: Iterable[str] = (), *, normalize: bool = True):
        self.normalize = bool(normalize)
        self._ids: dict[str, int] = {}
        self._tags: list[str] = []
        self._lock = threading.Lock()
        for t in tags:
            self.add(t)

    def _norm(self, tag) -> str:
        if not isinstance(tag, str):
            raise TypeError(f"a tag must be a str, got {type(tag).__name__}")
        t = " ".join(tag.split()).casefold() if self.normalize else tag
        if not t:
            raise ValueError(f"empty tag {tag!r}")
        return t

    def add(self, tag: str) -> int:
        """The id of ``tag``, added when new."""
        t = self._norm(tag)
        i = self._ids.get(t)
        if i is not None:
            return i
        with self._lock:
            i = self._ids.get(t)
            if i is None:
                i = len(self._tags)
                self._tags.append(t)
                self._ids[t] = i
            return i

    def id(self, tag: str) -> int:
        """The id of ``tag``, -1 when the vocabulary does not hold it."""
        return self._ids.get(self._norm(tag), -1)

    def ids(self, tags: Iterable[str], *, add: bool = False) -> np.ndarray:
        """int64 ids of ``tags`` (-1 for unknown ones unless ``add``)."""
        f = self.add if add else self.id
        return np.array([f(t) for t in tags], dtype=np.int64)

    def tag(self, i: int) -> str:
        if not 0 <= i < len(self._tags):
            raise IndexError(f"tag id {i} is outside [0, {len(self._tags)})")
        return self._tags[i]

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self._tags)

    def __len__(self) -> int:
        return len(self._tags)

    def __contains__(self, tag) -> bool:
        return isinstance(tag, str) and self.id(tag) >= 0

    def __repr__(self) -> str:
        return f"TagVocab({len(self)} tags)"


# ------------------------------------------------------------------------------------------------ items
def _int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        if a.size == 0 and a.dtype.kind == "f":
            return a.astype(np.int64)
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


class ItemInfo:
    """What profiles need of the items: per item id a CSR list of tag ids with weights, and named vectors.

    Parameters
    ----------
    indptr : int array [n_items + 1]
        Item ``i``'s tags are ``tag_ids[indptr[i]:indptr[i + 1]]`` (an item names a tag at most once).
    tag_ids : int array [nnz]
        Ids of ``vocab`` (>= 0).
    tag_weights : float array [nnz], optional
        Each tag's weight for its item, in ``[0, 1]``; default ``1 / (number of tags of the item)``.
    vectors : mapping of str to float array [n_items, d], optional
        Named vector spaces (``"content"``, ``"collaborative"``, ...). Kept as is when float32 and
        C-contiguous (no copy); a row of zeros means the item has no vector in that space.
    vocab : TagVocab, optional
        The tags' names (default: a vocabulary naming tag ``j`` ``"#j"``).

    Immutable once built; share one between threads and :class:`Profiles` objects.
    """

    def __init__(self, indptr, tag_ids, tag_weights=None, vectors: Mapping[str, Any] | None = None, *,
                 vocab: TagVocab | None = None):
        indptr = _int_array(indptr, "indptr")
        tag_ids = _int_array(tag_ids, "tag_ids")
        if indptr.ndim != 1 or indptr.size < 1 or tag_ids.ndim != 1:
            raise ValueError("indptr and tag_ids must be 1-D (indptr of length n_items + 1)")
        if indptr[0] != 0 or indptr[-1] != tag_ids.size or (np.diff(indptr) < 0).any():
            raise ValueError(f"indptr must rise from 0 to len(tag_ids) = {tag_ids.size}")
        n = indptr.size - 1
        lens = np.diff(indptr)
        if tag_ids.size and tag_ids.min() < 0:
            raise ValueError("tag_ids must be >= 0")
        if vocab is None:
            vocab = TagVocab((f"#{j}" for j in range(int(tag_ids.max()) + 1 if tag_ids.size else 0)),
                             normalize=False)
        if not isinstance(vocab, TagVocab):
            raise TypeError(f"vocab must be a TagVocab, got {type(vocab).__name__}")
        if tag_ids.size and tag_ids.max() >= len(vocab):
            raise IndexError(f"tag id {int(tag_ids.max())} is outside the vocabulary [0, {len(vocab)})")
        rows = np.repeat(np.arange(n, dtype=np.int64), lens)
        if tag_ids.size:
            order = np.lexsort((tag_ids, rows))
            dup = (rows[order][1:] == rows[order][:-1]) & (tag_ids[order][1:] == tag_ids[order][:-1])
            if dup.any():
                i = int(rows[order][1:][dup][0])
                raise ValueError(f"item {i} names a tag twice")
        if tag_weights is None:
            tw = (1.0 / np.maximum(lens, 1))[rows] if tag_ids.size else np.zeros(0)
        else:
            tw = np.asarray(tag_weights)
            if tw.dtype.kind not in "fiu":
                raise TypeError(f"tag_weights must be a float array, got dtype {tw.dtype}")
            tw = tw.astype(np.float64)
            if tw.shape != tag_ids.shape:
                raise ValueError(f"tag_weights has shape {tw.shape}, tag_ids {tag_ids.shape}")
            if not (np.isfinite(tw).all() and (tw >= 0).all() and (tw <= 1).all()):
                raise ValueError("tag_weights must be in [0, 1]")
        self.n_items = n
        self.indptr = indptr
        self.tag_ids = tag_ids
        self.tag_weights = np.ascontiguousarray(tw, dtype=np.float64)
        self.vocab = vocab
        vecs, norms = {}, {}
        for name, v in (vectors or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"vector space names are str, got {type(name).__name__}")
            a = np.asarray(v)
            if a.dtype.kind not in "fiu":
                raise TypeError(f"vectors[{name!r}] must be a float array, got dtype {a.dtype}")
            if a.ndim != 2 or a.shape[0] != n or a.shape[1] < 1:
                raise ValueError(f"vectors[{name!r}] must be [n_items={n}, d >= 1], got shape {a.shape}")
            a = np.ascontiguousarray(a, dtype=np.float32)
            if not np.isfinite(a).all():
                raise ValueError(f"vectors[{name!r}] has non-finite values")
            vecs[name] = a
            norms[name] = np.linalg.norm(a, axis=1).astype(np.float32)
        self.vectors: Mapping[str, np.ndarray] = MappingProxyType(vecs)
        self.norms: Mapping[str, np.ndarray] = MappingProxyType(norms)
        self.spaces: tuple[str, ...] = tuple(vecs)
        self._vec_list = [vecs[s] for s in self.spaces]
        self._has = np.stack([norms[s] > 0 for s in self.spaces], axis=1) if self.spaces \
            else np.zeros((n, 0), dtype=bool)
        self._py: list = [None] * n          # per item, on first use: (tag ids, tag weights, spaces with a vector)

    @classmethod
    def from_tag_lists(cls, tag_lists: Sequence[Iterable[str]], vectors: Mapping[str, Any] | None = None, *,
                       vocab: TagVocab | None = None, weighting: str = "inverse_len") -> "ItemInfo":
        """From one list of tag strings per item id (repeats within an item are dropped).

        ``weighting``: ``"inverse_len"`` (each of an item's ``m`` tags weighs ``1/m``) or ``"one"``.
        ``vocab``: a vocabulary to extend (ids of the tags it holds stay the same), default a new one."""
        if weighting not in ("inverse_len", "one"):
            raise ValueError(f"weighting must be 'inverse_len' or 'one', got {weighting!r}")
        if isinstance(tag_lists, (str, bytes)):
            raise TypeError("tag_lists must be a sequence of lists of tags, one per item")
        vocab = TagVocab() if vocab is None else vocab
        indptr, ids = [0], []
        for tags in tag_lists:
            if isinstance(tags, str):
                raise TypeError(f"each item's tags must be a list of str, got the str {tags!r}")
            seen = dict.fromkeys(vocab.add(t) for t in tags)
            ids.extend(seen)
            indptr.append(len(ids))
        indptr_a = np.array(indptr, dtype=np.int64)
        ids_a = np.array(ids, dtype=np.int64)
        tw = None
        if weighting == "one":
            tw = np.ones(ids_a.size, dtype=np.float64)
        return cls(indptr_a, ids_a, tw, vectors, vocab=vocab)

    def _item(self, i: int):
        """(tag ids, tag weights, indices of the spaces where the item has a vector), as Python tuples."""
        got = self._py[i]
        if got is None:
            a, b = int(self.indptr[i]), int(self.indptr[i + 1])
            got = (tuple(self.tag_ids[a:b].tolist()), tuple(self.tag_weights[a:b].tolist()),
                   tuple(np.flatnonzero(self._has[i]).tolist()))
            self._py[i] = got                 # a benign race: every thread computes the same tuple
        return got

    def tags_of(self, item_id: int) -> list[str]:
        """The tag strings of ``item_id``."""
        i = self._check_id(item_id)
        return [self.vocab.tag(t) for t in self._item(i)[0]]

    def _check_id(self, item_id) -> int:
        if not isinstance(item_id, (int, np.integer)) or isinstance(item_id, (bool, np.bool_)):
            raise TypeError(f"item_id must be an int, got {type(item_id).__name__}")
        i = int(item_id)
        if not 0 <= i < self.n_items:
            raise IndexError(f"item id {i} is outside [0, {self.n_items})")
        return i

    def check_ids(self, item_ids, *, allow_none: bool = False) -> np.ndarray:
        """``item_ids`` as int64 [n]: TypeError for a non-integer array, IndexError outside [0, n_items)
        (-1, an event without an item, allowed with ``allow_none``)."""
        ids = _int_array(item_ids, "item_ids").reshape(-1) if not np.isscalar(item_ids) else \
            _int_array([item_ids], "item_ids")
        lo = -1 if allow_none else 0
        if ids.size and (ids.min() < lo or ids.max() >= self.n_items):
            bad = int(ids[(ids < lo) | (ids >= self.n_items)][0])
            raise IndexError(f"item id {bad} is outside [0, {self.n_items})")
        return ids

    def expand(self, item_ids: np.ndarray):
        """CSR expansion of ``item_ids`` (>= 0): (row of each entry, tag id, tag weight)."""
        starts = self.indptr[item_ids]
        lens = self.indptr[item_ids + 1] - starts
        total = int(lens.sum())
        row = np.repeat(np.arange(item_ids.size, dtype=np.int64), lens)
        pos = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens) + starts[row]
        return row, self.tag_ids[pos], self.tag_weights[pos]

    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.tag_ids.nbytes + self.tag_weights.nbytes
                   + sum(v.nbytes for v in self.vectors.values()) + sum(v.nbytes for v in self.norms.values()))

    def __repr__(self) -> str:
        dims = {s: v.shape[1] for s, v in self.vectors.items()}
        return f"ItemInfo({self.n_items} items, {self.tag_ids.size} tags of {len(self.vocab)}, vectors {dims})"


# ------------------------------------------------------------------------------------------------ state
class _State:
    """A stored profile: values relative to ``anchor`` (see the module docstring).

    ``tags`` is either a dict ``{tag id: s}`` (a profile being updated) or, compact, a pair of arrays (int32
    tag ids sorted, float64 values): 12 bytes a tag instead of about 70; :meth:`Profiles.build` stores the
    compact form and the first update turns it into a dict (once, O(tags)); :meth:`Profiles.compact`
    turns dicts back."""
    __slots__ = ("anchor", "tags", "num", "den", "counts", "first_ts", "last_ts", "n_pos", "touched", "complete")

    def __init__(self, anchor, n_spaces_dims, touched, complete):
        self.anchor = anchor
        self.tags: dict[int, float] | tuple = {}
        self.num = [np.zeros(d, dtype=np.float32) for d in n_spaces_dims]
        self.den = [0.0] * len(n_spaces_dims)
        self.counts = [0] * _NK
        self.first_ts = math.inf
        self.last_ts = -math.inf
        self.n_pos = 0
        self.touched = touched
        self.complete = complete


class _Pending:
    """A user below ``min_events``: counters and the weighted events to replay once the profile is stored."""
    __slots__ = ("events", "counts", "first_ts", "last_ts", "n_pos", "touched", "complete")

    def __init__(self, touched, complete):
        self.events: list = []               # (item, ts, weight), weight != 0
        self.counts = [0] * _NK
        self.first_ts = math.inf
        self.last_ts = -math.inf
        self.n_pos = 0
        self.touched = touched
        self.complete = complete


@dataclass(frozen=True, eq=False)
class ProfileState:
    """A read-only snapshot of one user's profile, what :func:`affinity_features` reads.

    ``tag_ids`` (int32, sorted) and ``tag_s`` (float64): the tag values relative to ``anchor``;
    ``l1 = sum |tag_s|``; ``vectors``: the preference vector (float32 mean) per space that has one;
    ``units``: the same normalized; ``counts``: events per kind of :data:`~rec_engine.events.KINDS`."""

    user: Any
    anchor: float
    half_life_s: float
    tag_ids: np.ndarray
    tag_s: np.ndarray
    l1: float
    vectors: Mapping[str, np.ndarray]
    units: Mapping[str, np.ndarray]
    counts: tuple
    first_ts: float
    last_ts: float
    n_positive: int

    def decay(self, now: float) -> float:
        """``2 ** (-(now - anchor) / h)``: multiply ``tag_s`` by it for the affinities at ``now``."""
        x = -(float(now) - self.anchor) / self.half_life_s
        try:
            return 2.0 ** x
        except OverflowError:
            raise ValueError(f"now={now} is more than 1000 half-lives before the profile's events") from None

    def affinities(self, now: float) -> np.ndarray:
        """float64 [len(tag_ids)]: the tag affinities decayed to ``now``."""
        return self.tag_s * self.decay(now)


def _freeze(d: dict) -> tuple:
    """A tag dict as (int32 ids sorted, float64 values)."""
    n = len(d)
    ids = np.fromiter(d.keys(), dtype=np.int32, count=n)
    s = np.fromiter(d.values(), dtype=np.float64, count=n)
    order = np.argsort(ids, kind="stable")
    return ids[order], s[order]


def _snapshot(user, st: _State, info: ItemInfo, half_life_s: float) -> ProfileState:
    d = st.tags
    if type(d) is dict:
        ids, s = _freeze(d)
    else:
        ids, s = d                             # never written in place: the snapshot may share them
    vecs, units = {}, {}
    for k, space in enumerate(info.spaces):
        den = st.den[k]
        if den > 0:
            mean = (st.num[k].astype(np.float64) / den).astype(np.float32)
            norm = float(np.linalg.norm(mean))
            if norm > 0 and math.isfinite(norm):
                vecs[space] = mean
                units[space] = (mean / np.float32(norm)).astype(np.float32)
    return ProfileState(user, st.anchor, half_life_s, ids, s, float(np.abs(s).sum()), MappingProxyType(vecs),
                        MappingProxyType(units), tuple(st.counts), st.first_ts, st.last_ts, st.n_pos)


# ------------------------------------------------------------------------------------------------ features
def affinity_features(profile_state: ProfileState | None, item_info: ItemInfo, item_ids, now: float | None = None
                      ) -> np.ndarray:
    """The affinity features of candidates for one user: float32 ``[n, 3]`` (:data:`FEATURE_NAMES`).

    Column 0: ``sum_(tags of the item) a_tag * tw / sum |a_tag|`` (in [-1, 1]); column 1: cosine of the
    ``"content"`` preference vector and the item's content vector; column 2: the same for
    ``"collaborative"``; 0 where the user or the item has no such vector, and all 0 for ``profile_state``
    None (an unknown user). ``now`` is accepted for symmetry with the reads: the decay to ``now`` is one
    factor common to every term and cancels, so the features of a fixed set of events do not depend on it.
    The one function the ranking features use at training (:func:`asof_features`) and at serving
    (:meth:`Profiles.features`). IndexError for an id outside ``[0, n_items)``."""
    ids = item_info.check_ids(item_ids)
    out = np.zeros((ids.size, 3), dtype=np.float32)
    if profile_state is None or ids.size == 0:
        return out
    st = profile_state
    if st.l1 > 0 and st.tag_ids.size:
        row, tags, tw = item_info.expand(ids)
        pos = np.searchsorted(st.tag_ids, tags)
        pos_c = np.minimum(pos, st.tag_ids.size - 1)
        hit = st.tag_ids[pos_c] == tags
        contrib = np.where(hit, st.tag_s[pos_c] * tw, 0.0)
        out[:, 0] = np.bincount(row, weights=contrib, minlength=ids.size) / st.l1
    for col, space in ((1, FEATURE_SPACES[0]), (2, FEATURE_SPACES[1])):
        u = st.units.get(space)
        if u is None or space not in item_info.vectors:
            continue
        v = item_info.vectors[space]
        if v.shape[1] != u.shape[0]:
            raise ValueError(f"the profile's {space!r} vector has {u.shape[0]} dims, the items' {v.shape[1]}")
        norms = item_info.norms[space][ids]
        dots = v[ids] @ u
        out[:, col] = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    return out


# ------------------------------------------------------------------------------------------------ profile
@dataclass(frozen=True)
class Profile:
    """One user's profile as read at ``now``: ``tags``: ``(tag, affinity)`` pairs, highest first, positive
    only; ``vectors``: the preference vector per space (float32); ``counts``: events per kind."""

    user: Any
    now: float
    tags: list
    vectors: dict
    counts: dict
    first_ts: float
    last_ts: float
    n_positive: int

    def to_dict(self) -> dict:
        """JSON-friendly (lists and floats)."""
        return {"user": self.user, "now": self.now, "tags": [[t, float(w)] for t, w in self.tags],
                "vectors": {k: [float(x) for x in v] for k, v in self.vectors.items()},
                "counts": dict(self.counts), "first_ts": self.first_ts, "last_ts": self.last_ts,
                "n_positive": self.n_positive}


def _check_ts(ts) -> float:
    if not _is_number(ts):
        raise TypeError(f"ts must be a number of seconds, got {type(ts).__name__}")
    ts = float(ts)
    if not math.isfinite(ts):
        raise ValueError(f"ts must be finite, got {ts}")
    return ts


def _kind_codes(kinds, n: int) -> np.ndarray:
    a = np.asarray(kinds)
    if a.ndim == 0:
        a = np.full(n, a.item())
    a = a.reshape(-1)
    if a.dtype.kind in "iu":
        codes = a.astype(np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= _NK):
            raise ValueError(f"kind codes must be in [0, {_NK}) (indices into KINDS {KINDS})")
        return codes
    if a.dtype.kind not in "UO":
        raise TypeError(f"kinds must be kind names (str) or codes into KINDS (int), got dtype {a.dtype}")
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    u, inv = np.unique(a.astype(str), return_inverse=True)
    bad = [k for k in u.tolist() if k not in _KIND_CODE]
    if bad:
        raise ValueError(f"unknown event kinds {bad}; kinds are {KINDS}")
    return np.array([_KIND_CODE[k] for k in u.tolist()], dtype=np.int64)[inv.reshape(-1)]


def _values_array(values, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    v = np.asarray(values)
    if v.dtype == object:
        v = np.array([np.nan if x is None else x for x in v.tolist()], dtype=np.float64)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"values must be a float array (NaN: none), got dtype {v.dtype}")
    v = v.astype(np.float64).reshape(-1)
    if v.size != n:
        raise ValueError(f"values has {v.size} entries, the events {n}")
    return v


def _factorize(users) -> tuple[list, np.ndarray]:
    """(unique users as Python keys, inverse int64) without a Python loop when the keys sort (one type)."""
    # a list goes through an object array: np.asarray([7, "7"]) would make both the string "7"
    a = users.reshape(-1) if isinstance(users, np.ndarray) else np.array(list(users) + [None], dtype=object)[:-1]
    if a.dtype.kind in "iuU":
        if a.dtype.kind == "u" and a.size and a.max() >= 2**63:
            raise ValueError("user keys must be within int64")
        u, inv = np.unique(a, return_inverse=True)
        return u.tolist(), inv.reshape(-1).astype(np.int64)
    if a.dtype.kind == "O":
        keys = [check_key(k, "user") for k in a.tolist()]
        if keys and all(type(k) is int for k in keys):
            return _factorize(np.array(keys, dtype=np.int64))
        if all(type(k) is str for k in keys):
            u, inv = np.unique(np.array(keys + [""], dtype=object)[:-1], return_inverse=True)
            return u.tolist(), inv.reshape(-1).astype(np.int64)
        index: dict = {}                    # mixed int and str keys: no order between them
        inv = np.fromiter((index.setdefault((type(k), k), len(index)) for k in keys), dtype=np.int64,
                          count=len(keys))
        return [k for (_, k) in index], inv
    raise TypeError(f"users must be int or str keys, got dtype {a.dtype}")


class Profiles:
    """User profiles over an :class:`ItemInfo`, updated per event and read per request (see the module
    docstring for the maths and the memory bounds).

    Parameters
    ----------
    items : ItemInfo
        The items' tags and vectors (the caller resolves its item keys to these ids).
    config : ProfileConfig, optional
    loader : callable, optional
        ``loader(user) -> (item_ids, kinds, ts, values)`` arrays of every event of ``user`` so far (the store
        is the source of truth: the caller appends an event to it before :meth:`observe`). Used to rebuild
        a profile missing from memory (evicted, or only partly observed) at its next read.
    clock : callable
        The wall clock for idleness (TTL, LRU), seconds; default :func:`time.time`.
    """

    def __init__(self, items: ItemInfo, config: ProfileConfig | None = None, *, loader: Callable | None = None,
                 clock: Callable[[], float] = time.time):
        if not isinstance(items, ItemInfo):
            raise TypeError(f"items must be an ItemInfo, got {type(items).__name__}")
        config = ProfileConfig() if config is None else config
        if not isinstance(config, ProfileConfig):
            raise TypeError(f"config must be a ProfileConfig, got {type(config).__name__}")
        if loader is not None and not callable(loader):
            raise TypeError("loader must be callable or None")
        self.items = items
        self.config = config
        self.loader = loader
        self._clock = clock
        self._h = config.half_life_s
        self._hinv = 1.0 / self._h
        self._kw = [config.kind_weights.get(k, 0.0) for k in KINDS]
        self._rw = config.rating_weight
        self._rw_default = config.rating_weight is default_rating_weight
        self._bound = float(config.rebase_exponent)
        self._dims = [items.vectors[s].shape[1] for s in items.spaces]
        self._vecs = items._vec_list
        self._scratch = [np.empty(d, dtype=np.float32) for d in self._dims]   # used under the lock
        self._profiles: OrderedDict = OrderedDict()      # user -> _State, least recently used first
        self._pending: OrderedDict = OrderedDict()       # user -> _Pending
        self._lock = threading.Lock()
        self._n_obs = 0
        self.rebases = 0
        self.loads = 0

    # -------------------------------------------------------------------------------------- updates
    def _weight(self, code: int, value) -> float:
        """The weight of one event (the scalar twin of :meth:`ProfileConfig.event_weights`)."""
        w = self._kw[code]
        if code == _RATING:
            if value is None:
                raise ValueError("a rating event needs value= (the rating)")
            if not _is_number(value):
                raise TypeError(f"value must be a number, got {type(value).__name__}")
            v = float(value)
            if math.isnan(v):
                raise ValueError("a rating event needs value= (the rating)")
            if self._rw is None:
                return w
            if self._rw_default:
                return w * min(1.0, max(-1.0, (v - 2.5) / 2.5))
            return w * float(self.config.rating_factors(np.array([v]))[0])
        return w

    def observe(self, user, item_id: int, kind: str, ts: float, value: float | None = None) -> None:
        """Fold one event into ``user``'s profile: O(tags of the item + vector dims).

        ``item_id``: an id of :attr:`items`, or -1 for an event without an item (counted only); ``kind``: one of
        :data:`~rec_engine.events.KINDS`; ``ts``: seconds; ``value``: the rating for a rating (required),
        otherwise ignored. TypeError / ValueError / IndexError for bad input (nothing is changed)."""
        if type(kind) is not str:
            raise TypeError(f"kind must be a str, got {type(kind).__name__}")
        code = _KIND_CODE.get(kind)
        if code is None:
            raise ValueError(f"unknown event kind {kind!r}; kinds are {KINDS}")
        if type(item_id) is not int:
            if not isinstance(item_id, (int, np.integer)) or isinstance(item_id, (bool, np.bool_)):
                raise TypeError(f"item_id must be an int, got {type(item_id).__name__}")
            item_id = int(item_id)
        if not -1 <= item_id < self.items.n_items:
            raise IndexError(f"item id {item_id} is outside [0, {self.items.n_items})")
        if type(ts) is not float:
            ts = _check_ts(ts)
        elif ts - ts != 0.0:
            raise ValueError(f"ts must be finite, got {ts}")
        if type(user) is not str and type(user) is not int:
            user = check_key(user, "user")
        w = self._weight(code, value)
        self._observe(user, item_id, code, ts, w)

    def _observe(self, user, item: int, code: int, ts: float, w: float) -> None:
        now = self._clock()
        with self._lock:
            st = self._profiles.get(user)
            if st is not None:
                self._profiles.move_to_end(user)
                st.touched = now
                st.counts[code] += 1
                if ts < st.first_ts:
                    st.first_ts = ts
                if ts > st.last_ts:
                    st.last_ts = ts
                if w != 0.0:
                    if w > 0.0:
                        st.n_pos += 1
                    if item >= 0:
                        self._apply(st, item, ts, w)
            else:
                self._observe_pending(user, item, code, ts, w, now)
            self._n_obs += 1
            if self._n_obs % self.config.evict_every == 0 and self.config.ttl_s is not None:
                self._evict_locked(now)

    def _apply(self, st: _State, item: int, ts: float, w: float) -> None:
        """Add one weighted event to a stored profile (under the lock). The update of training and serving."""
        e = (ts - st.anchor) * self._hinv
        if e > self._bound:
            self._rebase(st, ts)
            e = 0.0
        f = w * 2.0 ** e
        tags, tws, spaces = self.items._item(item)
        d = st.tags
        if type(d) is not dict:
            d = st.tags = dict(zip(d[0].tolist(), d[1].tolist()))
        for t, tw in zip(tags, tws):
            d[t] = d.get(t, 0.0) + f * tw
        if w > 0.0:
            num, den, vecs, scratch = st.num, st.den, self._vecs, self._scratch
            for k in spaces:                  # num += f * x without a temporary array
                buf = scratch[k]
                _mul(vecs[k][item], f, out=buf)
                _add(num[k], buf, out=num[k])
                den[k] += f

    def _rebase(self, st: _State, anchor: float) -> None:
        c = 2.0 ** (-(anchor - st.anchor) * self._hinv)        # <= 2**-bound: no overflow, may underflow to 0
        st.anchor = anchor
        d = st.tags
        if type(d) is dict:
            for t in d:
                d[t] *= c
        else:
            st.tags = (d[0], d[1] * c)
        c32 = np.float32(c)
        for k in range(len(st.num)):
            st.num[k] *= c32
            st.den[k] *= c
        self.rebases += 1

    def _observe_pending(self, user, item, code, ts, w, now) -> None:
        p = self._pending.get(user)
        if p is None:
            p = _Pending(now, self.loader is None)
            self._pending[user] = p
            if self.config.max_users is not None and len(self._pending) > self.config.max_users:
                self._pending.popitem(last=False)
        else:
            self._pending.move_to_end(user)
            p.touched = now
        p.counts[code] += 1
        p.first_ts = min(p.first_ts, ts)
        p.last_ts = max(p.last_ts, ts)
        if w != 0.0:
            if w > 0.0:
                p.n_pos += 1
            if item >= 0:
                p.events.append((item, ts, w))
                if len(p.events) > self.config.pending_events:
                    del p.events[0]
        if p.n_pos >= self.config.min_events:
            del self._pending[user]
            self._promote(user, p)

    def _promote(self, user, p: _Pending) -> _State:
        st = _State(p.events[0][1] if p.events else p.last_ts, self._dims, p.touched, p.complete)
        st.counts = p.counts
        st.first_ts, st.last_ts, st.n_pos = p.first_ts, p.last_ts, p.n_pos
        for item, ts, w in p.events:
            self._apply(st, item, ts, w)
        self._store(user, st)
        return st

    def _store(self, user, st: _State) -> None:
        self._profiles[user] = st
        self._profiles.move_to_end(user)
        if self.config.max_users is not None:
            while len(self._profiles) > self.config.max_users:
                self._profiles.popitem(last=False)

    # -------------------------------------------------------------------------------------- bulk build
    def build(self, users, item_ids, kinds, ts, values=None, now: float | None = None) -> int:
        """Replace every profile by the ones computed from arrays of events, in bulk (no per-event Python).

        ``users``: keys [n] (int or str); ``item_ids``: int [n] (-1: an event without an item); ``kinds``: kind
        names or int8 codes into :data:`~rec_engine.events.KINDS` [n]; ``ts``: float seconds [n]; ``values``:
        float [n] (NaN: none; ratings need one) or None. Users below ``min_events`` become pending entries;
        with ``max_users``, the users whose last event is latest are kept.
        ``now``: the wall-clock time the users count as last used (TTL), default the clock. Returns the number of
        profiles stored."""
        users_u, inv, items, codes, ts_a, w = self._check_events(users, item_ids, kinds, ts, values)
        now = self._clock() if now is None else _check_ts(now)
        states, pendings = self._compute(inv, len(users_u), items, codes, ts_a, w, now, complete=True)
        with self._lock:
            self._profiles.clear()
            self._pending.clear()
            # least recently active first, so that the max_users cap keeps the latest
            for j, st in sorted(states, key=lambda x: x[1].last_ts):
                self._profiles[users_u[j]] = st
            for j, p in sorted(pendings, key=lambda x: x[1].last_ts):
                self._pending[users_u[j]] = p
            cap = self.config.max_users
            if cap is not None:
                while len(self._profiles) > cap:
                    self._profiles.popitem(last=False)
                while len(self._pending) > cap:
                    self._pending.popitem(last=False)
            return len(self._profiles)

    def _check_events(self, users, item_ids, kinds, ts, values):
        items = self.items.check_ids(item_ids, allow_none=True)
        n = items.size
        ts_a = np.asarray(ts)
        if ts_a.dtype.kind not in "fiu":
            raise TypeError(f"ts must be a float array, got dtype {ts_a.dtype}")
        ts_a = ts_a.astype(np.float64).reshape(-1)
        if ts_a.size != n:
            raise ValueError(f"ts has {ts_a.size} entries, item_ids {n}")
        if not np.isfinite(ts_a).all():
            raise ValueError("ts must be finite")
        codes = _kind_codes(kinds, n)
        if codes.size != n:
            raise ValueError(f"kinds has {codes.size} entries, item_ids {n}")
        vals = _values_array(values, n)
        w = self.config.event_weights(codes, vals)
        if users is None:
            return None, None, items, codes, ts_a, w
        users_u, inv = _factorize(users)
        if inv.size != n:
            raise ValueError(f"users has {inv.size} entries, item_ids {n}")
        return users_u, inv, items, codes, ts_a, w

    def _compute(self, inv, n_users, items, codes, ts, w, now, complete):
        """Per user index: a _State (>= min_events positive events) or a _Pending. Vectorized."""
        if inv.size == 0:
            return [], []
        order = np.argsort(inv, kind="stable")
        inv, items, codes, ts, w = inv[order], items[order], codes[order], ts[order], w[order]
        starts = np.flatnonzero(np.r_[True, inv[1:] != inv[:-1]])
        present = inv[starts]
        first = np.full(n_users, np.inf)
        last = np.full(n_users, -np.inf)
        first[present] = np.minimum.reduceat(ts, starts)
        last[present] = np.maximum.reduceat(ts, starts)
        counts = np.bincount(inv * _NK + codes, minlength=n_users * _NK).reshape(n_users, _NK)
        n_pos = np.bincount(inv, weights=(w > 0), minlength=n_users).astype(np.int64)
        stored = np.zeros(n_users, dtype=bool)
        stored[present] = n_pos[present] >= self.config.min_events
        row_of = np.full(n_users, -1, dtype=np.int64)
        s_users = np.flatnonzero(stored)
        row_of[s_users] = np.arange(s_users.size)
        anchor = last                                     # per user: its latest event (exponents <= 0)
        use = stored[inv] & (w != 0) & (items >= 0)
        ev_row = row_of[inv[use]]
        ev_item = items[use]
        ev_w = w[use]
        f = ev_w * np.exp2((ts[use] - anchor[inv[use]]) * self._hinv)
        # tags: (profile row, tag) pairs from the CSR expansion, summed
        r, tags, tw = self.items.expand(ev_item)
        nv = max(len(self.items.vocab), int(tags.max()) + 1 if tags.size else 1)
        key = ev_row[r] * nv + tags
        ukey, kinv = np.unique(key, return_inverse=True)
        sums = np.bincount(kinv.reshape(-1), weights=f[r] * tw, minlength=ukey.size)
        t_row = ukey // nv
        t_bounds = np.searchsorted(t_row, np.arange(s_users.size + 1))
        t_ids = (ukey % nv).astype(np.int32)
        # vectors: per space, the positive events whose item has a vector, grouped by row (events are sorted
        # by user); each profile's numerator is one matrix-vector product f @ V[items] in the loop below (a
        # BLAS call per user: 10x faster than segment sums of the gathered rows, and no [events, d] temporary)
        vec_parts, dens = [], []
        posm = ev_w > 0
        for k in range(len(self.items.spaces)):
            sel = posm & self.items._has[ev_item, k]
            rows_k, items_k, f_k = ev_row[sel], ev_item[sel], f[sel]
            bounds = np.searchsorted(rows_k, np.arange(s_users.size + 1)).tolist()
            vec_parts.append((self._vecs[k], items_k, f_k.astype(np.float32), bounds))
            dens.append(np.bincount(rows_k, weights=f_k, minlength=s_users.size).tolist())
        states = []
        counts_l = counts.tolist()
        n_pos_l = n_pos.tolist()
        first_l, last_l = first.tolist(), last.tolist()
        for row, j in enumerate(s_users.tolist()):
            st = _State(last_l[j], (), now, complete)
            a, b = t_bounds[row], t_bounds[row + 1]
            st.tags = (t_ids[a:b].copy(), sums[a:b].copy())
            st.num = [fk[bk[row]:bk[row + 1]] @ V.take(ik[bk[row]:bk[row + 1]], axis=0)
                      for V, ik, fk, bk in vec_parts]
            st.den = [dens[k][row] for k in range(len(dens))]
            st.counts = counts_l[j]
            st.first_ts, st.last_ts, st.n_pos = first_l[j], last_l[j], n_pos_l[j]
            states.append((j, st))
        # pending users: counters and their weighted events (few per user)
        pendings = []
        p_users = present[~stored[present]]
        if p_users.size:
            pm = ~stored[inv] & (w != 0) & (items >= 0)
            p_inv = inv[pm].tolist()
            p_ev = list(zip(items[pm].tolist(), ts[pm].tolist(), w[pm].tolist()))
            by_user: dict[int, list] = {}
            for j, ev in zip(p_inv, p_ev):       # only events of users below min_events
                by_user.setdefault(j, []).append(ev)
            cap = self.config.pending_events
            for j in p_users.tolist():
                p = _Pending(now, complete)
                evs = by_user.get(j, [])
                p.events = evs[-cap:]
                p.counts = counts_l[j]
                p.first_ts, p.last_ts, p.n_pos = first_l[j], last_l[j], n_pos_l[j]
                pendings.append((j, p))
        return states, pendings

    # -------------------------------------------------------------------------------------- reads
    def _touch_state(self, user, now):
        """The stored state of ``user`` or its pending entry, touched (under the lock)."""
        st = self._profiles.get(user)
        if st is not None:
            self._profiles.move_to_end(user)
            st.touched = now
            return st
        p = self._pending.get(user)
        if p is not None:
            self._pending.move_to_end(user)
            p.touched = now
        return p

    def get(self, user) -> ProfileState | None:
        """A snapshot of ``user``'s profile (rebuilt with the loader when it is not, or only partly, in memory),
        None for a user below ``min_events``."""
        user = check_key(user, "user")
        now = self._clock()
        with self._lock:
            st = self._touch_state(user, now)
            if st is not None and (st.complete or self.loader is None):
                return _snapshot(user, st, self.items, self._h) if isinstance(st, _State) else None
            if self.loader is None:
                return None
        # not in memory (or only what was observed since it left): rebuild from the loader, outside the lock
        got = self.loader(user)
        try:
            item_ids, kinds, ts, values = got
        except (TypeError, ValueError):
            raise TypeError("loader(user) must return (item_ids, kinds, ts, values)") from None
        _, _, items, codes, ts_a, w = self._check_events(None, item_ids, kinds, ts, values)
        states, pendings = self._compute(np.zeros(items.size, dtype=np.int64), 1, items, codes, ts_a, w, now, True)
        with self._lock:
            self.loads += 1
            cur = self._profiles.get(user)
            if cur is not None and cur.complete:       # another thread loaded it meanwhile
                return _snapshot(user, cur, self.items, self._h)
            self._profiles.pop(user, None)
            self._pending.pop(user, None)
            if states:
                self._store(user, states[0][1])
                return _snapshot(user, states[0][1], self.items, self._h)
            p = pendings[0][1] if pendings else _Pending(now, True)
            self._pending[user] = p
            if self.config.max_users is not None and len(self._pending) > self.config.max_users:
                self._pending.popitem(last=False)
            return None

    def profile(self, user, now: float | None = None, top: int = 10) -> Profile | None:
        """``user``'s profile at ``now`` (default the clock): the ``top`` tags by affinity (positive only, highest
        first), the preference vectors, the counters; None for an unknown user (below ``min_events``)."""
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)):
            raise TypeError(f"top must be an int, got {type(top).__name__}")
        if top < 0:
            raise ValueError(f"top must be >= 0, got {top}")
        now = self._clock() if now is None else _check_ts(now)
        s = self.get(user)
        if s is None:
            return None
        a = s.affinities(now)
        pos = np.flatnonzero(a > 0)
        if pos.size > top:
            pos = pos[np.argpartition(-a[pos], top - 1)[:top]] if top else pos[:0]
        pos = pos[np.lexsort((s.tag_ids[pos], -a[pos]))]
        vocab = self.items.vocab
        tags = [(vocab.tag(int(t)), float(x)) for t, x in zip(s.tag_ids[pos], a[pos])]
        return Profile(s.user, now, tags, {k: v.copy() for k, v in s.vectors.items()},
                       {k: c for k, c in zip(KINDS, s.counts) if c}, s.first_ts, s.last_ts, s.n_positive)

    def features(self, user, item_ids, now: float | None = None) -> np.ndarray:
        """:func:`affinity_features` of ``user``'s profile for ``item_ids``: float32 [n, 3] (zeros for an
        unknown user)."""
        ids = self.items.check_ids(item_ids)
        return affinity_features(self.get(user), self.items, ids, now)

    def explain(self, user, item_ids, now: float | None = None, top: int | None = 3) -> list[list[tuple[str, float]]]:
        """Per item: the user's tags that matched it with their contribution to feature column 0 (which is their
        sum over all of them), highest first, at most ``top`` (None: all)."""
        if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer))):
            raise TypeError(f"top must be an int or None, got {type(top).__name__}")
        ids = self.items.check_ids(item_ids)
        s = self.get(user)
        out: list = [[] for _ in range(ids.size)]
        if s is None or s.l1 <= 0 or not s.tag_ids.size:
            return out
        row, tags, tw = self.items.expand(ids)
        pos = np.minimum(np.searchsorted(s.tag_ids, tags), s.tag_ids.size - 1)
        hit = s.tag_ids[pos] == tags
        contrib = s.tag_s[pos] * tw / s.l1
        vocab = self.items.vocab
        for r, t, c in zip(row[hit].tolist(), tags[hit].tolist(), contrib[hit].tolist()):
            out[r].append((vocab.tag(t), c))
        for r in range(ids.size):
            out[r].sort(key=lambda x: -x[1])
            if top is not None:
                del out[r][top:]
        return out

    # -------------------------------------------------------------------------------------- bounds
    def evict(self, now: float | None = None) -> int:
        """Drop profiles and pending users idle since before ``now - ttl_s`` (now: the clock). Returns how many."""
        if self.config.ttl_s is None:
            return 0
        now = self._clock() if now is None else _check_ts(now)
        with self._lock:
            return self._evict_locked(now)

    def _evict_locked(self, now: float) -> int:
        limit = now - self.config.ttl_s
        n = 0
        for od in (self._profiles, self._pending):
            # least recently used first; the clock may step back, so stop at the first fresh entry only
            while od:
                user, st = next(iter(od.items()))
                if st.touched >= limit:
                    break
                del od[user]
                n += 1
        return n

    def compact(self, batch: int = 1000) -> int:
        """Store every profile's tags in the compact form (arrays, about 12 bytes a tag) until its next update;
        the lock is taken per ``batch`` users. Returns how many profiles were compacted."""
        n = 0
        users = self.users()
        for a in range(0, len(users), batch):
            with self._lock:
                for u in users[a:a + batch]:
                    st = self._profiles.get(u)
                    if st is not None and type(st.tags) is dict:
                        st.tags = _freeze(st.tags)
                        n += 1
        return n

    def forget(self, user) -> bool:
        """Drop everything held of ``user`` (with the event store's forget). True when something was held."""
        user = check_key(user, "user")
        with self._lock:
            a = self._profiles.pop(user, None)
            b = self._pending.pop(user, None)
        return a is not None or b is not None

    def set_items(self, items: ItemInfo) -> None:
        """Use ``items`` from now on (items added online): the same vocabulary (extended) and vector spaces."""
        if not isinstance(items, ItemInfo):
            raise TypeError(f"items must be an ItemInfo, got {type(items).__name__}")
        old = self.items
        if items.spaces != old.spaces or [items.vectors[s].shape[1] for s in items.spaces] != self._dims:
            raise ValueError(f"the vector spaces differ: {old!r} vs {items!r} (build the profiles again)")
        if items.vocab is not old.vocab and items.vocab.tags[:len(old.vocab)] != old.vocab.tags:
            raise ValueError("the new items' vocabulary does not extend the old one (tag ids would change)")
        with self._lock:
            self.items = items
            self._vecs = items._vec_list

    def __len__(self) -> int:
        """The number of stored profiles."""
        return len(self._profiles)

    def __contains__(self, user) -> bool:
        return user in self._profiles

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def users(self) -> list:
        """The users with a stored profile, least recently used first."""
        with self._lock:
            return list(self._profiles)

    def nbytes(self, user=None) -> int:
        """Bytes held for ``user`` (its state, tag dict and floats, vector arrays, counters), or for everything
        (profiles, pending entries and the two indexes; user keys not counted)."""
        with self._lock:
            if user is not None:
                st = self._profiles.get(user) or self._pending.get(user)
                return 0 if st is None else _state_nbytes(st)
            return (sum(_state_nbytes(s) for s in self._profiles.values())
                    + sum(_state_nbytes(p) for p in self._pending.values())
                    + sys.getsizeof(self._profiles) + sys.getsizeof(self._pending))

    def memory(self) -> dict:
        """``{"profiles", "pending", "bytes", "bytes_per_profile", "bytes_per_pending"}``."""
        with self._lock:
            ps = [_state_nbytes(s) for s in self._profiles.values()]
            qs = [_state_nbytes(p) for p in self._pending.values()]
        total = sum(ps) + sum(qs)
        return {"profiles": len(ps), "pending": len(qs), "bytes": total,
                "bytes_per_profile": sum(ps) / len(ps) if ps else 0.0,
                "bytes_per_pending": sum(qs) / len(qs) if qs else 0.0}

    def __repr__(self) -> str:
        return f"Profiles({len(self._profiles)} profiles, {len(self._pending)} pending, {self.items!r})"


_FLOAT = sys.getsizeof(1.0)


def _state_nbytes(st) -> int:
    n = sys.getsizeof(st) + sys.getsizeof(st.counts) + 2 * _FLOAT        # counts (small ints shared), times
    if isinstance(st, _State):
        if type(st.tags) is dict:
            n += sys.getsizeof(st.tags) + _FLOAT * len(st.tags)            # tag ids are shared ints
        else:
            n += sys.getsizeof(st.tags) + sum(sys.getsizeof(a) for a in st.tags)
        n += sys.getsizeof(st.num) + sum(sys.getsizeof(a) for a in st.num)  # arrays own their data
        n += sys.getsizeof(st.den) + _FLOAT * (len(st.den) + 1)
    else:
        n += sys.getsizeof(st.events) + len(st.events) * (sys.getsizeof((0, 0.0, 0.0)) + 2 * _FLOAT)
    return n


# ------------------------------------------------------------------------------------------------ training
def asof_features(events, examples, item_info: ItemInfo, config: ProfileConfig | None = None) -> np.ndarray:
    """Affinity features of training examples as serving would have computed them at each example's time.

    ``events``: ``(users, item_ids, kinds, ts, values)`` arrays (as :meth:`Profiles.build` takes them);
    ``examples``: ``(users, item_ids, ts)``. The events are replayed in time order (ties: in the order given)
    through :meth:`Profiles.observe`'s update, and each example gets :func:`affinity_features` of its user's
    profile built from the events with ``ts < example ts`` only. Returns float32 [n_examples, 3] in the
    examples' order. The config's TTL and user cap do not apply (nothing is evicted in a replay)."""
    config = ProfileConfig() if config is None else config
    if not isinstance(config, ProfileConfig):
        raise TypeError(f"config must be a ProfileConfig, got {type(config).__name__}")
    config = replace(config, ttl_s=None, max_users=None)
    prof = Profiles(item_info, config, clock=lambda: 0.0)
    try:
        ev_users, ev_items, ev_kinds, ev_ts, ev_values = events
        ex_users, ex_items, ex_ts = examples
    except (TypeError, ValueError):
        raise TypeError("events must be (users, item_ids, kinds, ts, values) and examples (users, item_ids, ts)") \
            from None
    users_u, inv, items, codes, ts_a, _ = prof._check_events(ev_users, ev_items, ev_kinds, ev_ts, ev_values)
    vals = _values_array(ev_values, items.size)
    x_items = item_info.check_ids(ex_items)
    x_ts = np.asarray(ex_ts)
    if x_ts.dtype.kind not in "fiu":
        raise TypeError(f"example ts must be a float array, got dtype {x_ts.dtype}")
    x_ts = x_ts.astype(np.float64).reshape(-1)
    if x_ts.size != x_items.size or not np.isfinite(x_ts).all():
        raise ValueError("example ts must be finite, one per example")
    x_users_u, x_inv = _factorize(ex_users) if x_items.size else ([], np.zeros(0, np.int64))
    if x_inv.size != x_items.size:
        raise ValueError(f"examples have {x_inv.size} users and {x_items.size} items")
    out = np.zeros((x_items.size, 3), dtype=np.float32)
    ev_order = np.argsort(ts_a, kind="stable")
    x_order = np.lexsort((x_inv, x_ts))
    ev_users_l = [users_u[j] for j in inv[ev_order].tolist()] if users_u is not None else []
    ev_items_l, ev_codes_l = items[ev_order].tolist(), codes[ev_order].tolist()
    ev_ts_l = ts_a[ev_order].tolist()
    ev_vals_l = [None if math.isnan(v) else v for v in vals[ev_order].tolist()]
    xs_ts, xs_inv = x_ts[x_order], x_inv[x_order]
    bounds = np.flatnonzero(np.r_[True, (xs_ts[1:] != xs_ts[:-1]) | (xs_inv[1:] != xs_inv[:-1]), True])
    cache: dict = {}
    j, n_ev = 0, len(ev_ts_l)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        t = float(xs_ts[a])
        while j < n_ev and ev_ts_l[j] < t:
            u = ev_users_l[j]
            prof._observe(u, ev_items_l[j], ev_codes_l[j], ev_ts_l[j], prof._weight(ev_codes_l[j], ev_vals_l[j]))
            cache.pop(u, None)
            j += 1
        user = x_users_u[int(xs_inv[a])]
        if user not in cache:
            cache[user] = prof.get(user)
        rows = x_order[a:b]
        out[rows] = affinity_features(cache[user], item_info, x_items[rows], t)
    return out


# ------------------------------------------------------------------------------------------------ store
def events_arrays_from_store(store, item_ids_of_keys: Callable, since: float | None = None, user=None,
                             kinds: Sequence[str] = INTERACTIONS):
    """The events of an :class:`~rec_engine.events.EventStore` as arrays for :meth:`Profiles.build` (and, without
    the first, for a :class:`Profiles` loader).

    ``item_ids_of_keys(keys) -> int array``: item keys (a list) to item ids, -1 for unknown ones (e.g.
    :meth:`rec_engine.keys.KeyMap.lookup`); events of unknown items are dropped, events without an item
    (impressions, when ``kinds`` names them) keep id -1 and only count. ``since``: events at or after it;
    ``user``: that user's events only (the store's user index). Returns ``(users, item_ids int64, kinds int8
    codes into KINDS, ts float64, values float64 with NaN for none)``."""
    if user is None:
        rows = list(store.scan(["user", "item", "kind", "ts", "value"], kinds=list(kinds), since=since))
    else:
        user = check_key(user, "user")
        rows = [(e.user, e.item, e.kind, e.ts, e.value) for e in store.read(kinds=list(kinds), since=since, user=user)]
    if not rows:
        return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int8),
                np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.float64))
    us, its, ks, tss, vs = zip(*rows)
    has_item = np.array([i is not None for i in its], dtype=bool)
    ids = np.full(len(rows), -1, dtype=np.int64)
    keyed = [i for i in its if i is not None]
    if keyed:
        got = np.asarray(item_ids_of_keys(keyed))
        if got.dtype.kind not in "iu" or got.shape != (len(keyed),):
            raise TypeError(f"item_ids_of_keys must return an int array of {len(keyed)} ids, got {got.dtype} "
                            f"{got.shape}")
        ids[has_item] = got
    keep = ~has_item | (ids >= 0)
    codes = np.array([_KIND_CODE[k] for k in ks], dtype=np.int8)
    ts = np.array(tss, dtype=np.float64)
    values = np.array([np.nan if v is None else v for v in vs], dtype=np.float64)
    if all(type(u) is int for u in us):
        users = np.array(us, dtype=np.int64)
    elif all(type(u) is str for u in us):
        users = np.array(us, dtype=str)
    else:
        users = np.array(us, dtype=object)
    return users[keep], ids[keep], codes[keep], ts[keep], values[keep]
