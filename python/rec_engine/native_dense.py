"""The dense part of a DeepFM / Wide&Deep ranking model run by the C++ core instead of ONNX Runtime.

A request's dense part (500 candidates of a DeepFM 400-400-400: ~400k multiply-adds a row after the first
layer's split, see :mod:`rec_engine.dense_split`) is three matrix products and a few reductions. ONNX
Runtime runs the products near the FMA peak but spends ~10% more on its other nodes (the FM's reductions
over the fields, the gather of the varying fields, the one-output layer) and on a pass per node; the core's
:class:`rec_engine._core.DenseNet` computes the same sums with the products in register tiles over weights
packed at load, the FM and the linear sum in one pass over each row, and the varying fields read in place:
1.57 against 1.78 ms for 500 rows on one core (AMD EPYC family 26). Its logits differ from ONNX Runtime's
in rounding only (the order of the additions inside the products).

:func:`native_dense` reads the split model's graph, which the training exporter writes for widedeep and
deepfm (``bias + ReduceSum(lin)``, for deepfm ``+ 0.5 * FM(emb)``, ``+ MLP``: Gemm + Relu layers over the
varying fields, a one-output Gemm last). Anything else (xdeepfm's CIN, batch norm, int8 weights, another
exporter's graph) gives None and ONNX Runtime runs the model. The runner checks the native part against
the split model's ONNX Runtime session on random rows at load and keeps it only when they agree. It runs at
the avx512 SIMD level only (the core's portable loop at the other levels is correct but slow, so there the
runner calls ONNX Runtime); ``REC_ENGINE_NATIVE_DENSE=0`` in the environment turns it off.
"""
from __future__ import annotations

import os

import numpy as np

from . import _core
from .dense_split import _attr


def allowed() -> bool:
    """Whether a runner may build a native dense part (``REC_ENGINE_NATIVE_DENSE`` is not ``0``)."""
    return os.environ.get("REC_ENGINE_NATIVE_DENSE", "1") != "0"


def screen_allowed() -> bool:
    """Whether a float32 runner may screen a request's rows on the bf16 / bf16x3 tiles and compute only the contenders
    for its best in float32 (``REC_ENGINE_DENSE_SCREEN`` is not ``0``; the answers are float32's either way)."""
    return os.environ.get("REC_ENGINE_DENSE_SCREEN", "1") != "0" and _core.amx_available()


def fast_here() -> bool:
    """Whether the native dense part runs its SIMD kernels now (the avx512 level in use)."""
    return _core.simd_level() == "avx512"


def native_dense(model: bytes, *, emb: str, lin: str, output: str, first_bias: str, n_fields: int,
                 dim: int, precision: str = "float32", screen: bool = False):
    """A :class:`rec_engine._core.DenseNet` computing the split dense part ``model`` (serialized; inputs
    ``emb`` [B, F, d], ``lin`` [B, F] and ``first_bias`` [1, H], output ``output``), or None when its graph is
    not the pattern the module docstring describes (or ``onnx`` is missing). ``precision`` ("float32",
    "bf16x3", "bf16"): its hidden layers' products (the reduced ones on AMX-BF16 tiles, where there are any;
    see :class:`rec_engine._core.DenseNet`); ``screen`` (float32 only): with the screen's tile weights and norms."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    try:
        g = onnx.load_from_string(model).graph
    except Exception:      # noqa: BLE001 - not a model this onnx reads: no native part
        return None
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)

    def only_user(name, op):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def plain_gemm(n) -> bool:
        return (n is not None and n.op_type == "Gemm" and len(n.input) == 3 and n.input[1] in inits
                and _attr(n, "transA", 0) == 0 and _attr(n, "transB", 0) == 1
                and _attr(n, "alpha", 1.0) == 1.0 and _attr(n, "beta", 1.0) == 1.0
                and inits[n.input[1]].dtype == np.float32 and inits[n.input[1]].ndim == 2)

    # the first layer: Gemm(Reshape(Gather(emb, var fields, axis 1)), W, first_bias)
    first = [n for n in g.node if n.op_type == "Gemm" and len(n.input) == 3 and n.input[2] == first_bias]
    if len(first) != 1 or not plain_gemm(first[0]):
        return None
    gemm = first[0]
    reshape = producer.get(gemm.input[0])
    gather = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    if (gather is None or gather.op_type != "Gather" or gather.input[0] != emb or gather.input[1] not in inits
            or _attr(gather, "axis", 0) != 1):
        return None
    var = inits[gather.input[1]].astype(np.int64).reshape(-1)
    weights, biases = [inits[gemm.input[1]]], [None]
    # Relu, Gemm, ... until the one-output Gemm
    node = gemm
    while weights[-1].shape[0] != 1:
        relu = only_user(node.output[0], "Relu")
        nxt = only_user(relu.output[0], "Gemm") if relu is not None else None
        if not plain_gemm(nxt) or nxt.input[0] != relu.output[0] or nxt.input[2] not in inits:
            return None
        b = inits[nxt.input[2]].reshape(-1)
        if b.dtype != np.float32 or len(b) != inits[nxt.input[1]].shape[0]:
            return None
        weights.append(inits[nxt.input[1]])
        biases.append(b)
        node = nxt
    if len(weights) < 2:
        return None
    # the model's bias beside the linear sum, and the FM (its scale) when there is one
    bias = None
    for n in g.node:
        if n.op_type == "Add" and len(n.input) == 2:
            for a, b in (n.input, n.input[::-1]):
                p = producer.get(b)
                if a in inits and inits[a].size == 1 and p is not None and p.op_type == "ReduceSum" and p.input[0] == lin:
                    bias = float(inits[a].reshape(-1)[0])
    if bias is None:
        return None
    fm = any(n.op_type == "Mul" and list(n.input) == [emb, emb] for n in g.node)
    scale = 0.0
    if fm:
        scales = [float(inits[a].reshape(-1)[0]) for n in g.node if n.op_type == "Mul"
                  for a in n.input if a in inits and inits[a].size == 1]
        if len(scales) != 1:
            return None
        scale = scales[0]
    if output not in {o.name for o in g.output}:
        return None
    try:
        return _core.DenseNet(n_fields, dim, var.tolist(), [np.ascontiguousarray(w) for w in weights],
                              [None if b is None else np.ascontiguousarray(b) for b in biases], bias, scale, fm,
                              precision=precision, screen=screen)
    except (ValueError, TypeError):
        return None


def agrees(net, session, *, emb: str, lin: str, first_bias: str, output: str, n_fields: int, dim: int,
           hidden: int) -> bool:
    """Whether ``net`` gives ``session``'s logits (to float32 rounding, or to the rounding of ``net``'s reduced
    precision: bf16x3 ~2^-16 of a product, bf16 ~2^-8) on random rows, 1 to 37 at a time."""
    tol = {"bf16x3": 1e-3, "bf16": 5e-2}.get(net.precision, 1e-4)
    rng = np.random.default_rng(0)
    for n in (1, 6, 37):
        e = rng.normal(0.0, 0.5, (n, n_fields, dim)).astype(np.float32)
        li = rng.normal(0.0, 0.5, (n, n_fields)).astype(np.float32)
        fb = rng.normal(0.0, 0.5, (1, hidden)).astype(np.float32)
        (ref,) = session.run([output], {emb: e, lin: li, first_bias: fb})
        ref = np.asarray(ref, np.float64).reshape(-1)
        got = net.forward(e, li, fb, np.empty(n, np.float32)).astype(np.float64)
        if not np.allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max()))):
            return False
    return True
