"""Export graph / CF models (MF, LightGCN, NGCF, popularity) to bundles, and score from a bundle.

Bundle contents (kind = the model kind):

- tables ``users`` ``[n_users, D]`` and ``items`` ``[n_items, D]``: the final vectors, scored by inner
  product; LightGCN adds ``users_ego`` / ``items_ego``, the layer-0 embeddings, so serving can fold new
  interactions in by propagating ``ego`` over an updated adjacency;
- arrays ``adj_indptr`` / ``adj_indices`` / ``adj_data``: the core's normalized adjacency (CSR, users
  first, then items), ``train_indptr`` / ``train_items``: each user's distinct train items (CSR, for
  exclusion), ``item_counts``: train interactions per item;
- meta ``n_users``, ``n_items``, ``dim``, ``n_layers``, ``layer_weights``, ``params``, ``metrics``;
- with ``content`` (``rec-engine train --items``): arrays ``content_vectors`` ``[n_items, 384]`` and
  ``content_map`` ``[385, D]`` and ``meta["content"]`` (:mod:`rec_engine_train.content_map`).

:func:`load_graph_scorer` needs NumPy and the core only (no torch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

import rec_engine
from rec_engine import IdLists, TopK
from rec_engine.bundle import BundleError, open_bundle, write_bundle
from rec_engine.kinds import names

from .data.containers import Interactions
from .evaluate import popularity_vectors, take_lists

GRAPH_KINDS = names(family="graph")         # the registry's vector kinds: mf, lightgcn, ngcf, popularity


def _train_lists(train: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """Each user's distinct train items, sorted: (indptr int64 [n_users + 1], items int64 [nnz])."""
    keys = np.unique(train.users * train.n_items + train.items)
    indptr = np.zeros(train.n_users + 1, np.int64)
    np.cumsum(np.bincount(keys // train.n_items, minlength=train.n_users), out=indptr[1:])
    return indptr, keys % train.n_items


def _graph_arrays(train: Interactions) -> dict[str, np.ndarray]:
    adj = rec_engine.normalized_adjacency(train.users, train.items, train.n_users, train.n_items)
    indptr, items = _train_lists(train)
    return {"adj_indptr": adj.indptr, "adj_indices": adj.indices, "adj_data": adj.data,
            "train_indptr": indptr, "train_items": items, "item_counts": train.item_counts()}


def export_graph(model, split_train: Interactions, path: str | os.PathLike, *, table_dtype: str = "float32",
                 metrics: Mapping[str, float] | None = None, overwrite: bool = False,
                 keys: Mapping | None = None, training: Mapping | None = None, content=None) -> Path:
    """Write a trained MF / LightGCN / NGCF model (from :func:`rec_engine_train.models.graph.train_graph`)
    as a bundle at ``path`` and return the path.

    Parameters
    ----------
    model : MF, LightGCN or NGCF
    split_train : Interactions  the interactions the model was trained on (graph and exclusion lists)
    table_dtype : {"float32", "float16", "int8"}  storage of the embedding tables
    metrics : mapping, optional  evaluation results to record in the meta
    keys : mapping, optional  the users' own keys (``{"user": [...], "item": [...]}`` in dense-id order)
    training : mapping, optional  what trained it (data source, TrainConfig fields): ``meta["training"]``
    content : ItemContent, optional  the items' content vectors (:func:`rec_engine_train.content_map.item_content`):
        stored with the ridge map from them to the exported ``items`` vectors (content vectors in float16 when
        ``table_dtype`` is not float32)

    Raises
    ------
    ValueError  the model is not a graph model, or its sizes differ from ``split_train``'s.
    """
    from .models.graph import KINDS, final_embeddings

    kind = getattr(model, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"export_graph needs one of the models {KINDS}, got {type(model).__name__}")
    if (model.n_users, model.n_items) != (split_train.n_users, split_train.n_items):
        raise ValueError(f"the model has {model.n_users} users x {model.n_items} items but split_train has "
                         f"{split_train.n_users} x {split_train.n_items}")
    users, items = final_embeddings(model)
    tables = {"users": users, "items": items}
    if kind == "lightgcn":
        user_ego, item_ego = model.ego()
        tables["users_ego"] = user_ego.detach().numpy()
        tables["items_ego"] = item_ego.detach().numpy()
    meta = {"n_users": model.n_users, "n_items": model.n_items, "dim": int(users.shape[1]),
            "n_layers": model.n_layers, "layer_weights": model.layer_weights, "params": dict(model.params),
            "metrics": dict(metrics or {}), **({"training": dict(training)} if training else {})}
    arrays = _graph_arrays(split_train)
    if content is not None:
        from .content_map import content_bundle_parts

        extra, meta["content"] = content_bundle_parts(
            content, items, vectors_dtype="float32" if table_dtype == "float32" else "float16",
            item_counts=split_train.item_counts())
        arrays.update(extra)
    return write_bundle(path, kind=kind, meta=meta, tables=tables, arrays=arrays,
                        table_dtype=table_dtype, overwrite=overwrite, **_keys(keys))


def export_popularity(item_counts, train: Interactions, path: str | os.PathLike, *,
                      metrics: Mapping[str, float] | None = None, overwrite: bool = False,
                      keys: Mapping | None = None, training: Mapping | None = None) -> Path:
    """Write the popularity baseline as a bundle of kind "popularity": ``users`` is ``[n_users, 1]`` of
    ones and ``items`` ``[n_items, 1]`` the counts, so it scores like any graph bundle.

    Parameters
    ----------
    item_counts : array_like of numbers, shape (n_items,)  e.g. ``train.item_counts()``
    train : Interactions  for the adjacency, the exclusion lists and the sizes
    keys : mapping, optional  the users' own keys, as in :func:`export_graph`
    """
    counts = np.asarray(item_counts)
    if counts.shape != (train.n_items,):
        raise ValueError(f"item_counts must hold {train.n_items} numbers (one per item), got shape {counts.shape}")
    users, items = popularity_vectors(counts, train.n_users)
    tables = {"users": users, "items": items}
    meta = {"n_users": train.n_users, "n_items": train.n_items, "dim": 1, "n_layers": 0,
            "layer_weights": None, "params": {}, "metrics": dict(metrics or {}),
            **({"training": dict(training)} if training else {})}
    return write_bundle(path, kind="popularity", meta=meta, tables=tables, arrays=_graph_arrays(train),
                        overwrite=overwrite, **_keys(keys))


def _keys(keys: Mapping | None) -> dict:
    """``write_bundle``'s ``keys`` argument, passed only when there are keys."""
    return {} if keys is None else {"keys": keys}


class GraphScorer:
    """Recommendations from a graph bundle: inner-product top-k of user vectors over item vectors.

    Attributes
    ----------
    kind : str
    user_vecs : float32 ``[n_users, D]``  memory-mapped for float32 tables, dequantized otherwise
    item_vecs : float32 ``[n_items, D]``
    train : IdLists  each user's train items
    """

    def __init__(self, bundle):
        if bundle.kind not in GRAPH_KINDS:
            raise BundleError(f"bundle {bundle.path} has kind {bundle.kind!r}, not a graph kind {GRAPH_KINDS}")
        self.kind = bundle.kind
        self.user_vecs = _float32_table(bundle.table("users"))
        self.item_vecs = _float32_table(bundle.table("items"))
        self.train = IdLists(bundle.array("train_indptr"), bundle.array("train_items"))
        if len(self.train) != self.user_vecs.shape[0]:
            raise BundleError(f"bundle {bundle.path}: train lists cover {len(self.train)} users, the users "
                              f"table {self.user_vecs.shape[0]}")

    @property
    def n_users(self) -> int:
        return int(self.user_vecs.shape[0])

    def recommend(self, users, k: int = 10, exclude_seen: bool = True) -> TopK:
        """The ``k`` best items for each user, best first.

        Parameters
        ----------
        users : int or array_like of int, shape (B,)
            One user gives 1-D results, a batch 2-D.
        k : int
        exclude_seen : bool  leave out each user's train items

        Returns
        -------
        TopK(ids int64, scores float32), shape ``(width,)`` or ``(B, width)``, ``width = min(k, n_items)``;
        slots without an eligible item hold id -1 and score -inf.

        Raises
        ------
        IndexError  a user id outside ``[0, n_users)``.
        """
        u = np.asarray(users)
        if u.dtype.kind not in "iu" or u.ndim > 1:
            raise TypeError(f"users must be an integer id or a 1-D array of them, got dtype {u.dtype} "
                            f"and shape {u.shape}")
        single = u.ndim == 0
        u = u.reshape(-1).astype(np.int64)
        bad = np.flatnonzero((u < 0) | (u >= self.n_users))
        if bad.size:
            raise IndexError(f"user id {int(u[bad[0]])} at position {int(bad[0])} is outside [0, {self.n_users})")
        exclude = take_lists(self.train, u) if exclude_seen else None
        out = rec_engine.topk(self.user_vecs[u], self.item_vecs, k, exclude=exclude)
        return TopK(out.ids[0], out.scores[0]) if single else out


def _float32_table(table) -> np.ndarray:
    return table.weights if table.dtype == "float32" else table.to_numpy()


def load_graph_scorer(path: str | os.PathLike) -> GraphScorer:
    """Open the graph bundle at ``path`` (kinds "mf", "lightgcn", "ngcf", "popularity") for scoring."""
    return GraphScorer(open_bundle(path))
