"""The first dense layer of a CTR model split by what varies within a request.

A ranking request scores one user's candidates in one context: the user's and the context's fields are the
same on every row, only the item fields (and the pair fields) change. The MLP's first layer multiplies the
whole concatenated embedding ``[F * d]`` by its weight ``W [H, F * d]`` on every row; its columns of the
constant fields give the same ``H`` numbers on all rows of a request. :func:`split_first_layer` rewrites the
dense part so that the first layer multiplies only the varying fields' columns, and takes the rest as an
input, ``first_bias [rows or 1, H]`` (the Gemm's ``C``; another name when the model already uses that one:
:attr:`FirstLayerSplit.input`), which :class:`FirstLayerSplit` computes once per
request (``W_c x_c + b``). For DeepFM's 416-400-400-400 MLP with 14 constant fields of 26 that is 18% of its
multiply-adds; the FM and linear parts still see the whole ``emb`` and ``lin``.

The rewrite needs the ``onnx`` package (the ``serve`` extra), and matches one pattern: the ``emb`` input
reshaped to ``[-1, F * d]`` and fed only to a ``Gemm`` (``transB=1``, ``alpha = beta = 1``) with constant
weight and bias, as the training exporter writes for widedeep, deepfm and xdeepfm. Anything else (an int8
dense part, another exporter's graph): no split, the model runs whole. The runner checks the split model
against the whole one on random rows at load.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

FIRST_BIAS = "first_bias"


class FirstLayerSplit:
    """The split dense part (``model``, serialized) and what it needs per request: ``first_bias(rows)`` for
    the pooled ``emb`` rows ``[R, F, d]`` (one row of each request) gives ``[R, H]``."""

    def __init__(self, model: bytes, const: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                 input_name: str = FIRST_BIAS):
        self.model = model
        self.input = input_name                              # the split model's input for first_bias
        self.const = const                                   # constant field positions [Fc]
        self.weight_t = np.ascontiguousarray(weight.T)       # [Fc * d, H]
        self.bias = np.ascontiguousarray(bias, np.float32)   # [H]
        self.hidden = len(bias)

    def first_bias(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``W_c x_c + b`` float32 ``[R, H]`` of the constant fields of ``rows`` (``emb`` rows ``[R, F, d]``)."""
        x = rows[:, self.const].reshape(len(rows), -1)
        out = np.matmul(x, self.weight_t, out=out)
        out += self.bias
        return out


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def split_first_layer(model, *, emb: str, n_fields: int, dim: int,
                      constant_fields: Sequence[int]) -> FirstLayerSplit | None:
    """The dense part ``model`` (a path or serialized bytes) with its first layer split (module docstring),
    or None when there is nothing to split, the pattern does not match or ``onnx`` is not installed."""
    const = np.array(sorted(set(int(f) for f in constant_fields)), np.int64)
    if len(const) == 0 or len(const) >= n_fields or const[0] < 0 or const[-1] >= n_fields:
        return None
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else onnx.load(str(model))
    g = proto.graph
    if next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0) < 7:
        return None                                   # (Gemm broadcasts C from opset 7 on)
    inits = {i.name: i for i in g.initializer}
    consumers: dict = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    match = None
    for r in consumers.get(emb, ()):
        if r.op_type != "Reshape" or r.input[0] != emb or r.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[r.input[1]]).reshape(-1).tolist()
        keep_zero = _attr(r, "allowzero", 0) == 0     # 0: "the input's size there", not a zero size
        if len(shape) != 2 or shape[1] != n_fields * dim or not (shape[0] == -1 or (shape[0] == 0 and keep_zero)):
            continue
        users = consumers.get(r.output[0], [])
        if r.output[0] in {o.name for o in g.output} or len(users) != 1:
            continue
        gemm = users[0]
        if (gemm.op_type != "Gemm" or list(gemm.input[:1]) != [r.output[0]] or len(gemm.input) != 3
                or gemm.input[1] not in inits or gemm.input[2] not in inits
                or _attr(gemm, "transA", 0) != 0 or _attr(gemm, "transB", 0) != 1
                or _attr(gemm, "alpha", 1.0) != 1.0 or _attr(gemm, "beta", 1.0) != 1.0):
            continue
        w = numpy_helper.to_array(inits[gemm.input[1]])
        b = numpy_helper.to_array(inits[gemm.input[2]]).reshape(-1)
        if (w.dtype != np.float32 or w.ndim != 2 or w.shape[1] != n_fields * dim or b.dtype != np.float32
                or len(b) != w.shape[0]):
            continue
        match = (r, gemm, w, b)
        break
    if match is None:
        return None
    reshape, gemm, w, b = match
    var = np.array([f for f in range(n_fields) if f not in set(const.tolist())], np.int64)
    cols = (np.arange(n_fields * dim).reshape(n_fields, dim))
    w_var, w_const = w[:, cols[var].ravel()], w[:, cols[const].ravel()]
    names = ({x for n in g.node for x in list(n.input) + list(n.output)} | set(inits)
             | {v.name for v in list(g.input) + list(g.output) + list(g.value_info)} | {n.name for n in g.node})

    def fresh(base):
        name, i = base, 0
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.add(name)
        return name

    idx, shp, wv, sel, view, bias_in = (fresh(s) for s in ("split_var_fields", "split_var_shape",
                                                           "split_var_weight", "split_var_emb", "split_var_view",
                                                           FIRST_BIAS))
    new_nodes = [helper.make_node("Gather", [emb, idx], [sel], axis=1),
                 helper.make_node("Reshape", [sel, shp], [view]),
                 helper.make_node("Gemm", [view, wv, bias_in], list(gemm.output), transB=1)]
    nodes = []
    for n in g.node:
        if n is reshape:
            continue
        if n is gemm:
            nodes.extend(new_nodes)
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in g.node for x in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + [numpy_helper.from_array(var, idx),
                                 numpy_helper.from_array(np.array([-1, len(var) * dim], np.int64), shp),
                                 numpy_helper.from_array(np.ascontiguousarray(w_var), wv)])
    g.input.append(helper.make_tensor_value_info(bias_in, TensorProto.FLOAT, ["first_bias_rows", w.shape[0]]))
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError):   # (ValueError: a model past protobuf's 2 GB)
        return None
    return FirstLayerSplit(proto.SerializeToString(), const, w_const, b, bias_in)
