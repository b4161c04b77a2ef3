"""SASRec to a bundle; scoring from one lives in :mod:`rec_engine.sequential` (no torch), re-exported here.

Bundle (kind ``"sasrec"``):

- table ``items`` ``[n_items, dim]``: ``item_emb[1:]``, row ``i`` = item ``i``. It embeds the history
  (looked up by the core's ``gather``) AND is the output matrix (top-k by inner product);
- ``encoder.onnx``: :class:`~rec_engine_train.models.sasrec.SASRecEncoder`, inputs ``seq_emb`` float32
  ``[batch, max_len, dim]`` and ``mask`` float32 ``[batch, max_len]``, output ``user`` float32
  ``[batch, dim]``; the batch axis is dynamic, the length is fixed at ``max_len``;
- arrays ``history_indptr`` / ``history_items`` (CSR): each known user's history, oldest first, which serving
  (``rec_engine.retrieval.SequentialRetrieval``) uses as the sequence and the seen set; ``item_counts``
  when histories are given;
- meta ``n_items``, ``dim``, ``max_len``, ``params``, ``metrics``, ``inputs``, ``output``.

A history enters the encoder as its latest ``max_len`` items, LEFT-padded (:func:`pad_histories`); padded
positions carry any id with mask 0. An empty history has no user vector and raises ValueError.

Only :func:`export_sasrec` imports torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from rec_engine import IdLists
from rec_engine.bundle import write_bundle
from rec_engine.sequential import (KIND, OUTPUT, SASRecScorer, as_lists, check_candidates,  # noqa: F401
                                   load_sasrec_scorer, pad_histories)

from .onnx_export import export_onnx

INPUTS = ("seq_emb", "mask")


def _onnx_encoder(encoder) -> bytes:
    """``encoder`` (a SASRecEncoder) as serialized ONNX with inputs ``seq_emb``, ``mask``, output ``user``."""
    import torch

    return export_onnx(encoder, (torch.zeros(2, encoder.max_len, encoder.dim), torch.ones(2, encoder.max_len)),
                       INPUTS, OUTPUT)


def export_sasrec(model, path: str | os.PathLike, *, histories=None, table_dtype: str = "float32",
                  metrics: Mapping | None = None, overwrite: bool = False, keys: Mapping | None = None,
                  training: Mapping | None = None) -> Path:
    """Write ``model`` (a :class:`~rec_engine_train.models.sasrec.SASRec`) as a bundle at ``path``.

    Parameters
    ----------
    histories : sequence of integer arrays or IdLists, optional
        Each known user's items, oldest first (e.g. train + valid + test); stored as
        ``history_indptr`` / ``history_items`` with ``item_counts``. Without it the bundle knows no user
        (serving builds histories from observed items only).
    table_dtype : {"float32", "float16", "int8"}
        Storage of the ``items`` table.
    metrics : mapping, optional
        Evaluation results stored in ``meta["metrics"]``.
    overwrite : bool
        Replace an existing bundle at ``path``.
    keys : mapping, optional
        The users' own keys, ``{"user": [...], "item": [...]}`` in dense-id order (stored by ``write_bundle``).

    Returns
    -------
    pathlib.Path of the bundle.
    """
    for attr in ("item_emb", "encoder", "n_items", "dim", "max_len", "params"):
        if not hasattr(model, attr):
            raise TypeError(f"export_sasrec needs a SASRec model, got {type(model).__name__} (it has no {attr!r})")
    if Path(path).exists() and not overwrite:      # before the (slow) ONNX export
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if histories is None:
        lists = IdLists(np.zeros(1, np.int64), np.zeros(0, np.int64))
        arrays = {}
    else:
        lists = as_lists(histories)
        bad = np.flatnonzero((lists.ids < 0) | (lists.ids >= model.n_items))
        if bad.size:
            raise IndexError(f"histories hold item id {int(lists.ids[bad[0]])}, not in [0, {model.n_items})")
        arrays = {"item_counts": np.bincount(lists.ids, minlength=model.n_items).astype(np.int64)}
    arrays.update({"history_indptr": lists.indptr, "history_items": lists.ids})
    encoder_bytes = _onnx_encoder(model.encoder)
    items = model.item_emb.weight.detach().cpu().numpy()[1:].astype(np.float32)
    meta = {"n_items": model.n_items, "dim": model.dim, "max_len": model.max_len, "params": dict(model.params),
            "metrics": dict(metrics or {}), "inputs": list(INPUTS), "output": OUTPUT}
    if training:
        meta["training"] = dict(training)
    extra = {} if keys is None else {"keys": keys}
    return write_bundle(path, kind=KIND, meta=meta, tables={"items": items}, arrays=arrays,
                        onnx={"encoder": encoder_bytes}, table_dtype=table_dtype, overwrite=overwrite, **extra)


