"""CTR models to bundles; :func:`load_ctr_scorer` opens one with the serving code (``rec_engine.ranking``).

A CTR bundle holds the two tables of a :class:`~rec_engine_train.models.ctr.CtrModel` (``embedding``
``[n_rows, dim]`` and ``linear`` ``[n_rows, 1]``, stored as float32, float16 or row-wise int8) and its dense
part as ``dense.onnx``: inputs ``emb`` float32 ``[batch, F, dim]`` and ``lin`` float32 ``[batch, F]``, output
``logit`` float32 ``[batch]``, a dynamic batch axis. Scoring is: pool the encoded bags through the C++ core
(``EmbeddingTable.pool(..., mode="sum", include_last_offset=True)``), run the ONNX graph, apply a sigmoid.

This module imports torch only inside :func:`export_ctr`: :func:`load_ctr_scorer` needs NumPy, the core and
onnxruntime only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rec_engine.bundle import open_bundle, write_bundle
from rec_engine.ranking import CtrRanker, load_ranking

from .onnx_export import export_onnx

INPUTS = ("emb", "lin")
DENSE_STATE = "dense_state."      # array name prefix of the dense part's state_dict entries
OUTPUT = "logit"


def _onnx_dense(dense, n_fields: int, dim: int) -> bytes:
    """The dense module as a serialized ONNX model with inputs ``emb``, ``lin`` and output ``logit``."""
    import torch

    return export_onnx(dense, (torch.zeros(2, n_fields, dim), torch.zeros(2, n_fields)), INPUTS, OUTPUT)


def export_ctr(model, path: str | os.PathLike, *, table_dtype: str = "float32", metrics: Mapping | None = None,
               entity_features: Mapping[str, Mapping[str, Sequence]] | None = None, overwrite: bool = False,
               keys: Mapping | None = None, training: Mapping | None = None, content=None,
               content_info: Mapping | None = None, pair_fields: Sequence[str] | None = None,
               profile_config: Mapping | None = None, content_vectors=None, item_labels=None) -> Path:
    """Write ``model`` (a :class:`~rec_engine_train.models.ctr.CtrModel`) as a bundle at ``path``.

    Parameters
    ----------
    table_dtype : {"float32", "float16", "int8"}
        Storage of both tables (int8: row-wise, every value within half a step of the original).
    metrics : mapping, optional
        Evaluation results stored in ``meta["metrics"]``.
    entity_features : mapping, optional
        Feature stores for serving candidates: ``{"item": columns, "user": columns}``, each a mapping from
        field name to one value per entity id (row ``i`` describes item ``i``). Stored encoded as arrays
        ``item_features_{indices,offsets,weights}`` (and ``user_...``); ``meta["entity_fields"]`` names the
        fields of each entity. The schema's other fields come from the request's context.
    overwrite : bool
        Replace an existing bundle at ``path``.
    keys : mapping, optional
        The users' own keys, ``{"user": [...], "item": [...]}`` in dense-id order (stored by ``write_bundle``).
    content : rec_engine.content.ContentProjection, optional
        The projection of text vectors that the item fields ``content_*`` were built with (stored as arrays
        ``content_axes`` / ``content_mean``, with ``content_info``, the encoder's identity, as ``meta["content"]``),
        so the engine describes an item added online with text the same way.
    training : mapping, optional
        What trained the model (data source, world settings, TrainConfig fields), stored in
        ``meta["training"]``: what ``rec-engine update`` retrains it from.

    Returns
    -------
    pathlib.Path of the bundle. Its ``meta``: ``schema`` (``Schema.to_dict()``), ``dim``, ``n_fields``,
    ``kind``, ``inputs`` ["emb", "lin"], ``output`` "logit", ``params``, ``metrics`` (and ``training``). The
    dense part's weights are also stored as arrays ``dense_state.<name>`` (its ``state_dict``, batch-norm
    statistics included, which ONNX folds away), so an update can continue training from them.
    """
    for attr in ("kind", "schema", "dim", "n_fields", "embedding", "linear", "dense"):
        if not hasattr(model, attr):
            raise TypeError(f"export_ctr needs a CtrModel, got {type(model).__name__} (it has no {attr!r})")
    if Path(path).exists() and not overwrite:      # before the (slow) ONNX export
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    dense_bytes = _onnx_dense(model.dense, model.n_fields, model.dim)
    tables = {"embedding": model.embedding.detach().cpu().numpy().astype(np.float32),
              "linear": model.linear.detach().cpu().numpy().astype(np.float32)}
    meta = {"schema": model.schema.to_dict(), "dim": model.dim, "n_fields": model.n_fields, "kind": model.kind,
            "inputs": list(INPUTS), "output": OUTPUT, "params": dict(model.params), "metrics": dict(metrics or {})}
    if training:
        meta["training"] = dict(training)
    arrays = {f"{DENSE_STATE}{name}": value.detach().cpu().numpy() for name, value in model.dense.state_dict().items()}
    if entity_features:
        unknown = set(entity_features) - {"user", "item"}
        if unknown:
            raise ValueError(f"entity_features takes 'user' and 'item' columns, got {sorted(unknown)}")
        meta["entity_fields"] = {}
        for entity, cols in entity_features.items():
            enc = model.schema.encode(cols, fields=list(cols))
            arrays.update({f"{entity}_features_indices": enc.indices, f"{entity}_features_offsets": enc.offsets,
                           f"{entity}_features_weights": enc.weights})
            meta["entity_fields"][entity] = [n for n in model.schema.names if n in cols]
    if content is not None:
        missing = [n for n in content.names if n not in (meta.get("entity_fields") or {}).get("item", ())]
        if missing:
            raise ValueError(f"a content projection needs the item fields {missing} in the item feature store")
        arrays.update(content.to_arrays())
        meta["content"] = {"fields": content.names, **dict(content_info or {})}
    if pair_fields:         # numeric context fields given per candidate at serving (profile features)
        meta["pair_fields"] = list(pair_fields)
        if profile_config:
            meta["profile_config"] = dict(profile_config)
        if content_vectors is not None:      # what the content cosine reads when no retrieval stage has them
            arrays["content_vectors"] = np.ascontiguousarray(content_vectors, np.float32)
        if item_labels is not None and any(item_labels):
            from .content_map import string_lists_arrays

            arrays.update(string_lists_arrays("item_labels", item_labels))
    extra = {} if keys is None else {"keys": keys}
    return write_bundle(path, kind=model.kind, meta=meta, tables=tables, arrays=arrays, onnx={"dense": dense_bytes},
                        table_dtype=table_dtype, overwrite=overwrite, **extra)


def load_ctr_scorer(bundle_path: str | os.PathLike, *, intra_op_threads: int = 1,
                    num_threads: int | None = 1) -> CtrRanker:
    """Open a CTR bundle for scoring: ``scorer(batch) -> probabilities float32 [n]``.

    ``intra_op_threads``: onnxruntime threads of the dense part; ``num_threads``: core threads of the
    pooling (None: the core's default). Keep both at 1 inside a multi-threaded server."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = 1
    return load_ranking(open_bundle(bundle_path), opts, num_threads=num_threads)
