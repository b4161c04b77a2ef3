"""Ranking: the second stage. A CTR model scores a user's candidates: this module joins each example's
features (the item's and the user's from the bundle's feature stores, the rest from the request's
context) into bags; :class:`~rec_engine.ctr_runner.CtrRunner` looks them up in the C++ core and runs the
dense part in ONNX Runtime.

A ranking bundle (kinds ``lr``, ``fm``, ``widedeep``, ``deepfm``, ``xdeepfm``) holds the feature schema, the
shared ``embedding`` and ``linear`` tables, the ONNX ``dense`` part (inputs ``emb`` [B, F, d] and ``lin``
[B, F], output ``logit`` [B]) and, for serving candidates, feature stores: each item's and each user's
encoded features (arrays ``item_features_*`` / ``user_features_*``, fields named in meta
``entity_fields``). The fields of neither entity come from the request's ``context``; a user the store
does not know is described by ``context`` too, and values never seen in training fall into their
field's hashed bucket.
"""
from __future__ import annotations

import itertools
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from . import kinds
from ._convert import at_least_one
from ._core import RecEngineError
from .bundle import Bundle, BundleError
from .ctr_runner import CtrRunner, run_at_once
from .features import EncodedBatch, Schema, _missing
from .runtime import default_num_threads

RANKING_KINDS = kinds.names(stage="ranking")     # read from the registry (rec_engine.kinds)


class _Store:
    """Per-entity encoded features (the entity's fields only), rows = entity ids.

    ``rows`` is the ``[n, F_e]`` int64 matrix of the table rows when every bag holds exactly one entry of
    weight 1 (categorical fields, no missing value), else None."""

    def __init__(self, bundle: Bundle, prefix: str, n_fields: int, n_rows: int):
        # memory-mapped: server processes share the stores through the page cache
        idx, off, w = (bundle.array(f"{prefix}_{a}", mmap=True) for a in ("indices", "offsets", "weights"))
        _check_store(bundle, prefix, idx, off, w, n_fields, n_rows)
        self.batch = EncodedBatch(idx, off, w, n_fields)
        self.n = len(self.batch)
        self.n_fields = n_fields
        self.rows = _single_rows(self.batch)


def _check_store(bundle: Bundle, prefix: str, idx, off, w, n_fields: int, n_rows: int) -> None:
    """Refuse (BundleError) a stored feature CSR that requests would trip over: bags that do not tile the
    indices, table rows out of range, weights that are not one finite float per index."""
    def bad(why: str):
        raise BundleError(f"bundle {bundle.path}: {prefix}: {why}")

    if idx.ndim != 1 or off.ndim != 1 or w.ndim != 1 or idx.dtype.kind not in "iu" or off.dtype.kind not in "iu" \
            or w.dtype.kind != "f":
        bad("indices, offsets and weights must be 1-D (integer, integer, float)")
    if len(off) < 1 or (len(off) - 1) % max(n_fields, 1) or off[0] != 0 or off[-1] != len(idx) or len(w) != len(idx):
        bad(f"offsets ({len(off)}) must hold n * {n_fields} + 1 entries from 0 to len(indices) = {len(idx)}, "
            f"and weights one per index ({len(w)})")
    if len(off) > 1 and (np.diff(off) < 0).any():
        bad("offsets must be non-decreasing")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n_rows):
        bad(f"indices must be table rows in [0, {n_rows})")
    if not np.isfinite(w).all():
        bad("weights must be finite")


def _single_rows(batch: EncodedBatch, chunk: int = 1 << 20) -> np.ndarray | None:
    """``batch.indices`` as an ``[n, F]`` int64 matrix if every bag holds one entry of weight 1, else None
    (checked ``chunk`` entries at a time, so a large store needs no large temporaries)."""
    idx, off, w, f = batch.indices, batch.offsets, batch.weights, batch.n_fields
    n_bags = len(off) - 1
    if f == 0 or len(idx) != n_bags or n_bags % f or len(w) != n_bags or off[0] != 0:
        return None
    for s in range(0, n_bags, chunk):
        e = min(s + chunk, n_bags)
        if not (np.all(np.diff(off[s:e + 1]) == 1) and np.all(w[s:e] == 1.0)):
            return None
    return np.ascontiguousarray(idx, dtype=np.int64).reshape(n_bags // f, f)


def _selector(pos: np.ndarray):
    """A slice when the positions are consecutive (a cheap strided copy), else the index array."""
    if len(pos) and np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
        return slice(int(pos[0]), int(pos[0]) + len(pos))
    return pos


# examples per ONNX call of score_candidates_batch (whole users: at least one user's): the dense part's
# activations stay in cache (DeepFM 400-400-400 with 2 threads: 5.4 us an example at 1024 rows, 8-9.5 at
# 2048-16384)
_BATCH_ROWS = 1024
# a batch's users go one at a time through the request path when each has this many times a row chunk's
# minimum rows (CtrRunner.chunk_min_rows: the call's cost well above an ONNX Runtime call's ~30-60 us)
_PER_USER_CHUNKS = 2
_CACHE_SIZE = 4096     # distinct contexts whose encodings are kept (the cache is emptied when full)
# context values cached by value: for these types equal values (of one type) always encode alike
_KEY_TYPES = frozenset([type(None), bool, int, float, str, bytes, np.bool_, np.int8, np.int16, np.int32, np.int64,
                        np.uint8, np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64, np.str_])


class CtrRanker:
    """A ranking bundle opened for scoring: features joined into bags here, then core pooling and the ONNX
    dense part (:attr:`runner`, a :class:`~rec_engine.ctr_runner.CtrRunner`; no torch).

    Call it with an :class:`~rec_engine.features.EncodedBatch` for click probabilities (or use
    :meth:`logits`), or score a user's candidates with :meth:`score_candidates`. Safe to call from
    several threads at once (the stores, the tables and the ONNX session are; the context caches are
    plain dicts that at worst encode a context twice).

    Parameters
    ----------
    bundle : Bundle
    session_options : onnxruntime.SessionOptions, optional
        Default: one intra-op thread (right for a server running requests in parallel).
    num_threads : int, optional
        Core threads of the pooling (None: the core's default).
    dense : bytes, optional
        Another serialized dense part with the same inputs and output (e.g. :func:`quantize_dense` of the
        bundle's), run instead of the bundle's ``dense.onnx``.
    request_threads : int
        Threads of one request's dense part (:meth:`score_candidates`; default 1): its candidates run as row
        chunks at once, each on one thread (``CtrRunner(request_threads=...)``).
    batch_threads : int, optional
        Threads of :meth:`score_candidates_batch` (0: all cores; None: the first session, with its threads): a
        batch of several chunks has that many scored at once, each on one thread; a batch of one chunk runs on
        a second session with that many ONNX Runtime threads, except a batch of one user, which is scored as
        :meth:`score_candidates` with that many threads, and a batch whose users all have two row chunks'
        worth of candidates or more (``CtrRunner.chunk_min_rows``, up to the bound buffers' 1,024), whose
        users are scored one at a time on each of those threads as :meth:`score_candidates` on one thread (with
        a one-thread session; each such thread keeps a bound buffer set, up to 4 MB).
    """

    def __init__(self, bundle: Bundle, session_options=None, *, num_threads: int | None = 1,
                 batch_threads: int | None = None, dense: bytes | None = None, request_threads: int = 1,
                 matmul_precision: str = "float32"):
        meta = bundle.meta
        missing = [k for k in ("schema", "dim") if k not in meta] + ([] if bundle.has("dense.onnx") else ["dense.onnx"])
        if missing:
            raise BundleError(f"{bundle.path} is not a ranking bundle (kind {bundle.kind!r}): it lacks {missing}")
        self.bundle = bundle
        self.kind = bundle.kind
        self.schema = Schema.from_dict(meta["schema"])
        self.n_fields = self.schema.n_fields
        self.dim = int(meta["dim"])
        self.num_threads = num_threads
        self.embedding = bundle.table("embedding")
        self.linear = bundle.table("linear")
        if self.embedding.rows != self.schema.n_rows or self.linear.rows != self.schema.n_rows:
            raise BundleError(f"bundle {bundle.path}: tables do not have the schema's {self.schema.n_rows} rows")
        if self.embedding.dim != self.dim:
            raise BundleError(f"bundle {bundle.path}: table embedding has {self.embedding.dim} columns, meta dim "
                              f"is {self.dim}")
        self.inputs = tuple(meta.get("inputs", ("emb", "lin")))
        self.output = meta.get("output", "logit")
        groups = meta.get("entity_fields") or {}
        if not isinstance(groups, dict):
            raise BundleError(f"bundle {bundle.path}: meta entity_fields must be an object, got {groups!r}")
        names = self.schema.names
        self.user_fields = [n for n in names if n in set(groups.get("user", ()))]
        self.item_fields = [n for n in names if n in set(groups.get("item", ()))]
        both = set(self.user_fields) & set(self.item_fields)
        if both:
            raise BundleError(f"bundle {bundle.path}: meta entity_fields names {sorted(both)} as both user and "
                              f"item fields")
        self.context_fields = [n for n in names if n not in set(self.user_fields) | set(self.item_fields)]
        pos = {n: i for i, n in enumerate(names)}
        self.user_pos = np.array([pos[n] for n in self.user_fields], np.int64)
        self.item_pos = np.array([pos[n] for n in self.item_fields], np.int64)
        self.ctx_pos = np.array([pos[n] for n in self.context_fields], np.int64)
        # pair fields: numeric features of the (user, candidate) pair (meta "pair_fields", e.g. the profile
        # affinities of rec_engine.profiles), given per candidate at scoring time (score_candidates(pair=...))
        self.pair_fields = [n for n in meta.get("pair_fields", ()) if n in self._names_set()]
        # the fields equal on every candidate of a request (the dense part's first layer computes their share
        # once per request, rec_engine.dense_split)
        constant = [pos[n] for n in self.user_fields + self.context_fields if n not in set(self.pair_fields)]
        self.runner = CtrRunner(self.embedding, self.linear, dense if dense is not None else bundle.onnx_path("dense"),
                                n_fields=self.n_fields,
                                inputs=self.inputs, output=self.output, session_options=session_options,
                                num_threads=num_threads, batch_threads=batch_threads,
                                constant_fields=constant if self.item_fields else None,
                                request_threads=request_threads, matmul_precision=matmul_precision)
        self.session = self.runner.session
        given = {i.name for i in self.session.get_inputs()}, {o.name for o in self.session.get_outputs()}
        if not (all(isinstance(n, str) and n in given[0] for n in self.inputs) and isinstance(self.output, str)
                and self.output in given[1]):
            raise BundleError(f"bundle {bundle.path}: meta inputs {self.inputs!r} / output {self.output!r} do not "
                              f"name the dense model's inputs {sorted(given[0])} / outputs {sorted(given[1])}")
        rows = self.schema.n_rows
        self.items = _Store(bundle, "item_features", len(self.item_fields), rows) if self.item_fields else None
        self.users = _Store(bundle, "user_features", len(self.user_fields), rows) if self.user_fields else None
        self.n_items = self.items.n if self.items is not None else None
        # content fields (a model trained with an items file): the projection of text vectors they come from
        from .content import ContentProjection

        self._pair_rows = {}
        for name in self.pair_fields:
            fi = names.index(name)
            if self.schema.fields[fi].kind != "numeric" or name not in self.context_fields:
                raise BundleError(f"bundle {bundle.path}: pair field {name!r} must be a numeric context field")
            e1, l1 = self.runner.pool_arrays(np.array([self.schema.field_offsets[fi]], np.int64),
                                             np.array([0, 1], np.int64), np.ones(1, np.float32))
            self._pair_rows[name] = (fi, self.schema.fields[fi], e1[0].copy(), float(l1[0, 0]))
        self.content = ContentProjection.from_bundle(bundle)
        if self.content is not None and not set(self.content.names) <= set(self.item_fields):
            raise BundleError(f"bundle {bundle.path}: a content projection but no item fields "
                              f"{self.content.names[0]}..")
        # the runner's methods, bound once (the request path looks them up on every call)
        self._pool_arrays = self.runner.pool_arrays
        self._select, self._lin_table = self.embedding._table.pool_select, self.linear._table
        self._nt = self.runner._nt
        # core threads of a batch's feature lookups: the batch session's (0: all cores), else the requests'
        self._batch_nt = self._nt if batch_threads is None else max(0, int(batch_threads))
        # chunks of a batch scored at once, each on one thread (its lookups and a one-thread ONNX session):
        # the batch's threads, when there are several (two chunks at once take 12% less per user than each
        # chunk on a two-thread session: ONNX Runtime's MLP scales 1.7x over two threads, not 2x)
        self._chunk_workers = 0 if batch_threads is None else (int(batch_threads) or default_num_threads())
        self._chunk_pool = None
        self._pool_lock = threading.Lock()
        self._score_bags = self.runner.score_bags
        self._logits = self.runner.logits
        self._sigmoid = self.runner.sigmoid
        self._names = set(names)
        self._sel = {"item": _selector(self.item_pos), "user": _selector(self.user_pos),
                     "ctx": _selector(self.ctx_pos)}
        # when each group's fields are consecutive: the groups in schema order (to concatenate a row's ids)
        groups = [(int(self._sel[g].start), g) for g in ("user", "item", "ctx") if isinstance(self._sel[g], slice)]
        n_groups = sum(1 for g in (self.user_pos, self.item_pos, self.ctx_pos) if len(g))
        self._order = tuple(g for _, g in sorted(groups)) if len(groups) == n_groups else None
        self._ctx_cache: dict = {}      # context key -> (rows [Fc] or None, emb [Fc, d], lin [Fc])
        self._guest_cache: dict = {}    # context key -> the same for the user fields of an unknown user
        self._field_cache: dict = {}    # field -> {(value, type) or None: (row or None, emb [d], lin)}
        self._seq = (np.zeros(1, np.int64), np.ones(0, np.float32))   # offsets / weights of one-entry bags

    # ------------------------------------------------------------------ examples -> bags
    def _pool(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        emb, lin = self._pool_arrays(batch.indices, batch.offsets, batch.weights)
        return emb, lin[:, 0]

    def _one_entry_bags(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Offsets ``0..n`` and ``n`` weights 1 (views of arrays kept for later calls)."""
        seq = self._seq
        if len(seq[1]) < n:
            size = max(n, 2 * len(seq[1]), 1024)
            seq = self._seq = (np.arange(size + 1, dtype=np.int64), np.ones(size, np.float32))
        return seq[0][:n + 1], seq[1][:n]

    def pool(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        """``emb`` float32 ``[n, F, dim]`` and ``lin`` float32 ``[n, F]`` of the ``n`` examples of ``batch``."""
        if not isinstance(batch, EncodedBatch):
            raise TypeError(f"expected an EncodedBatch, got {type(batch).__name__}")
        if batch.n_fields != self.n_fields:
            raise ValueError(f"the batch has {batch.n_fields} fields, the bundle's schema has {self.n_fields}")
        emb, lin = self._pool_arrays(batch.indices, batch.offsets, batch.weights)
        return emb.reshape(-1, self.n_fields, self.dim), lin.reshape(-1, self.n_fields)

    def logits(self, batch: EncodedBatch) -> np.ndarray:
        """Logits, float32 ``[n]``, of fully encoded examples (all schema fields)."""
        emb, lin = self.pool(batch)
        if len(emb) == 0:
            return np.zeros(0, np.float32)
        return self._logits(emb, lin)

    def __call__(self, batch: EncodedBatch) -> np.ndarray:
        """Click probabilities, float32 ``[n]``."""
        if not isinstance(batch, EncodedBatch):
            raise TypeError(f"expected an EncodedBatch, got {type(batch).__name__}")
        F = self.n_fields
        if batch.n_fields != F:
            raise ValueError(f"the batch has {batch.n_fields} fields, the bundle's schema has {F}")
        n = len(batch)
        if n == 0:
            return np.zeros(0, np.float32)
        return self._score_bags(batch.indices, batch.offsets, batch.weights, n)

    score_examples = __call__

    def __repr__(self) -> str:
        return f"CtrRanker({str(self.bundle.path)!r}, kind={self.kind!r}, fields={self.n_fields}, dim={self.dim})"

    def add_items(self, features: list, content: np.ndarray | None = None) -> None:
        """Append items to the item feature store (ids ``n_items, n_items + 1, ...``), each described by a
        mapping of its item fields' values (a missing field is a missing value; None: all missing) and, for a
        model with content fields, by its text vector (``content`` ``[n, c]``; zeros or None: no text) through
        the bundle's :class:`~rec_engine.content.ContentProjection`, as training built them. The
        store is copied into growable buffers once, at the first addition; each call then publishes a new
        store object holding views of them, so a request in flight keeps the one it read."""
        if self.items is None or not features:
            return
        from .catalogue import GrowingRows

        cols = {n: [(f or {}).get(n) for f in features] for n in self.item_fields}
        if self.content is not None:
            if content is not None and np.shape(content)[-1:] == (self.content.dim,):
                cols.update(self.content.features(content))
            else:
                cols.update({n: [None] * len(features) for n in self.content.names})
        b = self.schema.encode(cols, fields=self.item_fields)
        st, F = self.items, self.items.n_fields
        grow = getattr(self, "_grow", None)
        if grow is None:
            grow = self._grow = {
                "indices": GrowingRows(st.batch.indices), "offsets": GrowingRows(st.batch.offsets),
                "weights": GrowingRows(st.batch.weights),
                "rows": GrowingRows(st.rows) if st.rows is not None else None}
        last = int(grow["offsets"].view[-1])
        indices = grow["indices"].append(b.indices)
        weights = grow["weights"].append(b.weights)
        offsets = grow["offsets"].append(b.offsets[1:] + last)
        rows = None
        if grow["rows"] is not None:
            if b.single_valued and bool(np.all(b.weights == 1.0)):
                rows = grow["rows"].append(np.asarray(b.indices, np.int64).reshape(-1, F))
            else:
                grow["rows"] = None                  # from now on the general (pooling) path for every item
        new = _Store.__new__(_Store)
        new.batch = EncodedBatch(indices, offsets, weights, F)
        new.n, new.n_fields, new.rows = len(new.batch), F, rows
        self.items = new
        self.n_items = new.n

    def score_rows(self, rows: list[Mapping[str, Any]]) -> np.ndarray:
        """Click probabilities of examples given as ``{field: value}`` dicts (missing fields are empty)."""
        return self(self.schema.encode_rows(rows))

    def _names_set(self) -> set:
        return set(self.schema.names)

    def pair_inputs(self, pair: Mapping[str, np.ndarray] | None, n: int) -> dict:
        """Checked per-candidate values of the pair fields (missing ones: NaN, a missing value)."""
        out = {}
        pair = pair or {}
        unknown = set(pair) - set(self.pair_fields)
        if unknown:
            raise ValueError(f"pair features the ranking model does not know: {sorted(unknown)}")
        for name in self.pair_fields:
            x = pair.get(name)
            x = np.full(n, np.nan) if x is None else np.asarray(x, np.float64).reshape(-1)
            if len(x) != n:
                raise ValueError(f"pair feature {name!r} has {len(x)} values for {n} candidates")
            out[name] = x
        return out

    def _put_pairs(self, emb: np.ndarray, lin: np.ndarray, pair: dict) -> None:
        """Write the pair fields' columns: the field's row scaled by the standardized value (0: missing)."""
        for name, x in pair.items():
            fi, field, row, lrow = self._pair_rows[name]
            if field.transform == "log1p":
                x = np.sign(x) * np.log1p(np.abs(x))
            z = np.where(np.isfinite(x), (x - field.mean) / field.std, 0.0).astype(np.float32)
            emb[:, fi, :] = z[:, None] * row
            lin[:, fi] = z * lrow

    def score_candidates(self, user: int, candidates: np.ndarray, context: Mapping[str, Any] | None = None,
                         pair: Mapping[str, np.ndarray] | None = None, *, threads: int | None = None,
                         top: int | None = None) -> np.ndarray:
        """Click probabilities ``[N]`` of ``candidates`` (item ids) for ``user`` in ``context``; ``pair``: the
        values of the model's pair fields per candidate (``{name: [N]}``; a field not given is missing);
        ``threads``: of the pooling and the dense part (None: the ranker's ``num_threads`` and
        ``request_threads``). ``top``: only the ``top`` best are wanted: where the dense part's screen runs (float32
        ranking on a CPU with AMX-BF16 tiles, see :mod:`rec_engine.native_dense`), candidates whose probability is
        certainly below the ``top``-th best's come back as -1 and the others with their float32 probability, so
        the best ``top`` are exactly those of the call without it."""
        if self.items is None:
            raise RecEngineError("this ranking bundle has no item feature store: score examples with score_rows")
        if threads is not None:
            threads = at_least_one(threads, "threads")
        if top is not None:
            top = at_least_one(top, "top")
        part = self._parts(user, context)
        cands = np.asarray(candidates, np.int64)
        N = len(cands)
        if N == 0:
            return np.zeros(0, np.float32)
        pairs = self.pair_inputs(pair, N) if self.pair_fields else None
        if N <= 32:
            c = cands.ravel().tolist()
            bad = min(c) < 0 or max(c) >= self.items.n
        else:
            bad = cands.min() < 0 or cands.max() >= self.items.n
        if bad:
            raise IndexError(f"candidate ids must be in [0, {self.items.n})")
        return self._score_one(user, cands, part, pairs, threads, top)

    def _score_one(self, user: int, cands: np.ndarray, part, pairs: dict | None, threads: int | None,
                   top: int | None = None) -> np.ndarray:
        """:meth:`score_candidates` of checked candidates ``cands`` (int64, at least one) and ``part``
        (``_parts``), ``pairs`` (``pair_inputs``), ``top`` (as there)."""
        N, F, d = len(cands), self.n_fields, self.dim
        users, parts, lengths = (user,), (part,), (N,)
        if pairs is None and self._rows_apply(parts):
            # every bag holds one row of weight 1: the [N, F] row matrix, then one lookup per table that
            # writes emb and lin in the model's layout (no scatter)
            if N == 1 and self._order is not None:   # user, item and context fields in one of the 6 orders
                known, ctx, usr = part
                urow = (self.users.rows[user] if known else usr[0]) if self.user_fields else None
                pieces = {"user": urow, "item": self.items.rows[cands[0]], "ctx": ctx[0]}
                ids = np.concatenate([pieces[g] for g in self._order])
            else:
                ids = self._row_matrix(users, cands, lengths, parts)
            offsets, weights = self._one_entry_bags(N * F)
            return self._score_bags(ids.reshape(-1), offsets, weights, N, groups=lengths, threads=threads, top=top)
        # the general case (multi-valued or numeric features, missing values): pool each entity's bags, then
        # place them (into the runner's bound input buffers when the candidates fit)
        bound = self.runner.bound_inputs(N, lengths, threads)
        if bound is None:
            emb, lin = np.empty((N, F, d), np.float32), np.empty((N, F), np.float32)
            self._fill_pooled(emb, lin, users, cands, lengths, parts, threads)
            if pairs is not None:
                self._put_pairs(emb, lin, pairs)
            return self._sigmoid(self._logits(emb, lin, groups=lengths))
        emb, lin, run = bound

        def prep() -> None:
            # the user's and the context's fields (and the pairs') on every row: on the calling thread, while
            # the other row chunks pool their item fields
            self._fill_entities(emb, lin, users, lengths, parts)
            if pairs is not None:
                self._put_pairs(emb, lin, pairs)

        def fill(a: int, z: int, chunked: bool) -> None:
            # the candidates' item fields, rows a..z: each row chunk pools its own on its thread before its
            # dense part runs (no pooling call over all of them that every chunk waits for)
            self._fill_items(emb, lin, cands[a:z], 1 if chunked else threads, a)

        return run(fill, prep, top)

    def _parts(self, user: int, context: Mapping[str, Any] | None):
        """``(known, context part, guest part)`` of one request (parts as :meth:`_encode_part` gives them;
        the guest part describes a user the store does not know, from the context)."""
        context = context or {}
        key = self._context_key(context)
        ctx = None if key is None else self._ctx_cache.get(key)
        if ctx is None:   # a context not seen lately (or not cacheable): check it
            unknown = set(context) - self._names
            if unknown:
                raise ValueError(f"context has fields the ranking model does not know: {sorted(unknown)}")
            ctx = self._encode_part(context, self.context_fields, key, self._ctx_cache)
        known = self.users is not None and 0 <= user < self.users.n
        usr = None
        if self.user_fields and not known:   # a user the store does not know: its fields come from the context
            usr = None if key is None else self._guest_cache.get(key)
            if usr is None:
                usr = self._encode_part(context, self.user_fields, key, self._guest_cache)
        return known, ctx, usr

    def _rows_apply(self, parts) -> bool:
        """Whether every bag of these requests holds one row of weight 1 (the row-matrix path)."""
        return (self.items.rows is not None and all(c[0] is not None for _, c, _ in parts)
                and (not self.user_fields
                     or all((self.users.rows is not None) if kn else (g[0] is not None) for kn, _, g in parts)))

    @staticmethod
    def _spread(rows: list, lengths) -> np.ndarray:
        """Per-request rows repeated over each request's examples (one request: its row, broadcast)."""
        return rows[0] if len(rows) == 1 else np.repeat(np.stack(rows), lengths, axis=0)

    def _row_matrix(self, users, cands: np.ndarray, lengths, parts) -> np.ndarray:
        """The ``[M, F]`` table rows of the examples (``_rows_apply`` holds): requests ``j`` with ``users[j]``
        and ``parts[j]`` own ``lengths[j]`` consecutive candidates of ``cands``."""
        sel = self._sel
        ids = np.empty((len(cands), self.n_fields), np.int64)
        ids[:, sel["item"]] = self.items.rows[cands]
        if self.user_fields:
            ids[:, sel["user"]] = self._spread([self.users.rows[int(u)] if kn else g[0]
                                                for u, (kn, _, g) in zip(users, parts)], lengths)
        if self.context_fields:
            ids[:, sel["ctx"]] = self._spread([c[0] for _, c, _ in parts], lengths)
        return ids

    def _fill_pooled(self, emb: np.ndarray, lin: np.ndarray, users, cands: np.ndarray, lengths, parts,
                     nt: int | None = None) -> None:
        """Writes the pooled inputs ``emb [M, F, d]``, ``lin [M, F]`` of the examples (layout as in
        :meth:`_row_matrix`), pooling each entity's bags."""
        self._fill_items(emb, lin, cands, nt)
        self._fill_entities(emb, lin, users, lengths, parts)

    def _fill_items(self, emb: np.ndarray, lin: np.ndarray, cands: np.ndarray, nt: int | None = None,
                    row0: int = 0) -> None:
        """Writes the item fields of rows ``row0 .. row0 + len(cands)`` of ``emb [M, F, d]`` and ``lin [M, F]``:
        the candidates' bags straight from the store into their rows (one core call on ``nt`` threads)."""
        M, d, F = len(emb), self.dim, self.n_fields
        st = self.items
        fi, m = st.n_fields, len(cands)
        bags = (cands[:, None] * fi + np.arange(fi)).reshape(-1)
        dest = (np.arange(row0, row0 + m)[:, None] * F + self.item_pos).reshape(-1)
        bs, nt = st.batch, self._nt if nt is None else nt
        try:   # (the linear weights in the same call: the store is read once)
            self._select(bs.indices, bs.offsets, bs.weights, bags, dest, emb.reshape(M * F, d), nt, self._lin_table,
                         lin.reshape(M * F, 1))
        except TypeError:      # a store of other dtypes (built by hand): take the bags, then pool them
            e, li = self._pool(bs.take(cands))
            emb[row0:row0 + m, self._sel["item"]] = e.reshape(m, -1, d)
            lin[row0:row0 + m, self._sel["item"]] = li.reshape(m, -1)

    def _fill_entities(self, emb: np.ndarray, lin: np.ndarray, users, lengths, parts) -> None:
        """Writes the user and context fields of ``emb [M, F, d]`` and ``lin [M, F]`` (requests as in
        :meth:`_row_matrix`)."""
        sel = self._sel
        if self.user_fields:
            ue, ul = [], []
            for u, (kn, _, g) in zip(users, parts):
                if kn:   # the user's bags are consecutive in the store: pool them in place
                    st, fu, u = self.users, self.users.n_fields, int(u)
                    off = st.batch.offsets[u * fu:(u + 1) * fu + 1]
                    a, b = int(off[0]), int(off[-1])
                    e1, l1 = self._pool_arrays(st.batch.indices[a:b], off - a, st.batch.weights[a:b])
                    ue.append(e1)
                    ul.append(l1[:, 0])
                else:
                    ue.append(g[1])
                    ul.append(g[2])
            emb[:, sel["user"]] = self._spread(ue, lengths)
            lin[:, sel["user"]] = self._spread(ul, lengths)
        if self.context_fields:
            emb[:, sel["ctx"]] = self._spread([c[1] for _, c, _ in parts], lengths)
            lin[:, sel["ctx"]] = self._spread([c[2] for _, c, _ in parts], lengths)

    def score_candidates_batch(self, users: Sequence[int], candidates: Sequence[np.ndarray],
                               contexts: Sequence[Mapping[str, Any] | None] | None = None, *,
                               chunk_rows: int = _BATCH_ROWS, then=None, top: int | None = None) -> list:
        """Click probabilities of each user's candidates: ``[score_candidates(u, c, ctx) for ...]``, computed
        with one feature lookup and one ONNX call (the batch session, see ``batch_threads``) per chunk of at
        most ``chunk_rows`` examples (whole users; a user with more candidates is a chunk of its own). A batch
        of one user is :meth:`score_candidates` on the batch's threads; a batch of users that each have two row
        chunks' worth of candidates or more is scored user by user on the batch's threads, each user as
        :meth:`score_candidates` on one thread (``chunk_rows`` does not apply; see ``batch_threads``).

        ``then(j, probs)``, when given, is applied to user ``j``'s probabilities and the list holds what it
        returns: user by user, on the thread that scored the user, while its scores are still in that core's
        cache (``Engine.recommend_batch`` picks each user's best there: 256 users x 500 candidates took
        7.5 ms on the calling thread afterwards); it must be safe to call from several threads at once. ``top``: as
        in :meth:`score_candidates`, for each user."""
        if top is not None:
            top = at_least_one(top, "top")
        if self.items is None:
            raise RecEngineError("this ranking bundle has no item feature store: score examples with score_rows")
        B = len(users)
        if len(candidates) != B or (contexts is not None and len(contexts) != B):
            raise ValueError("users, candidates and contexts must have the same length")
        cands = [np.asarray(c, np.int64).reshape(-1) for c in candidates]
        lengths = np.array([len(c) for c in cands], np.int64)
        flat = np.concatenate(cands) if B else np.zeros(0, np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.items.n):
            raise IndexError(f"candidate ids must be in [0, {self.items.n})")
        if B == 1 and 0 < len(flat) <= self.runner.bind_rows:
            # a lone request (a server's batch of one): the request path, its pooling and rows on the batch's
            # threads
            p = self.score_candidates(int(users[0]), flat, None if contexts is None else contexts[0],
                                      threads=self._chunk_workers or None, top=top)
            return [p if then is None else then(0, p)]
        parts = [self._parts(int(u), None if contexts is None else contexts[j]) for j, u in enumerate(users)]
        workers = self._chunk_workers
        per_user = self.runner.chunk_min_rows * _PER_USER_CHUNKS
        if (workers > 1 and B > 1 and per_user and self.runner.one_thread_session
                and per_user <= lengths.min() and lengths.max() <= self.runner.bind_rows):
            # users with enough rows each to pay for an ONNX call: the request path, one user at a time on each
            # of the batch's threads (its bound buffers, one-thread pooling and dense part, the split's first
            # layer once per user): 500 candidates of a DeepFM 400-400-400 run at ~3.5 us a row there, ~4.1 in
            # chunks of two users (their activations outgrow the core's L2, and the inputs are new arrays).
            # Only with a one-thread session: several of a multi-thread session's calls at once would ask for
            # more threads than cores
            out: list = [None] * B
            order = itertools.count()     # (next() on it is atomic under the GIL)

            def score_share(t: int) -> None:
                # the next user not taken yet, until none is left: a thread that loses its core for a while (a
                # shared machine) does not hold the batch up with a fixed share, the others take its users
                while (j := next(order)) < B:
                    p = self._score_one(int(users[j]), cands[j], parts[j], None, 1, top)
                    out[j] = p if then is None else then(j, p)

            # the calling thread takes a share too; every share has ended before this returns or raises
            run_at_once(self._chunk_threads(), [lambda t=t: score_share(t) for t in range(min(workers, B))])
            return out
        ends = np.concatenate([[0], np.cumsum(lengths)])
        if workers > 1:   # at least as many chunks as workers when the batch allows it
            chunk_rows = max(1, min(chunk_rows, -(-int(ends[-1]) // workers)))
        chunks = []
        j0 = 0
        while j0 < B:    # chunks of whole users
            j1 = j0 + 1
            while j1 < B and ends[j1 + 1] - ends[j0] <= chunk_rows:
                j1 += 1
            chunks.append((j0, j1))
            j0 = j1

        def score(chunk, mode):
            j0, j1 = chunk
            return self._score_chunk(users[j0:j1], flat[ends[j0]:ends[j1]], lengths[j0:j1], parts[j0:j1], mode)

        if workers > 1 and len(chunks) > 1:
            probs = list(self._chunk_threads().map(lambda c: score(c, "chunk"), chunks))
        else:
            probs = [score(c, True) for c in chunks]
        out: list = []
        for (j0, j1), p in zip(chunks, probs):
            out.extend(np.split(p, np.cumsum(lengths[j0:j1])[:-1]))
        return out if then is None else [then(j, p) for j, p in enumerate(out)]

    def _chunk_threads(self):
        """The threads that score a batch's chunks at once (created at the first batch that has several)."""
        if self._chunk_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            with self._pool_lock:
                if self._chunk_pool is None:
                    self._chunk_pool = ThreadPoolExecutor(self._chunk_workers, thread_name_prefix="rec_engine-rank")
        return self._chunk_pool

    def _score_chunk(self, users, cands: np.ndarray, lengths: np.ndarray, parts, mode: bool | str = True) -> np.ndarray:
        """Probabilities of one chunk; ``mode``: True (the batch session, the batch's threads) or ``"chunk"``
        (one of several chunks scored at once: one thread)."""
        M, F = len(cands), self.n_fields
        if M == 0:
            return np.zeros(0, np.float32)
        if self._rows_apply(parts):
            offsets, weights = self._one_entry_bags(M * F)
            return self._score_bags(self._row_matrix(users, cands, lengths, parts).reshape(-1), offsets, weights, M,
                                    batch=mode, groups=lengths)
        emb, lin = np.empty((M, F, self.dim), np.float32), np.empty((M, F), np.float32)
        self._fill_pooled(emb, lin, users, cands, lengths, parts, 1 if mode == "chunk" else self._batch_nt)
        return self._sigmoid(self._logits(emb, lin, batch=mode, groups=lengths))

    @staticmethod
    def _context_key(context: Mapping[str, Any]):
        """A hashable key of ``context`` (its values with their types: 1, 1.0 and True encode differently),
        or None when a value is not hashable (then nothing is cached)."""
        key = tuple([(k, v, type(v)) for k, v in context.items()])
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def _encode_part(self, context: Mapping[str, Any], fields: list[str], key, cache: dict):
        """``(rows [len(fields)] or None, emb [len(fields), d], lin [len(fields)])`` of ``fields`` encoded
        from ``context`` (rows: when every bag holds one entry of weight 1), cached under ``key``; a context of
        hashable values of the key types is assembled from its fields' cached pieces (``_field_piece``)."""
        cacheable = key is not None and _KEY_TYPES.issuperset([k[2] for k in key])
        if not fields:
            part = (np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), np.zeros(0, np.float32))
        elif cacheable:
            # a context not in the cache as a whole: from its fields' pieces, each cached on its own (a field's
            # bag pooled alone is what the whole context's pooling gives it, bags being pooled independently),
            # since a field has few values where a context has their product (hour x page x country ...)
            pieces = [self._field_piece(n, context.get(n)) for n in fields]
            rows = [p[0] for p in pieces]
            part = (None if None in rows else np.array(rows, np.int64), np.stack([p[1] for p in pieces]),
                    np.array([p[2] for p in pieces], np.float32))
        else:
            part = self._encode_fields(context, fields)
        for a in part:
            if a is not None:
                a.flags.writeable = False
        if cacheable:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[key] = part
        return part

    def _encode_fields(self, context: Mapping[str, Any], fields: list[str]):
        """``(rows or None, emb [len(fields), d], lin [len(fields)])`` of ``fields`` encoded from ``context``."""
        b = self.schema.encode({n: [context.get(n)] for n in fields}, fields=fields)
        e, li = self._pool(b)
        single = len(b.indices) == len(fields) and b.single_valued and bool(np.all(b.weights == 1.0))
        return np.ascontiguousarray(b.indices, dtype=np.int64) if single else None, e, li

    def _field_piece(self, name: str, value):
        """``(row or None, emb [d], lin)`` of one field holding ``value`` (a hashable value of a key type),
        cached per field (a field of many values, a price say, empties only its own cache when it fills);
        every missing value (None, "", NaN: an empty bag) under one key."""
        cache = self._field_cache.get(name)
        if cache is None:
            cache = self._field_cache.setdefault(name, {})
        key = None if _missing(value) else (value, type(value))
        piece = cache.get(key)
        if piece is None:
            rows, e, li = self._encode_fields({name: value}, [name])
            piece = (None if rows is None else int(rows[0]), e[0], float(li[0]))
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[key] = piece
        return piece


def quantize_dense(onnx_path) -> bytes:
    """The dense part at ``onnx_path`` with its weights in int8 (ONNX Runtime's dynamic quantization: int8
    weights, activations quantized per call, matrix products in integers with VNNI): measured 2.7x faster for
    DeepFM's MLP 400-400-400 at 500 examples; probabilities move by up to ~1e-2 (``write_pipeline`` reports it for
    its models). Needs the ``onnx`` package."""
    import logging
    import tempfile

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise RecEngineError(f"int8 ranking needs the onnx package (pip install onnx), or a pipeline written with "
                             f"ranking_precision='int8' ({e})") from None
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "dense_int8.onnx")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)     # its advice to pre-process the model (a shape inference pass)
        try:
            quantize_dynamic(str(onnx_path), out, weight_type=QuantType.QInt8)
        finally:
            logging.disable(previous)
        with open(out, "rb") as fh:
            return fh.read()


def load_ranking(bundle: Bundle, session_options=None, *, num_threads: int | None = 1,
                 batch_threads: int | None = None, dense: bytes | None = None, request_threads: int = 1,
                 matmul_precision: str = "float32") -> CtrRanker:
    """The ranking model of ``bundle`` (kinds: lr, fm, widedeep, deepfm, xdeepfm)."""
    if bundle.kind not in RANKING_KINDS:
        raise BundleError(f"bundle {bundle.path} of kind {bundle.kind!r} is not a ranking model "
                          f"({', '.join(RANKING_KINDS)})")
    at_least_one(request_threads, "request_threads")     # (here: CtrRanker's errors below become BundleError)
    try:
        return CtrRanker(bundle, session_options, num_threads=num_threads, batch_threads=batch_threads, dense=dense,
                         request_threads=request_threads, matmul_precision=matmul_precision)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:   # a wrong meta or array
        raise BundleError(f"bundle {bundle.path} is malformed: {type(e).__name__}: {e}") from None


def dense_agreement(bundle: Bundle, dense: bytes | None = None, *, users: int = 64, n: int = 500, k: int = 10,
                    seed: int = 0, matmul_precision: str = "float32") -> dict:
    """How the ranking bundle's model with the dense part ``dense`` (None: its own), its products at
    ``matmul_precision``, agrees with its own in float32: over ``users`` users of its store (random), each with
    ``n`` random candidates and an empty context, the largest absolute difference of the click probabilities
    and the mean overlap of the top ``k``."""
    exact = load_ranking(bundle)
    other = load_ranking(bundle, dense=dense, matmul_precision=matmul_precision)
    if exact.items is None:
        return {}
    rng = np.random.default_rng(seed)
    n_users = exact.users.n if exact.users is not None else 1
    diff, overlap = 0.0, []
    for u in rng.choice(n_users, min(users, n_users), replace=False):
        cands = np.sort(rng.choice(exact.items.n, min(n, exact.items.n), replace=False))
        a, b = exact.score_candidates(int(u), cands), other.score_candidates(int(u), cands)
        diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b))))
        kk = min(k, len(cands))
        top_a = cands[np.lexsort((cands, -a))[:kk]]
        top_b = cands[np.lexsort((cands, -b))[:kk]]
        overlap.append(len(np.intersect1d(top_a, top_b)) / kk)
    out = {"max_abs_diff": diff, "top_overlap": float(np.mean(overlap)), "top_k": k, "users": len(overlap),
           "candidates": int(min(n, exact.items.n))}
    if matmul_precision != "float32":      # whether this machine ran the reduced products (else float32 again)
        out["tiles"] = bool(other.runner.native is not None and other.runner.native.tiles_active)
    return out
