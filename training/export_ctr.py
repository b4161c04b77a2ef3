"""CTR models to bundles, and a NumPy-only scorer of such bundles.

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
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from rec_engine.bundle import BundleError, open_bundle, write_bundle
from rec_engine.features import EncodedBatch, Schema

INPUTS = ("emb", "lin")
OUTPUT = "logit"
OPSET = 18


def _onnx_dense(dense, n_fields: int, dim: int) -> bytes:
    """The dense module as a serialized ONNX model with inputs ``emb``, ``lin`` and output ``logit``."""
    import onnx
    import torch

    emb = torch.zeros(2, n_fields, dim)
    lin = torch.zeros(2, n_fields)
    was_training = dense.training
    dense.eval()
    try:
        with warnings.catch_warnings():
            # torch's exporter warns about its own internals (pytree deprecations) and about the shared
            # batch axis name; neither concerns the exported graph.
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used", category=UserWarning)
            program = torch.onnx.export(dense, (emb, lin), dynamo=True, opset_version=OPSET, verbose=False,
                                        input_names=list(INPUTS), output_names=[OUTPUT],
                                        dynamic_shapes={"emb": {0: "batch"}, "lin": {0: "batch"}})
    finally:
        dense.train(was_training)
    proto = program.model_proto
    graph = proto.graph
    if len(graph.input) != len(INPUTS) or len(graph.output) != 1:
        raise RuntimeError(f"the exported dense graph has {len(graph.input)} inputs and {len(graph.output)} "
                           f"outputs, expected {len(INPUTS)} and 1")
    renames = {old.name: new for old, new in zip(list(graph.input) + list(graph.output), [*INPUTS, OUTPUT])
               if old.name != new}
    if renames:   # the exporter chose other names: rename them everywhere in the graph
        for v in list(graph.input) + list(graph.output):
            v.name = renames.get(v.name, v.name)
        for node in graph.node:
            node.input[:] = [renames.get(x, x) for x in node.input]
            node.output[:] = [renames.get(x, x) for x in node.output]
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_ctr(model, path: str | os.PathLike, *, table_dtype: str = "float32", metrics: Mapping | None = None,
               overwrite: bool = False) -> Path:
    """Write ``model`` (a :class:`~rec_engine_train.models.ctr.CtrModel`) as a bundle at ``path``.

    Parameters
    ----------
    table_dtype : {"float32", "float16", "int8"}
        Storage of both tables (int8: row-wise, every value within half a step of the original).
    metrics : mapping, optional
        Evaluation results stored in ``meta["metrics"]``.
    overwrite : bool
        Replace an existing bundle at ``path``.

    Returns
    -------
    pathlib.Path of the bundle. Its ``meta``: ``schema`` (``Schema.to_dict()``), ``dim``, ``n_fields``,
    ``kind``, ``inputs`` ["emb", "lin"], ``output`` "logit", ``params``, ``metrics``.
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
    return write_bundle(path, kind=model.kind, meta=meta, tables=tables, onnx={"dense": dense_bytes},
                        table_dtype=table_dtype, overwrite=overwrite)


class CtrScorer:
    """Scores encoded examples with a CTR bundle: core pooling, then the ONNX dense part (no torch).

    Call it with an :class:`~rec_engine.features.EncodedBatch` for click probabilities, or use
    :meth:`logits`. Safe to call from several threads at once (the table and the ONNX session are)."""

    def __init__(self, bundle_path: str | os.PathLike, *, intra_op_threads: int = 1, num_threads: int | None = 1):
        import onnxruntime as ort

        self.bundle = open_bundle(bundle_path)
        meta = self.bundle.meta
        missing = [k for k in ("schema", "n_fields", "dim") if k not in meta]
        if missing or not self.bundle.has("dense.onnx"):
            raise BundleError(f"{self.bundle.path} is not a CTR bundle (kind {self.bundle.kind!r}): it lacks "
                              f"{missing + ([] if self.bundle.has('dense.onnx') else ['dense.onnx'])}")
        self.kind = self.bundle.kind
        self.schema = Schema.from_dict(meta["schema"])
        self.n_fields = int(meta["n_fields"])
        self.dim = int(meta["dim"])
        self.embedding = self.bundle.table("embedding")
        self.linear = self.bundle.table("linear")
        self.num_threads = num_threads
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.bundle.onnx_path("dense")), opts,
                                            providers=["CPUExecutionProvider"])
        self.inputs = tuple(meta.get("inputs", INPUTS))
        self.output = meta.get("output", OUTPUT)

    def pool(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        """``emb`` float32 ``[n, F, dim]`` and ``lin`` float32 ``[n, F]`` of the ``n`` examples of ``batch``."""
        if not isinstance(batch, EncodedBatch):
            raise TypeError(f"expected an EncodedBatch, got {type(batch).__name__}")
        if batch.n_fields != self.n_fields:
            raise ValueError(f"the batch has {batch.n_fields} fields, the bundle's schema has {self.n_fields}")
        args = dict(mode="sum", include_last_offset=True, num_threads=self.num_threads)
        emb = self.embedding.pool(batch.indices, batch.offsets, batch.weights, **args)
        lin = self.linear.pool(batch.indices, batch.offsets, batch.weights, **args)
        return emb.reshape(-1, self.n_fields, self.dim), lin.reshape(-1, self.n_fields)

    def logits(self, batch: EncodedBatch) -> np.ndarray:
        """Logits, float32 ``[n]``."""
        emb, lin = self.pool(batch)
        if len(emb) == 0:
            return np.zeros(0, np.float32)
        (out,) = self.session.run([self.output], dict(zip(self.inputs, (emb, lin))))
        return np.asarray(out, np.float32).reshape(-1)

    def __call__(self, batch: EncodedBatch) -> np.ndarray:
        """Click probabilities, float32 ``[n]``."""
        z = self.logits(batch).astype(np.float64)
        return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)   # sigmoid without overflow

    def __repr__(self) -> str:
        return f"CtrScorer({str(self.bundle.path)!r}, kind={self.kind!r}, fields={self.n_fields}, dim={self.dim})"


def load_ctr_scorer(bundle_path: str | os.PathLike, *, intra_op_threads: int = 1,
                    num_threads: int | None = 1) -> CtrScorer:
    """Open a CTR bundle for scoring: ``scorer(batch) -> probabilities float32 [n]``.

    ``intra_op_threads``: onnxruntime threads of the dense part; ``num_threads``: core threads of the
    pooling (None: the core's default). Keep both at 1 inside a multi-threaded server."""
    return CtrScorer(bundle_path, intra_op_threads=intra_op_threads, num_threads=num_threads)
