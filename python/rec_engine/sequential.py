"""Sequential models served from a bundle (SASRec): histories in, user vectors out, with NumPy, the
core and ONNX Runtime (no torch).

A SASRec bundle (kind ``"sasrec"``) holds the table ``items`` ``[n_items, dim]`` (it embeds the history,
looked up by the core, AND is the output matrix scored by top-k), ``encoder.onnx`` (inputs ``seq_emb``
float32 ``[batch, max_len, dim]`` and ``mask`` float32 ``[batch, max_len]``, output ``user`` float32
``[batch, dim]``, dynamic batch axis), the known users' histories (``history_indptr`` /
``history_items``, CSR, oldest first) and ``item_counts``. A history enters the encoder as its latest
``max_len`` items, LEFT-padded (:func:`pad_histories`); an empty history has no user vector.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .bundle import BundleError, onnx_session, open_bundle
from .topk import IdLists, TopK, topk

KIND = "sasrec"
OUTPUT = "user"


def as_lists(histories) -> IdLists:
    """Histories (a sequence of integer id arrays, or an IdLists) as an IdLists; TypeError/ValueError naming
    the history otherwise."""
    if isinstance(histories, IdLists):
        return histories
    if isinstance(histories, np.ndarray) and histories.ndim == 1 and histories.dtype != object:
        raise TypeError("histories must be a sequence of id arrays (one per user) or an IdLists, got a 1-D array; "
                        "wrap a single history in a list")
    arrays = []
    for q, h in enumerate(histories):
        a = np.asarray(h)
        if a.size == 0 and a.dtype.kind == "f":        # np.asarray([]) is float64
            a = a.astype(np.int64)
        if a.dtype.kind not in "iu":
            raise TypeError(f"histories[{q}] must hold integer item ids, got dtype {a.dtype}")
        if a.ndim != 1:
            raise ValueError(f"histories[{q}] must be 1-D, got shape {a.shape}")
        arrays.append(a.astype(np.int64, copy=False))
    indptr = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.shape[0] for a in arrays], out=indptr[1:])
    return IdLists(indptr, np.concatenate(arrays) if arrays else np.zeros(0, np.int64))


def pad_histories(histories, max_len: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The latest ``max_len`` items of each history, left-padded.

    Parameters
    ----------
    histories : sequence of 1-D integer arrays (oldest item first), or an IdLists
    max_len, n_items : int

    Returns
    -------
    ids : int64 [U, max_len]
        Item ids; padded positions hold 0 (any id would do: the mask removes them).
    mask : float32 [U, max_len]
        1 at real items, 0 at padding.

    Raises
    ------
    ValueError  an empty history (it has no user vector); IndexError  an item id outside ``[0, n_items)``,
    naming the history and the position; TypeError  non-integer ids.
    """
    lists = as_lists(histories)
    starts, ends = lists.indptr[:-1], lists.indptr[1:]
    empty = np.flatnonzero(ends == starts)
    if empty.size:
        raise ValueError(f"histories[{int(empty[0])}] is empty: SASRec needs at least one item to build a user "
                         "vector (serve cold users from another model, e.g. popularity)")
    bad = np.flatnonzero((lists.ids < 0) | (lists.ids >= n_items))
    if bad.size:
        q = int(np.searchsorted(lists.indptr, bad[0], side="right") - 1)
        raise IndexError(f"histories[{q}][{int(bad[0] - lists.indptr[q])}] = {int(lists.ids[bad[0]])} is not an "
                         f"item id in [0, {n_items})")
    where = ends[:, None] - max_len + np.arange(max_len)                 # flat index of each slot
    real = where >= starts[:, None]
    ids = np.where(real, lists.ids[np.maximum(where, 0)] if lists.ids.size else 0, 0).astype(np.int64)
    return ids, real.astype(np.float32)


def check_candidates(candidates, n_rows: int, n_items: int) -> np.ndarray:
    """``candidates`` as int64 [n_rows, C] of item ids in ``[0, n_items)``; TypeError / ValueError /
    IndexError (naming the entry) otherwise."""
    cand = np.asarray(candidates)
    if cand.dtype.kind not in "iu" or cand.ndim != 2:
        raise TypeError(f"candidates must be a 2-D integer array [users, C], got {cand.dtype} {cand.shape}")
    if cand.shape[0] != n_rows:
        raise ValueError(f"candidates has {cand.shape[0]} rows for {n_rows} histories")
    bad = np.flatnonzero((cand < 0) | (cand >= n_items))
    if bad.size:
        r, c = np.unravel_index(bad[0], cand.shape)
        raise IndexError(f"candidates[{r}, {c}] = {int(cand[r, c])} is not an item id in [0, {n_items})")
    return cand.astype(np.int64, copy=False)


class SASRecScorer:
    """User vectors and recommendations from a SASRec bundle (see :func:`load_sasrec_scorer`).

    Attributes
    ----------
    n_items, dim, max_len : int
    table : rec_engine.EmbeddingTable  the ``items`` table (memory-mapped)
    items : float32 [n_items, dim]  the table as float32 (dequantized once for float16 / int8 storage)
    """

    def __init__(self, bundle, session_options=None, num_threads: int | None = 1):
        if bundle.kind != KIND:
            raise BundleError(f"bundle {bundle.path} is of kind {bundle.kind!r}, not {KIND!r}")
        meta = bundle.meta
        self.n_items, self.dim, self.max_len = int(meta["n_items"]), int(meta["dim"]), int(meta["max_len"])
        self.table = bundle.table("items")
        if self.table.shape != (self.n_items, self.dim):
            raise BundleError(f"bundle {bundle.path}: table items is {self.table.shape}, meta says "
                              f"({self.n_items}, {self.dim})")
        self.items = np.ascontiguousarray(self.table.weights if self.table.dtype == "float32"
                                          else self.table.to_numpy())
        self.session = onnx_session(bundle.onnx_path("encoder"), session_options,
                                    what=f"bundle {bundle.path}: encoder.onnx")
        self.num_threads = num_threads

    def user_vectors(self, histories: Sequence, batch_size: int = 1024) -> np.ndarray:
        """User vectors of histories (oldest item first; the latest ``max_len`` are used): float32 [U, dim].

        Raises ValueError for an empty history, IndexError for an item id outside ``[0, n_items)``."""
        ids, mask = pad_histories(histories, self.max_len, self.n_items)
        out = np.empty((ids.shape[0], self.dim), np.float32)
        for start in range(0, ids.shape[0], batch_size):
            emb = self.table.gather(ids[start:start + batch_size], num_threads=self.num_threads)
            out[start:start + emb.shape[0]] = self.session.run(
                [OUTPUT], {"seq_emb": emb, "mask": mask[start:start + batch_size]})[0]
        return out

    def score(self, histories: Sequence, candidates) -> np.ndarray:
        """Inner products of each history's user vector with its candidate items (int [U, C]): float32 [U, C]."""
        lists = as_lists(histories)
        cand = check_candidates(candidates, len(lists), self.n_items)
        return np.einsum("ucd,ud->uc", self.items[cand], self.user_vectors(lists)).astype(np.float32)

    def recommend(self, histories: Sequence, k: int, exclude_seen: bool = True) -> TopK:
        """The ``k`` best items per history by inner product, best first (:func:`rec_engine.topk`);
        ``exclude_seen`` drops the history's own items. Returns TopK of shape [U, min(k, n_items)]."""
        lists = as_lists(histories)
        users = self.user_vectors(lists)
        return topk(users, self.items, k, exclude=lists if exclude_seen else None, num_threads=self.num_threads)


def load_sasrec_scorer(bundle_path: str | os.PathLike, *, intra_op_threads: int = 1,
                       num_threads: int | None = 1) -> SASRecScorer:
    """Open a SASRec bundle for scoring with NumPy, the core and onnxruntime.

    ``intra_op_threads``: onnxruntime threads of the encoder; ``num_threads``: core threads of the lookup
    and top-k (None: the core's default). Keep both at 1 inside a multi-threaded server."""
    import onnxruntime as ort

    bundle = open_bundle(bundle_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = 1
    return SASRecScorer(bundle, opts, num_threads)
