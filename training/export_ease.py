"""Export a fitted EASE^R model (:class:`rec_engine_train.models.ease.EASE`) as a bundle of kind "ease".

Bundle format (what :class:`rec_engine.item_item.ItemItemScorer` reads):

- table ``item_item`` ``[n_items, n_items]``: ``B``, zero diagonal (float32 unless ``table_dtype`` says
  otherwise; row-wise int8 keeps each row within half a quantization step);
- arrays ``train_indptr`` int64 [n_users + 1] / ``train_items`` int64 [nnz]: each user's distinct train
  items, sorted (its item row, and its exclusion list), ``item_counts`` int64 [n_items];
- meta ``n_users``, ``n_items``, ``l2``, ``dtype`` (of the inverse), ``metrics``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from rec_engine.bundle import write_bundle

from .models.ease import EASE


def export_ease(model: EASE, path: str | os.PathLike, *, metrics: Mapping[str, float] | None = None,
                table_dtype: str = "float32", overwrite: bool = False, keys: Mapping | None = None,
                training: Mapping | None = None) -> Path:
    """Write the fitted ``model`` as a bundle of kind "ease" at ``path`` and return the path.

    Parameters
    ----------
    model : EASE, fitted
    metrics : mapping, optional  evaluation results recorded in the meta
    table_dtype : {"float32", "float16", "int8"}  storage of the item-item table
    overwrite : bool  replace an existing bundle
    keys : mapping, optional  the users' own keys (``{"user": [...], "item": [...]}`` in dense-id order)
    training : mapping, optional  what fitted it (data source, settings): ``meta["training"]``

    Raises
    ------
    TypeError  ``model`` is not an EASE; RuntimeError  it is not fitted.
    """
    if not isinstance(model, EASE):
        raise TypeError(f"export_ease needs an EASE model, got {type(model).__name__}")
    model.scorer                                               # raises when not fitted
    arrays = {"train_indptr": model.train_lists.indptr, "train_items": model.train_lists.ids,
              "item_counts": model.item_counts}
    meta = {"n_users": model.n_users, "n_items": model.n_items, "l2": model.l2, "dtype": model.dtype,
            "metrics": dict(metrics or {}), **({"training": dict(training)} if training else {})}
    extra = {} if keys is None else {"keys": keys}
    return write_bundle(path, kind="ease", meta=meta, tables={"item_item": model.B}, arrays=arrays,
                        table_dtype=table_dtype, overwrite=overwrite, **extra)
