"""Export a fitted GF-CF model (:class:`rec_engine_train.models.gfcf.GFCF`) as a bundle of kind "gfcf" or
"bspm" (the same format; both are served by ``rec_engine.retrieval.FilterRetrieval``), and read one back
(:func:`load_gfcf`) for batch scoring.

Bundle format (what serving is written against). With ``R~ = D_u^-1/2 R D_i^-1/2`` the normalized train
matrix and ``V`` its top ``k`` right singular vectors, the scores of a user with binary item row ``r``
(1 x n_items) are::

    s = lin(r) + alpha * (r @ items_lowrank_query) @ items_lowrank^T
    lin(r) = R~^T (R~ r^T)                      (then, sharpened:  lin <- sum_j c_j P^j lin,  P = R~^T R~)

with ``c = meta.sharpen_poly`` (lowest power first; ``[1]`` means no sharpening; bundles written before
it existed hold only ``meta.sharpen = t``, which means ``c = [1, -t]``).

Arrays (``bundle.array(name)``):

- ``norm_indptr`` int64 [n_users + 1], ``norm_indices`` int32 [nnz], ``norm_data`` float32 [nnz]: ``R~`` as
  CSR (rows users, columns items, sorted columns); ``R~^T`` is its transpose (build its CSR once at load).
- ``item_inv_sqrt_degree`` float32 [n_items]: ``D_i^-1/2`` (0 for items without train interactions).
- ``train_indptr`` int64 [n_users + 1], ``train_items`` int64 [nnz]: each user's distinct train items,
  sorted (the binary rows ``r`` of train users, and the exclusion lists).
- ``item_counts`` int64 [n_items]: train interactions per item (repeats counted).

Tables (``bundle.table(name)``, float32 unless ``table_dtype`` says otherwise):

- ``items_lowrank`` [n_items, k]: ``D_i^1/2 V`` (already passed through the sharpening polynomial), the item factor of the low-rank part.
- ``items_lowrank_query`` [n_items, k]: ``D_i^-1/2 V``; ``r @ items_lowrank_query`` is a user's factor,
  so a new row (fold-in) gets its factor from its items alone.
- ``users_lowrank`` [n_users, k]: ``alpha * r_u @ items_lowrank_query`` for every train user (alpha
  included), so the low-rank part of a train user is ``users_lowrank[u] @ items_lowrank^T``.

Meta: ``n_users``, ``n_items``, ``alpha``, ``k_ideal`` (= k, the columns of the low-rank tables),
``sharpen``, ``sharpen_solver``, ``sharpen_steps``, ``sharpen_poly``, ``svd``, ``n_iter``, ``oversample``, ``seed``, ``metrics``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from rec_engine import CsrMatrix, IdLists
from rec_engine.bundle import Bundle, BundleError, open_bundle, write_bundle
from rec_engine.kinds import get_kind

from .models.gfcf import GFCF


def export_gfcf(model: GFCF, path: str | os.PathLike, *, metrics: Mapping[str, float] | None = None,
                table_dtype: str = "float32", overwrite: bool = False, kind: str = "gfcf",
                keys: Mapping | None = None, training: Mapping | None = None) -> Path:
    """Write the fitted ``model`` as a bundle at ``path`` (format in the module docstring).

    Parameters
    ----------
    model : GFCF, fitted
    metrics : mapping, optional  evaluation results recorded in the meta
    table_dtype : {"float32", "float16", "int8"}  storage of the low-rank tables
    overwrite : bool  replace an existing bundle
    kind : str  the bundle's kind, a kind of the "filter" family: "gfcf" (default) or "bspm" (what the CLI
        names a sharpened filter); both hold the same format
    keys : mapping, optional  the users' own keys (``{"user": [...], "item": [...]}`` in dense-id order)

    Returns
    -------
    Path of the bundle.

    Raises
    ------
    TypeError  ``model`` is not a GFCF.
    RuntimeError  ``model`` is not fitted.
    ValueError  ``kind`` is not a filter kind.
    """
    if not isinstance(model, GFCF):
        raise TypeError(f"export_gfcf needs a GFCF model, got {type(model).__name__}")
    model._check_fitted()
    if get_kind(kind).family != "filter":
        raise ValueError(f"export_gfcf writes kinds of the filter family, not {kind!r}")
    users = np.arange(model.n_users, dtype=np.int64)
    users_lowrank = np.zeros((model.n_users, model.v_left.shape[1]), np.float32)
    for start in range(0, model.n_users, model.batch_size):
        rows = model._user_rows(users[start:start + model.batch_size])
        users_lowrank[start:start + rows.shape[0]] = model.alpha * (rows @ model.v_left)
    arrays = {
        "norm_indptr": model.norm.indptr, "norm_indices": model.norm.indices, "norm_data": model.norm.data,
        "item_inv_sqrt_degree": model._inv_i.astype(np.float32),
        "train_indptr": model.train_lists.indptr, "train_items": model.train_lists.ids,
        "item_counts": model.item_counts,
    }
    tables = {"items_lowrank": model.v_right, "items_lowrank_query": model.v_left, "users_lowrank": users_lowrank}
    meta = {"n_users": model.n_users, "n_items": model.n_items, "alpha": model.alpha,
            "k_ideal": int(model.v_left.shape[1]), "sharpen": model.sharpen,
            "sharpen_solver": model.sharpen_solver, "sharpen_steps": model.sharpen_steps,
            "sharpen_poly": [float(c) for c in model.sharpen_poly], "svd": model.svd,
            "n_iter": model.n_iter, "oversample": model.oversample, "seed": model.seed,
            "metrics": dict(metrics or {}), **({"training": dict(training)} if training else {})}
    extra = {} if keys is None else {"keys": keys}
    return write_bundle(path, kind=kind, meta=meta, tables=tables, arrays=arrays, table_dtype=table_dtype,
                        overwrite=overwrite, **extra)


def load_gfcf(bundle: Bundle | str | os.PathLike, *, num_threads: int | None = None) -> GFCF:
    """A fitted :class:`GFCF` rebuilt from a filter bundle (kinds "gfcf", "bspm"), for its batched
    :meth:`~GFCF.recommend` (the serving path, ``FilterRetrieval``, scores one user at a time). Its scores
    are the exporting model's (the tables dequantized when stored as float16 / int8)."""
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    if get_kind(b.kind).family != "filter":
        raise BundleError(f"bundle {b.path} has kind {b.kind!r}, not a graph filter (gfcf, bspm)")
    meta = b.meta
    n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
    sharpen = float(meta.get("sharpen", 0.0))
    model = GFCF(alpha=float(meta["alpha"]), k_ideal=int(meta["k_ideal"]), sharpen=sharpen,
                 sharpen_solver=meta.get("sharpen_solver", "euler"), sharpen_steps=int(meta.get("sharpen_steps", 1)),
                 seed=int(meta.get("seed", 0)), num_threads=num_threads)
    model.sharpen_poly = np.asarray(meta.get("sharpen_poly", [1.0, -sharpen] if sharpen > 0 else [1.0]), np.float64)
    model.norm = CsrMatrix(b.array("norm_indptr"), b.array("norm_indices"), b.array("norm_data"), (n_users, n_items))
    model.norm_t = model.norm.transpose()
    model._inv_i = b.array("item_inv_sqrt_degree").astype(np.float64)
    model.train_lists = IdLists(b.array("train_indptr"), b.array("train_items"))
    model.item_counts = b.array("item_counts")
    model.v_left = np.ascontiguousarray(b.table("items_lowrank_query").to_numpy())
    model.v_right = np.ascontiguousarray(b.table("items_lowrank").to_numpy())
    model.n_users, model.n_items = n_users, n_items
    model._fitted = True
    return model
